"""Real-size speed: the service against llama.cpp and the seed-style server on the same weights.

    python -m bench.realsize [--tokens 64] [--rounds 3] [--clients 1,4,16] [--threads 2]

On the `vibethinker-1.5b` preset (random weights of VibeThinker-1.5B's shape,
built into var/bench-model on first use), with the same threads for all:
- the service through HTTP (real gunicorn, Redis, auth, limits, filters, the
  batching engine), int8 (a pre-converted folder) and bfloat16, at each client
  count: aggregate completion tokens/s end to end (prefill included), and its
  engine's own decode rate at the batch size it ran (/readyz, sampled while
  the clients ran: one row's tokens/s times the rows);
- the seed-style server (bench/seed_app.py, float32 `generate` per request),
  one client, one request;
- llama.cpp (bench/llamacpp.py: built once under var/llama, the same folder
  converted to GGUF): batch-1 decode (llama-bench) for Q8_0 on its AMX build
  and BF16, and 16-sequence decode and prefill (llama-batched-bench, no-AMX
  build, as its AMX path crashes on batches here) for Q8_0 and BF16.
Everyone takes turns, round after round; each figure is the median of the
rounds. One JSON line per engine and mode, then one with the issue's goals.
"""

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import threading
from pathlib import Path
from urllib.parse import urlsplit

import requests

from bench import llamacpp
from bench.harness import cached_demo_model, start_service, stop_all, wait_ready
from bench.throughput import chat_question, goal, load
from tests.support.databases import start_redis
from tests.support.servers import BIN, ROOT, free_port


def int8_folder(model_dir):
    out = model_dir.with_name(model_dir.name + "-int8")
    subprocess.run([str(BIN / "vibethinker-admin"), "model", "convert", str(model_dir), str(out),
                    "--quantization", "int8"], cwd=ROOT, check=True, capture_output=True)
    return out


def clients_run(url, headers, clients, tokens, body_of):
    """(aggregate completion tokens/s of one request per client, the engine's decode tokens/s at its batch size
    sampled from /readyz while every client is in the batch; None for a server without /readyz's figure)."""
    where, rates, done = urlsplit(url), [], threading.Event()

    def sample():
        while not done.wait(0.5):
            try:
                ready = requests.get(f"{where.scheme}://{where.netloc}/readyz", timeout=5).json()
            except (requests.RequestException, ValueError):
                continue
            if ready.get("decode_batch_size") == clients and ready.get("decode_tokens_per_s"):
                rates.append(ready["decode_tokens_per_s"] * clients)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        total = load(url, headers, clients, 1, tokens, body_of)
    finally:
        done.set()
        sampler.join()
    return total, (statistics.median(rates) if rates else None)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--no-llama", action="store_true", help="leave llama.cpp out")
    args = parser.parse_args()
    clients = [int(n) for n in args.clients.split(",")]
    model_dir = cached_demo_model("vibethinker-1.5b")
    ggufs = {} if args.no_llama else {kind: llamacpp.gguf(model_dir, kind) for kind in ("bf16", "q8_0")}
    work = Path(tempfile.mkdtemp(prefix="vibethinker-realsize-"))
    procs = []
    try:
        redis, storage = start_redis(work)
        procs.append(redis)
        services = {}
        for mode, folder, settings in (("int8", int8_folder(model_dir), {"VIBE_QUANTIZATION": "int8"}),
                                       ("bfloat16", model_dir, {"VIBE_DTYPE": "bfloat16"})):
            port = free_port()
            (work / mode).mkdir()
            proc, headers = start_service(
                work / mode, folder, port, ["--rate-limit", "1000000/minute", "--daily-tokens", str(10**12),
                                            "--max-concurrent", "100"],
                VIBE_HTTP_THREADS="32", VIBE_QUEUE_SIZE="64", VIBE_RATELIMIT_STORAGE_URI=storage,
                VIBE_TORCH_THREADS=str(args.threads), VIBE_REQUEST_DEADLINE_S="3600",
                VIBE_MAX_NEW_TOKENS_LIMIT=str(max(2048, args.tokens)), **settings)
            procs.append(proc)
            services[mode] = (f"http://127.0.0.1:{port}/v1/chat/completions", headers)
        seed_port = free_port()
        env = {**os.environ, "SEED_MODEL_PATH": str(model_dir), "SEED_THREADS": str(args.threads)}
        procs.append(subprocess.Popen([str(BIN / "gunicorn"), "-w", "1", "-k", "sync", "-t", "3600", "-b",
                                       f"127.0.0.1:{seed_port}", "--chdir", str(ROOT / "bench"), "seed_app:app"],
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_ready(f"http://127.0.0.1:{seed_port}/predict", timeout=600)
        body = chat_question("VibeThinker-1.5B")
        for url, headers in services.values():  # warm-up: the first request pages the weights in
            clients_run(url, headers, 1, 4, body)
        runs = {}

        def note(key, value):
            runs.setdefault(key, []).append(value)

        for _ in range(args.rounds):
            for mode, (url, headers) in services.items():
                for n in clients:
                    total, decode = clients_run(url, headers, n, args.tokens, body)
                    note(("service", mode, n, "tok_s"), total)
                    if decode is not None:
                        note(("service", mode, n, "engine_decode_tok_s"), decode)
            note(("seed", "float32", 1, "tok_s"), clients_run(
                f"http://127.0.0.1:{seed_port}/predict", {}, 1, args.tokens,
                lambda i, j, t: {"question": body(i, j, t)["messages"][0]["content"], "max_new_tokens": t})[0])
            for kind, path in ggufs.items():
                if kind == "q8_0":
                    note(("llama.cpp", kind, 1, "tok_s"), llamacpp.decode_batch1(path, "amx", args.threads))
                note(("llama.cpp", kind, 1, "tok_s_noamx"), llamacpp.decode_batch1(path, "noamx", args.threads))
                figures = llamacpp.batched(path, args.threads, sequences=16)
                note(("llama.cpp", kind, 16, "decode_tok_s"), figures["decode_tok_s"])
                note(("llama.cpp", kind, 16, "prefill_tok_s"), figures["prefill_tok_s"])
        median = {key: round(statistics.median(values), 2) for key, values in runs.items()}
        lines = {}
        for (engine, mode, n, name), value in sorted(median.items(), key=str):
            lines.setdefault((engine, mode), {})[f"{name}_{n}"] = value
        for (engine, mode), figures in lines.items():
            print(json.dumps({"bench": "realsize", "engine": engine, "mode": mode, "tokens": args.tokens,
                              "rounds": args.rounds, "threads": args.threads, **figures}))
        if ggufs:
            ours8, oursbf = lines[("service", "int8")], lines[("service", "bfloat16")]
            l8, lbf = lines[("llama.cpp", "q8_0")], lines[("llama.cpp", "bf16")]
            best8 = max(l8["tok_s_1"], l8["tok_s_noamx_1"])
            at16 = max(clients)
            ratios = {
                "batch1_int8_over_llama_q8_0": round(ours8["tok_s_1"] / best8, 2),
                "batch1_bf16_over_llama_bf16": round(oursbf["tok_s_1"] / lbf["tok_s_noamx_1"], 2),
                "at16_int8_engine_decode_over_llama_q8_0": round(
                    ours8.get(f"engine_decode_tok_s_{at16}", 0) / l8["decode_tok_s_16"], 2),
                "at16_bf16_engine_decode_over_llama_bf16": round(
                    oursbf.get(f"engine_decode_tok_s_{at16}", 0) / lbf["decode_tok_s_16"], 2),
                "at16_int8_http_end_to_end_over_llama_q8_0_decode": round(
                    ours8[f"tok_s_{at16}"] / l8["decode_tok_s_16"], 2),
            }
            print(json.dumps({"bench": "realsize_goals", **ratios, "goals": {
                "batch1_int8_over_llama_q8_0": goal(ratios["batch1_int8_over_llama_q8_0"], 1.0),
                "batch1_bf16_over_llama_bf16": goal(ratios["batch1_bf16_over_llama_bf16"], 1.0),
                "at16_int8_engine_decode_over_llama_q8_0": goal(ratios["at16_int8_engine_decode_over_llama_q8_0"], 1.5),
                "at16_bf16_engine_decode_over_llama_bf16": goal(ratios["at16_bf16_engine_decode_over_llama_bf16"], 1.5),
            }}))
    finally:
        stop_all(procs, work)


if __name__ == "__main__":
    main()
