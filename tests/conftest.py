"""Shared fixtures: the tiny demo model, an in-process reference, and real gunicorn servers."""

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT / "bench"))  # the harness the benchmarks share: one free_port for both

from harness import free_port  # noqa: E402

# tests/gpu needs a GPU: `make test-gpu` runs it (VIBE_TEST_GPU=1); make test never collects it.
collect_ignore = [] if os.environ.get("VIBE_TEST_GPU") == "1" else ["gpu"]


def clean_env(**extra):
    """The environment without any VIBE_* variable of the caller's, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIBE_")}
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """The tiny random-weight model, built once per session by the real entry point."""
    out = tmp_path_factory.mktemp("models") / "tiny"
    subprocess.run([sys.executable, "-m", "service.demo_model", str(out), "--preset", "tiny"],
                   cwd=ROOT, check=True, capture_output=True, env=clean_env())
    return out


@pytest.fixture(scope="session")
def second_model(tmp_path_factory):
    """Another tiny model: the same tokenizer, weights from another seed, so its greedy answers differ."""
    out = tmp_path_factory.mktemp("models") / "tiny-seed1"
    subprocess.run([sys.executable, "-m", "service.demo_model", str(out), "--preset", "tiny", "--seed", "1"],
                   cwd=ROOT, check=True, capture_output=True, env=clean_env())
    return out


@pytest.fixture(scope="session")
def reference(tiny_model):
    """The same model loaded in this process, to compare the server's answers with."""
    from service.inference import model

    return model.load(str(tiny_model))


def greedy(loaded, messages, max_new_tokens):
    """Direct in-process greedy generate: (text, new ids)."""
    import torch

    ids = loaded.encode_chat(messages)
    inputs = torch.tensor([ids])
    with torch.inference_mode():
        out = loaded.model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs),
                                    max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=loaded.pad_id)
    new = out[0, len(ids):].tolist()
    return loaded.decode(new), new


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


class Server:
    """A real gunicorn serving the app on a loopback port, with its own state and an admin token."""

    def __init__(self, state_dir, env):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = state_dir / f"gunicorn-{self.port}.log"
        env.setdefault("VIBE_BIND", f"127.0.0.1:{self.port}")
        self.env = state_env(state_dir, VIBE_TORCH_THREADS=1, **env)
        self.token = provision(self.env)
        self.proc = None

    def start(self, timeout=90):
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


@pytest.fixture(scope="session")
def start_server(tmp_path_factory, tiny_model):
    """Builder: start_server(VIBE_SETTING=value, ...) -> a running Server; all stopped at the end."""
    servers = []

    def start(**env):
        if "VIBE_CONFIG" not in env:
            env.setdefault("VIBE_MODEL_PATH", tiny_model)
        # Answers come from the engine unless a test turns the response cache on (tests/test_cache_http.py):
        # a test that asks the same question twice means to compute it twice.
        env.setdefault("VIBE_CACHE", "off")
        server = Server(tmp_path_factory.mktemp("server"), env)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def server(start_server):
    """The default server: default settings, the tiny model."""
    return start_server()


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server for the session; `postgres.create_db(name)` gives a URL."""
    from tests.databases import Postgres

    server = Postgres().start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A fresh, empty database of each kind the store supports."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/db.sqlite"
    return request.getfixturevalue("postgres").create_db(f"t{abs(hash(str(tmp_path))) % 10**9}")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server for the session, on a unix socket."""
    from tests.databases import Redis

    server = Redis(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def long_question(reference):
    """A question whose greedy reply runs past 2048 tokens without an end token."""
    from service.settings import Settings

    system_prompt = Settings().default_system_prompt
    for question in ["Count to a thousand.", "hello there", "What is 2+2?", "Tell me a story"]:
        messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}]
        if not set(greedy(reference, messages, 2048)[1]) & reference.eos_ids:
            return question
    pytest.fail("no candidate question runs 2048 tokens without an end token")


def long_messages(question):
    """The conversation /predict builds for `question`: long_question runs 2048 tokens without an end."""
    from service.settings import Settings

    return [{"role": "system", "content": Settings().default_system_prompt}, {"role": "user", "content": question}]


PHASES = []


@contextlib.contextmanager
def phase(name):
    """Time a named phase of a long test; the durations are printed at the end of the run."""
    start = time.monotonic()
    try:
        yield
    finally:
        PHASES.append((name, time.monotonic() - start))


def pytest_terminal_summary(terminalreporter):
    if PHASES:
        terminalreporter.section("phase durations")
        for name, seconds in PHASES:
            terminalreporter.write_line(f"{seconds:8.1f} s  {name}")
