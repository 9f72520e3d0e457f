"""A long prompt joining running streams: its time to first token against its time alone, and how smooth
the streams stay, with prefill and decode in one pass a step.

    python -m bench.prefill [--preset tiny|vibethinker-1.5b] [--streams 4] [--prompt 4000] [--rounds 2]

In one process, one engine (int8 at the real-size preset, float32 on the tiny
one; the prefix cache off, so every run prefills the whole prompt): the
prompt alone, then `--streams` greedy streams running and the same prompt
joining them, taking turns for `--rounds` rounds. For the joined runs, the
streams' inter-token latency over their whole run (4 s before the join, the
join, and as long after it as it took): p50 and p99, and the p50 apart from
the join and during it, the longest gap; each token timed as the engine
chooses it. One JSON
line per run, and one with the ratios: the joined prompt's time to first
token over its time alone (median of the rounds' ratios), and p99 / p50.
"""

import argparse
import json
import statistics
import threading
import time

from bench.harness import cached_demo_model


def stream_times(engine, question, streams, stop):
    """Start `streams` readers, each running greedy answers back to back until `stop`; their token times."""
    from service.inference.generation import GenerationRequest

    stamps = []

    def read():
        while not stop.is_set():
            handle = engine.submit(GenerationRequest(question, 10**5, deadline=time.monotonic() + 3600))
            handle.token_times = []  # Row.add stamps each token here (a random model's tokens may have no text)
            stamps.append(handle.token_times)
            while not handle.done:
                if stop.wait(0.05):
                    handle.cancel()
            handle.result()

    readers = [threading.Thread(target=read) for _ in range(streams)]
    for reader in readers:
        reader.start()
    return stamps, readers


def stamp_tokens():
    """Make every row record when each of its tokens was chosen, on its handle's `token_times` if it has one."""
    from service.inference import rows

    add = rows.Row.add

    def stamped(row, token, now, logprob=None):
        times = getattr(row.handle, "token_times", None)
        if times is not None:
            times.append(time.perf_counter())
        return add(row, token, now, logprob)

    rows.Row.add = stamped


def ttft(engine, prompt_ids):
    from service.inference.generation import GenerationRequest

    started = time.perf_counter()
    engine.submit(GenerationRequest(prompt_ids, 1, deadline=time.monotonic() + 3600)).result(timeout=3600)
    return time.perf_counter() - started


def joined(engine, streams, prompt_ids, question):
    """The prompt's time to first token while `streams` streams run; the streams' gaps."""
    stop = threading.Event()
    stamps, readers = stream_times(engine, question, streams, stop)
    time.sleep(4)  # the streams run and the speeds are measured
    join = time.perf_counter()
    first = ttft(engine, prompt_ids)
    time.sleep(min(60.0, first))  # as long after the join as it took: the streams' whole run is about half join
    stop.set()
    for reader in readers:
        reader.join()
    gaps = sorted(b - a for s in stamps for a, b in zip(s, s[1:]))
    during = sorted(b - a for s in stamps for a, b in zip(s, s[1:]) if b > join and a < join + first)
    apart = sorted(b - a for s in stamps for a, b in zip(s, s[1:]) if b <= join or a >= join + first)
    pick = lambda values, q: values[min(len(values) - 1, int(q * len(values)))]  # noqa: E731
    p50, p99 = pick(gaps, 0.5), pick(gaps, 0.99)
    return {"run": "joining", "streams": streams, "prompt_tokens": len(prompt_ids), "ttft_s": round(first, 3),
            "itl_p50_ms": round(p50 * 1e3, 2), "itl_p99_ms": round(p99 * 1e3, 2),
            "itl_p50_apart_from_the_join_ms": round(pick(apart, 0.5) * 1e3, 2),
            "itl_p50_during_join_ms": round(pick(during, 0.5) * 1e3, 2) if during else None,
            "itl_max_during_join_ms": round(max(during) * 1e3, 2) if during else None,
            "stream_tokens_during_join": len(during), "p99_over_p50": round(p99 / p50, 2)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=["tiny", "vibethinker-1.5b"])
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from bench.realsize import int8_folder
    from service.inference import model
    from service.inference.engine import Engine

    stamp_tokens()
    path = cached_demo_model(args.preset)
    if args.preset == "tiny":
        load = lambda: model.load(str(path))  # noqa: E731
    else:
        folder = int8_folder(path)
        load = lambda: model.load(str(folder), quantization="int8")  # noqa: E731
    engine = Engine(load, queue_size=64, torch_threads=args.threads, prefix_bytes=0).start()
    while not engine.ready:
        if engine.state == "failed":
            raise SystemExit("the model failed to load")
        time.sleep(0.1)
    text = "Read this document carefully and summarise it. " + "The quick brown fox jumps over the lazy dog. " * 800
    ids = engine.model.encode_chat([{"role": "user", "content": text}])
    while len(ids) > args.prompt:
        text = text[: int(len(text) * args.prompt / len(ids) * 0.99)]
        ids = engine.model.encode_chat([{"role": "user", "content": text}])
    question = engine.model.encode_chat([{"role": "user", "content": "Count to a thousand."}])
    ttft(engine, ids[:64])  # warm
    ratios, lines = [], []
    for _ in range(args.rounds):
        alone = {"run": "alone", "prompt_tokens": len(ids), "ttft_s": round(ttft(engine, ids), 3)}
        together = joined(engine, args.streams, ids, question)
        ratios.append(together["ttft_s"] / alone["ttft_s"])
        lines += [alone, together]
    engine.stop(timeout=60)
    for line in lines:
        print(json.dumps({"preset": args.preset, **line}))
    print(json.dumps({"preset": args.preset, "streams": args.streams, "prompt_tokens": len(ids),
                      "joined_ttft_over_alone": round(statistics.median(ratios), 3),
                      "p99_over_p50": max(line["p99_over_p50"] for line in lines if line["run"] == "joining")}))


if __name__ == "__main__":
    main()
