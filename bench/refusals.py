"""The cost of refusing: requests per second that real gunicorn answers with 401 and 429.

    python bench/refusals.py [--seconds 5] [--clients 8]

Starts the service (tiny demo model, real Redis on a unix socket when
redis-server is installed, else memory://) and, side by side in one run,
drives /healthz (no auth: the floor of the stack), requests without a token
(401), and requests of a user past its rate limit (429). Prints one JSON line;
the ratios to /healthz are the figures to compare across machines.
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
        subprocess.run([sys.executable, "-m", "service.demo_model", str(work / "model")], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
        storage = "memory://"
        if shutil.which("redis-server"):
            procs.append(subprocess.Popen(["redis-server", "--port", "0", "--unixsocket", str(work / "redis.sock"),
                                           "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL))
            while not (work / "redis.sock").exists():
                time.sleep(0.05)
            storage = f"redis+unix://{work / 'redis.sock'}"
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("VIBE_")}
        env.update(VIBE_MODEL_PATH=str(work / "model"), VIBE_DB_URL=f"sqlite:///{work}/db.sqlite",
                   VIBE_JWT_KEY_DIR=str(work / "keys"), VIBE_BIND=f"127.0.0.1:{port}",
                   VIBE_RATELIMIT_STORAGE_URI=storage, VIBE_ANONYMOUS_RATE_LIMIT="100000000/minute",
                   VIBE_HTTP_THREADS=str(args.clients), VIBE_TORCH_THREADS="1")

        def admin(*argv):
            return subprocess.run([str(BIN / "vibethinker-admin"), *argv], env=env, check=True,
                                  capture_output=True, text=True).stdout.strip().splitlines()[-1]

        admin("keys", "generate")
        admin("users", "add", "slow", "--rate-limit", "1/hour")
        token = admin("tokens", "issue", "slow")
        procs.append(subprocess.Popen([str(BIN / "gunicorn"), "-c", "service/gunicorn_conf.py",
                                       "service.app:create_app()"], cwd=ROOT, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        base = f"http://127.0.0.1:{port}"
        while True:
            try:
                if requests.get(base + "/readyz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.2)
        body = {"question": "hi", "max_new_tokens": 1}
        auth = {"Authorization": f"Bearer {token}"}
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
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
