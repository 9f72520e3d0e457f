"""The answer time of a response-cache hit against a miss, through real gunicorn and Redis.

    python -m bench.cache [--questions 8] [--tokens 64] [--preset tiny|vibethinker-1.5b]

Starts the service with `cache = "user"` (tiny demo model by default; real
Redis on a unix socket), asks each of N different greedy questions twice, in
turns (miss, then hit), and prints one JSON line: the median wall time of a
miss and of a hit, and their ratio (the figure to compare across machines).
Each miss computes `--tokens` tokens (min_new_tokens is not exposed, so a
miss may stop earlier at an end token; the line reports the tokens computed).
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import requests

from bench.harness import cached_demo_model, start_service, stop_all
from tests.support.databases import start_redis
from tests.support.servers import free_port


def ask(base, auth, question, tokens):
    started = time.perf_counter()
    response = requests.post(base + "/v1/chat/completions", headers=auth, timeout=600, json={
        "model": "VibeThinker-1.5B", "messages": [{"role": "user", "content": question}], "max_tokens": tokens,
        "temperature": 0})
    elapsed = time.perf_counter() - started
    assert response.status_code == 200, response.text
    return elapsed, response.headers.get("x-cache"), response.json()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--preset", default="tiny", choices=["tiny", "vibethinker-1.5b"])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vibethinker-bench-"))
    procs = []
    try:
        model = cached_demo_model(args.preset)
        redis, uri = start_redis(work)
        procs.append(redis)
        port = free_port()
        proc, auth = start_service(work, model, port, ["--rate-limit", "100000/minute"], VIBE_CACHE="user",
                                   VIBE_RATELIMIT_STORAGE_URI=uri, VIBE_TORCH_THREADS="2",
                                   VIBE_MAX_NEW_TOKENS_LIMIT=str(max(2048, args.tokens)))
        procs.append(proc)
        base = f"http://127.0.0.1:{port}"
        ask(base, auth, "warm-up", 4)
        misses, hits, computed = [], [], []
        for i in range(args.questions):
            question = f"Question {i}: what is {i} squared?"
            miss, miss_header, answer = ask(base, auth, question, args.tokens)
            hit, hit_header, again = ask(base, auth, question, args.tokens)
            assert (miss_header, hit_header) == ("miss", "hit"), (miss_header, hit_header)
            assert again["choices"] == answer["choices"]
            misses.append(miss)
            hits.append(hit)
            computed.append(answer["usage"]["completion_tokens"])
        miss_s, hit_s = statistics.median(misses), statistics.median(hits)
        print(json.dumps({"bench": "cache", "preset": args.preset, "questions": args.questions,
                          "tokens_asked": args.tokens, "tokens_computed_median": statistics.median(computed),
                          "miss_ms_median": round(miss_s * 1000, 2), "hit_ms_median": round(hit_s * 1000, 2),
                          "miss_vs_hit": round(miss_s / hit_s, 1)}))
    finally:
        stop_all(procs, work)


if __name__ == "__main__":
    main()
