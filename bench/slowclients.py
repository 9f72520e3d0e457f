"""What slow clients cost the others: p99 of /healthz and /v1/me through nginx, without and with slow bodies.

    python -m bench.slowclients [--slow 100] [--seconds 8]

Starts real Redis, gunicorn (tiny demo model, default threads) and nginx
(the project's template, a certificate made here), then, side by side in one
run, times a client asking /healthz and an authenticated /v1/me in turn:
first alone, then while `--slow` connections from 50 loopback addresses
(half without a token, half with one; uploads and chat bodies) each send
their headers and then one body byte every 2 s. Prints one JSON line; the
ratio of the two p99s is the figure to compare across machines.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench.harness import build_demo_model, start_service, stop_all
from tests.support.databases import start_redis
from tests.support.nginx import Nginx, make_certificate, render  # the tests' own nginx set-up
from tests.support.servers import free_port
from tests.support.slowclients import SlowBodies, p99, probe_latencies, slow_requests


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--slow", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vibethinker-bench-"))
    work.chmod(0o755)
    procs, nginx = [], None
    try:
        model_dir = build_demo_model(work / "model")
        redis, storage = start_redis(work)
        procs.append(redis)
        port = free_port()
        proc, auth = start_service(work, model_dir, port, [], VIBE_RATELIMIT_STORAGE_URI=storage,
                                   VIBE_PROXY_FIX_HOPS="1", VIBE_TORCH_THREADS="1")
        procs.append(proc)
        token = auth["Authorization"].removeprefix("Bearer ")
        cert, key = make_certificate(work)
        https_port = free_port()
        nginx = Nginx(work, render(server_name="localhost", http_port=free_port(), https_port=https_port,
                                   listen_address="127.0.0.1", app_servers=[f"127.0.0.1:{port}"], cert_path=cert,
                                   key_path=key, max_body_bytes=65536, proxy_read_timeout_s=90,
                                   req_rate="1000r/s", req_burst=1000, conn_limit=20,
                                   metrics_allow=["127.0.0.1"], admin_allow=["127.0.0.1"]),
                      connections=4 * args.slow + 64).start()
        base = f"https://localhost:{https_port}"
        alone = probe_latencies(base, str(cert), token, args.seconds)
        slow = SlowBodies(https_port, slow_requests(auth), args.slow, declared=60_000).open()
        try:
            time.sleep(3)
            loaded = probe_latencies(base, str(cert), token, args.seconds)
            held = slow.alive
        finally:
            slow.close()
        figures = {"p99_ms_alone": round(p99(alone) * 1000, 1), "p99_ms_with_slow": round(p99(loaded) * 1000, 1),
                   "requests_alone": len(alone), "requests_with_slow": len(loaded), "slow_held": held}
        figures["p99_ratio"] = round(figures["p99_ms_with_slow"] / figures["p99_ms_alone"], 2)
        print(json.dumps({"bench": "slowclients", "slow": args.slow, "seconds": args.seconds, **figures}))
    finally:
        if nginx is not None:
            nginx.stop()
        stop_all(procs, work)


if __name__ == "__main__":
    main()
