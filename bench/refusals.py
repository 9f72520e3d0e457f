"""The cost of refusing: requests per second that real gunicorn answers with 401 and 429.

    python -m bench.refusals [--seconds 5] [--clients 8]

Starts the service (tiny demo model, real Redis on a unix socket when
redis-server is installed, else memory://) and, side by side in one run,
drives /healthz (no auth: the floor of the stack), requests without a token
(401), and requests of a user past its rate limit (429). Prints one JSON line;
the ratios to /healthz are the figures to compare across machines.
"""

import argparse
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import requests

from bench.harness import build_demo_model, start_service, stop_all
from tests.support.databases import start_redis
from tests.support.servers import free_port


def drive(url, headers, body, seconds, clients, expect):
    """Requests per second over `seconds` from `clients` threads, each on a keep-alive session."""
    counts, stop = [0] * clients, time.monotonic() + seconds

    def client(i):
        with requests.Session() as session:
            while time.monotonic() < stop:
                response = session.request("POST" if body else "GET", url, json=body, headers=headers, timeout=30)
                assert response.status_code == expect, response.text
                counts[i] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return round(sum(counts) / seconds, 1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vibethinker-bench-"))
    procs = []
    try:
        model_dir = build_demo_model(work / "model")
        storage = "memory://"
        if shutil.which("redis-server"):
            redis, storage = start_redis(work)
            procs.append(redis)
        port = free_port()
        proc, auth = start_service(work, model_dir, port, ["--rate-limit", "1/hour"],
                                   VIBE_RATELIMIT_STORAGE_URI=storage,
                                   VIBE_ANONYMOUS_RATE_LIMIT="100000000/minute",
                                   VIBE_HTTP_THREADS=str(args.clients), VIBE_TORCH_THREADS="1")
        procs.append(proc)
        base = f"http://127.0.0.1:{port}"
        body = {"question": "hi", "max_new_tokens": 1}
        assert requests.post(base + "/predict", json=body, headers=auth, timeout=30).status_code == 200
        figures = {
            "healthz_rps": drive(base + "/healthz", {}, None, args.seconds, args.clients, 200),
            "no_token_401_rps": drive(base + "/predict", {}, body, args.seconds, args.clients, 401),
            "over_limit_429_rps": drive(base + "/predict", auth, body, args.seconds, args.clients, 429),
        }
        figures["no_token_vs_healthz"] = round(figures["no_token_401_rps"] / figures["healthz_rps"], 2)
        figures["over_limit_vs_healthz"] = round(figures["over_limit_429_rps"] / figures["healthz_rps"], 2)
        print(json.dumps({"bench": "refusals", "storage": storage.split(":")[0], "clients": args.clients,
                          "seconds": args.seconds, **figures}))
    finally:
        stop_all(procs, work)


if __name__ == "__main__":
    main()
