"""Chunked prefill: how running streams fare while a long prompt joins, chunked against in one pass.

    python -m bench.prefill [--preset tiny|vibethinker-1.5b] [--dtype bfloat16] [--streams 4] [--prompt 4000]

In one process, one engine: `--streams` greedy streams run, then a prompt of
about `--prompt` tokens joins. Measured over the streams' tokens from the
join to a while after it (each token timed as the engine chooses it):
inter-token latency p50, p99, the longest gap and p99 / p50; the long
prompt's time to first token. Run twice side by side,
prefill chunked (as the engine does) and in one pass (every chunk as large
as the prompt), and print one JSON line per run and one with the ratios.
"""

import argparse
import json
import threading
import time

from bench.harness import cached_demo_model


def run(engine, streams, prompt_ids, chunked):
    from service.inference.generation import GenerationRequest

    if not chunked:
        engine.chunk_tokens = lambda running: 10**9  # every prefill in one pass
    else:
        engine.__dict__.pop("chunk_tokens", None)
    stamps, stop = [], threading.Event()  # one list of token times per stream request
    question = engine.model.encode_chat([{"role": "user", "content": "Count to a thousand."}])

    def read():  # one stream after another until told to stop (a random model's answer may end early)
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
    time.sleep(3)  # the streams run and the speeds are measured
    joined = time.perf_counter()
    long = engine.submit(GenerationRequest(prompt_ids, 1, deadline=time.monotonic() + 3600))
    long.result(timeout=3600)
    first = time.perf_counter() - joined
    time.sleep(first * 0.5)  # some tokens after the join, as a stream's p50 sees them
    stop.set()
    for reader in readers:
        reader.join()
    if not any(s and s[-1] > joined for s in stamps):
        raise SystemExit(f"no stream token after the join: {[len(s) for s in stamps]}")
    gaps = sorted(b - a for s in stamps for a, b in zip(s, s[1:]) if b > joined)  # the gap the join falls in too
    pick = lambda q: gaps[min(len(gaps) - 1, int(q * len(gaps)))]  # noqa: E731
    return {"prefill": "chunked" if chunked else "one pass", "streams": streams, "prompt_tokens": len(prompt_ids),
            "long_prompt_ttft_s": round(first, 3), "itl_p50_ms": round(pick(0.5) * 1e3, 2),
            "itl_p99_ms": round(pick(0.99) * 1e3, 2), "itl_max_ms": round(gaps[-1] * 1e3, 2),
            "p99_over_p50": round(pick(0.99) / pick(0.5), 2)}


def stamp_tokens():
    """Make every row record when each of its tokens was chosen, on its handle's `token_times` if it has one."""
    from service.inference import batching

    add = batching.Row.add

    def stamped(row, token, now):
        times = getattr(row.handle, "token_times", None)
        if times is not None:
            times.append(time.perf_counter())
        return add(row, token, now)

    batching.Row.add = stamped


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=["tiny", "vibethinker-1.5b"])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quantization", default="none")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=4000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from service.inference import model
    from service.inference.engine import Engine

    stamp_tokens()
    path = cached_demo_model(args.preset)
    engine = Engine(lambda: model.load(str(path), args.dtype, args.quantization), queue_size=64,
                    torch_threads=args.threads).start()
    while not engine.ready:
        if engine.state == "failed":
            raise SystemExit("the model failed to load")
        time.sleep(0.1)
    text = "Read this document carefully and summarise it. " + "The quick brown fox jumps over the lazy dog. " * 400
    ids = engine.model.encode_chat([{"role": "user", "content": text}])
    while len(ids) > args.prompt:
        text = text[: int(len(text) * args.prompt / len(ids) * 0.99)]
        ids = engine.model.encode_chat([{"role": "user", "content": text}])
    figures = [run(engine, args.streams, ids, chunked) for chunked in (True, False)]
    engine.stop(timeout=60)
    for line in figures:
        print(json.dumps({"preset": args.preset, "dtype": args.dtype, "quantization": args.quantization, **line}))
    chunked, whole = figures
    print(json.dumps({"preset": args.preset, "chunked_p99_over_p50": chunked["p99_over_p50"],
                      "one_pass_p99_over_p50": whole["p99_over_p50"],
                      "longest_gap_chunked_over_one_pass": round(chunked["itl_max_ms"] / whole["itl_max_ms"], 3),
                      "long_prompt_ttft_chunked_over_one_pass":
                          round(chunked["long_prompt_ttft_s"] / whole["long_prompt_ttft_s"], 2)}))


if __name__ == "__main__":
    main()
