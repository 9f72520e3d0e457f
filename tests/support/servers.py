"""Real gunicorn servers on loopback: a free port, a clean environment, the admin CLI, and `Server`."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent.parent
BIN = Path(sys.executable).parent


def free_port():
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(**extra):
    """The environment without any VIBE_* variable of the caller's, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIBE_")}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def unix_get(socket_path, path):
    """GET over a unix socket: (status, body)."""
    import http.client

    class UnixConnection(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(2)
            self.sock.connect(socket_path)

    conn = UnixConnection("localhost")
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def admin_cli(env, *args, check=True):
    """Run the real vibethinker-admin with `env`; the CompletedProcess."""
    proc = subprocess.run([str(BIN / "vibethinker-admin"), *map(str, args)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        pytest.fail(f"vibethinker-admin {' '.join(map(str, args))} failed: {proc.stderr}")
    return proc


def state_env(state_dir, **extra):
    """Settings for a fresh database and key folder under `state_dir`."""
    return clean_env(**{"VIBE_DB_URL": f"sqlite:///{state_dir}/vibethinker.db", "VIBE_JWT_KEY_DIR": state_dir / "keys",
                        "VIBE_FILES_DIR": state_dir / "files", **extra})


def provision(env):
    """Keys, an admin user, and a token with both scopes for it, made by the real CLI."""
    admin_cli(env, "keys", "generate")
    # generous limits: tests about limits make users of their own
    admin_cli(env, "users", "add", "root", "--admin", "--rate-limit", "100000/minute", "--daily-tokens", 10**9,
              "--max-concurrent", 100)
    return admin_cli(env, "tokens", "issue", "root", "--scope", "generate,admin", "--label", "tests")\
        .stdout.strip().splitlines()[-1]


STARTED = []  # every Server started, in order: a module's own are stopped when it ends (tests/conftest.py)


class Server:
    """A real gunicorn serving the app on a loopback port, with its own state and an admin token; `keep` when
    it serves the whole session."""

    keep = False  # True: serves the whole session (a subclass that makes its own state need not set it)

    def __init__(self, state_dir, env, keep=False):
        self.keep = keep
        bind = env.get("VIBE_BIND", "")  # a loopback port chosen by the caller (another server names it)
        self.port = int(bind.removeprefix("127.0.0.1:")) if bind.startswith("127.0.0.1:") else free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = state_dir / f"gunicorn-{self.port}.log"
        env.setdefault("VIBE_BIND", f"127.0.0.1:{self.port}")
        self.env = state_env(state_dir, VIBE_TORCH_THREADS=1, **env)
        self.token = provision(self.env)
        self.proc = None

    def start(self, timeout=90):
        if self not in STARTED:
            STARTED.append(self)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [str(BIN / "gunicorn"), "-c", "service/gunicorn_conf.py", "service.app:create_app()"],
                cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"gunicorn exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.ready():
                    return self
            except (requests.ConnectionError, requests.Timeout, OSError):  # still importing torch
                pass
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"gunicorn not ready after {timeout} s:\n{self.log()}")

    def ready(self):
        bind = self.env["VIBE_BIND"]
        if bind.startswith("unix:"):
            return unix_get(bind.removeprefix("unix:"), "/readyz")[0] == 200
        return requests.get(self.url("/readyz"), timeout=2).status_code == 200

    def url(self, path):
        return self.base + path

    def auth(self, token=None):
        return {"Authorization": f"Bearer {token or self.token}"}

    def request(self, method, path, body=None, token=None, headers=None, **kwargs):
        """An HTTP call carrying the admin token (or `token`)."""
        kwargs.setdefault("timeout", 60)
        return requests.request(method, self.url(path), json=body, headers={**self.auth(token), **(headers or {})},
                                **kwargs)

    def post(self, path, body=None, **kwargs):
        return self.request("POST", path, body, **kwargs)

    def get(self, path, **kwargs):
        return self.request("GET", path, **kwargs)

    def cli(self, *args, check=True):
        return admin_cli(self.env, *args, check=check)

    def restart(self):
        self.stop()
        return self.start()

    def log(self):
        return self.log_path.read_text(errors="replace")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
