"""What the bench scripts share: a free port, the demo model, a running service with a token, slow clients."""

import os
import shutil
import socket
import ssl
import subprocess
import sys
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


def wait_ready(url, timeout=120):
    """Poll `url` until it answers 200 (or 405, for a POST-only route)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=2).status_code in (200, 405):
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready")


def build_demo_model(out, preset="tiny"):
    subprocess.run([sys.executable, "-m", "service.demo_model", str(out), "--preset", preset], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    return out


def cached_demo_model(preset):
    """The preset's random-weight model under var/, built on first use (the full size takes minutes and 3.1 GB)."""
    out = ROOT / "var" / ("bench-tiny" if preset == "tiny" else "bench-model")
    return out if (out / "config.json").is_file() else build_demo_model(out, preset)


def start_redis(work, *options):
    """A redis-server on a unix socket under `work`, as production runs it: (process, storage URI).
    `options`: more of redis-server's arguments (["--maxmemory", "2mb"])."""
    binary = shutil.which("redis-server")
    if not binary:
        raise SystemExit("redis-server is missing: install Debian's redis-server (make test does, as root)")
    sock = Path(work) / "redis.sock"
    proc = subprocess.Popen([binary, "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
                             "--save", "", "--appendonly", "no", "--dir", str(work), *options],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("redis-server did not start")
        time.sleep(0.05)
    return proc, f"redis+unix://{sock}"


def start_service(work, model_dir, port, user_options, **settings):
    """Real gunicorn on 127.0.0.1:port with state under `work`, and a token for user `bench`.

    `user_options` go to `vibethinker-admin users add bench`; `settings` are VIBE_* variables.
    Returns (process, Authorization headers).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIBE_")}
    env.update(VIBE_MODEL_PATH=str(model_dir), VIBE_DB_URL=f"sqlite:///{work}/db.sqlite",
               VIBE_JWT_KEY_DIR=str(work / "keys"), VIBE_BIND=f"127.0.0.1:{port}", **settings)

    def admin(*argv):
        return subprocess.run([str(BIN / "vibethinker-admin"), *argv], env=env, check=True, capture_output=True,
                              text=True).stdout.strip().splitlines()[-1]

    admin("keys", "generate")
    admin("users", "add", "bench", *user_options)
    token = admin("tokens", "issue", "bench")
    proc = subprocess.Popen([str(BIN / "gunicorn"), "-c", "service/gunicorn_conf.py", "service.app:create_app()"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_ready(f"http://127.0.0.1:{port}/readyz")
    return proc, {"Authorization": f"Bearer {token}"}


def stop_all(procs, work):
    """Stop the processes a bench started (the last started first) and remove its work folder."""
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=60)
    shutil.rmtree(work, ignore_errors=True)


class SlowBodies:
    """TLS connections to nginx on 127.0.0.1:`port` that each send a request's headers, declaring a large body,
    then one body byte every `every_s` seconds: the slow uploads that once held every app thread. Connection i
    comes from 127.0.0.(2 + i % addresses), so per-address limits see many clients. `requests` are (path,
    headers) pairs, used in turn."""

    def __init__(self, port, requests_, count, every_s=2.0, addresses=50, declared=10_000_000):
        self.port, self.requests, self.count, self.every_s = port, requests_, count, every_s
        self.addresses, self.declared, self.socks, self.dropped = addresses, declared, [], 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._trickle, daemon=True)

    def open(self):
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        for i in range(self.count):
            path, headers = self.requests[i % len(self.requests)]
            raw = socket.socket()
            raw.bind((f"127.0.0.{2 + i % self.addresses}", 0))
            raw.settimeout(10)
            raw.connect(("127.0.0.1", self.port))
            sock = context.wrap_socket(raw, server_hostname="localhost")
            lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: localhost\r\n{lines}"
                         f"Content-Length: {self.declared}\r\n\r\n".encode())
            self.socks.append(sock)
        self._thread.start()
        return self

    def _trickle(self):
        while not self._stop.wait(self.every_s):
            for sock in list(self.socks):
                try:
                    sock.sendall(b"x")
                except OSError:
                    self.socks.remove(sock)
                    self.dropped += 1

    @property
    def alive(self):
        return len(self.socks)

    def close(self):
        self._stop.set()
        self._thread.join(timeout=self.every_s + 5)
        for sock in self.socks:
            sock.close()


def slow_requests(auth):
    """The slow bodies that once held the app's threads: uploads and chat bodies, without a token and with
    `auth` (Authorization headers)."""
    multipart, json_body = {"Content-Type": "multipart/form-data; boundary=b"}, {"Content-Type": "application/json"}
    return [("/v1/files", multipart), ("/v1/files", {**multipart, **auth}),
            ("/v1/chat/completions", json_body), ("/v1/chat/completions", {**json_body, **auth})]


def probe_latencies(base, cert, token, seconds):
    """Durations of /healthz and an authenticated /v1/me, in turn, for `seconds`, on one kept-alive connection;
    each must answer 200."""
    durations, stop = [], time.monotonic() + seconds
    with requests.Session() as session:
        while time.monotonic() < stop:
            for path, headers in (("/healthz", {}), ("/v1/me", {"Authorization": f"Bearer {token}"})):
                started = time.monotonic()
                answer = session.get(base + path, headers=headers, verify=cert, timeout=15)
                durations.append(time.monotonic() - started)
                assert answer.status_code == 200, answer.text
    return durations


def p99(seconds):
    """The 99th percentile of a list of durations."""
    ordered = sorted(seconds)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
