"""Batch jobs against the same questions sent one after another, and interactive time to first token with
and without a batch running.

    python -m bench.batches [--preset tiny|vibethinker-1.5b] [--dtype float32|bfloat16] [--lines 32]
                            [--tokens 64] [--probes 8]

Starts the service (real gunicorn, memory:// counters) on the preset's random-weight model and, side by
side in one run, measures:

- `sequential_s`: the `--lines` questions sent one after another as whole answers;
- `batch_s`: the same questions as one batch (upload to completed, polled every 0.1 s);
- `ttft_idle_s` / `ttft_during_batch_s`: the median time to the first streamed token of `--probes`
  interactive streams, with nothing else running, then while a batch of `--lines` long lines runs;
- `seed_example`: the seed's own example, `POST /predict {"question": "Solve for x: x^2 - 5x + 6 = 0"}`,
  with the default whole-answer deadline (60 s) and `max_new_tokens` default (512), after the engine has
  measured its speed: its status, seconds, tokens and finish reason.

Prints one JSON line; the ratios (`batch_speedup`, `ttft_ratio`) are the figures to compare.
"""

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import requests

from bench.harness import cached_demo_model, start_service
from tests.support.servers import free_port

MODEL = "VibeThinker-1.5B"


def question(i):
    return f"Solve for x: x^2 - {i + 2}x + {i + 1} = 0"


def body(i, tokens):
    return {"model": MODEL, "messages": [{"role": "user", "content": question(i)}], "max_tokens": tokens,
            "temperature": 0}


def run_batch(base, headers, lines, tokens):
    items = "".join(json.dumps({"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": body(i, tokens)}) + "\n" for i in range(lines))
    started = time.monotonic()
    upload = requests.post(f"{base}/v1/files", headers=headers, timeout=60, data={"purpose": "batch"},
                           files={"file": ("q.jsonl", io.BytesIO(items.encode()))}).json()
    batch = requests.post(f"{base}/v1/batches", headers=headers, timeout=60, json={
        "input_file_id": upload["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}).json()
    return batch["id"], started


def wait_batch(base, headers, batch_id):
    while True:
        batch = requests.get(f"{base}/v1/batches/{batch_id}", headers=headers, timeout=60).json()
        if batch["status"] in ("completed", "failed", "cancelled", "expired"):
            assert batch["status"] == "completed" and batch["request_counts"]["completed"] > 0, batch
            return batch
        time.sleep(0.1)


def ttft(base, headers, probes):
    times = []
    for i in range(probes):
        started = time.monotonic()
        with requests.post(f"{base}/v1/chat/completions", headers=headers, stream=True, timeout=600,
                           json={**body(i, 4), "stream": True}) as response:
            for line in response.iter_lines():
                if line.startswith(b"data: {") and b'"content":"' in line and b'"content":""' not in line:
                    times.append(time.monotonic() - started)
                    break
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "vibethinker-1.5b"])
    parser.add_argument("--lines", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--probes", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    model = cached_demo_model(args.preset)
    with tempfile.TemporaryDirectory() as work:
        port = free_port()
        proc, headers = start_service(Path(work), model, port, ["--rate-limit", "100000/minute", "--daily-tokens",
                                                                 "1000000000", "--max-concurrent", "64"],
                                      VIBE_LOG_LEVEL="warning", VIBE_DTYPE=args.dtype, VIBE_MAX_NEW_TOKENS_LIMIT="4096")
        base = f"http://127.0.0.1:{port}"
        try:
            requests.post(f"{base}/v1/chat/completions", headers=headers, json=body(0, 8), timeout=600)  # warm
            started = time.monotonic()
            seed = requests.post(f"{base}/predict", headers=headers, timeout=600,
                                 json={"question": "Solve for x: x^2 - 5x + 6 = 0"})
            seed_example = {"status": seed.status_code, "seconds": round(time.monotonic() - started, 1),
                            **({"completion_tokens": seed.json()["usage"]["completion_tokens"],
                                "finish_reason": seed.json()["finish_reason"]} if seed.status_code == 200 else
                               {"error": seed.json()["error"]["code"]})}
            started = time.monotonic()
            for i in range(args.lines):
                response = requests.post(f"{base}/v1/chat/completions", headers=headers, timeout=3600,
                                         json=body(i, args.tokens))
                assert response.status_code == 200, response.text
            sequential = time.monotonic() - started
            batch_id, started = run_batch(base, headers, args.lines, args.tokens)
            wait_batch(base, headers, batch_id)
            batched = time.monotonic() - started
            idle = ttft(base, headers, args.probes)
            batch_id, _ = run_batch(base, headers, args.lines, args.tokens * 8)
            time.sleep(1.0)  # the batch is running
            during = ttft(base, headers, args.probes)
            requests.post(f"{base}/v1/batches/{batch_id}/cancel", headers=headers, timeout=60)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    print(json.dumps({"preset": args.preset, "lines": args.lines, "tokens": args.tokens,
                      "sequential_s": round(sequential, 2), "batch_s": round(batched, 2),
                      "batch_speedup": round(sequential / batched, 2), "ttft_idle_s": round(idle, 4),
                      "ttft_during_batch_s": round(during, 4), "ttft_ratio": round(during / idle, 2),
                      "seed_example": seed_example}))


if __name__ == "__main__":
    main()
