"""Shared fixtures: the tiny demo model, an in-process reference, and real gunicorn servers."""

import os
import subprocess
import sys

import pytest

from tests.support.databases import Postgres, Redis
from tests.support.phases import PHASES
from tests.support.reference import greedy
from tests.support.servers import ROOT, STARTED, Server, clean_env
from tests.support.thinking import FORCED

# tests/gpu needs a GPU: `make test-gpu` runs it (VIBE_TEST_GPU=1); make test never collects it.
collect_ignore = [] if os.environ.get("VIBE_TEST_GPU") == "1" else ["gpu"]


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


@pytest.fixture(scope="session")
def start_server(tmp_path_factory, tiny_model):
    """Builder: start_server(VIBE_SETTING=value, ...) -> a running Server; all stopped at the end."""
    servers = []

    def start(keep=False, **env):
        if "VIBE_CONFIG" not in env:
            env.setdefault("VIBE_MODEL_PATH", tiny_model)
        # Answers come from the engine unless a test turns the response cache on (tests/test_cache_http.py):
        # a test that asks the same question twice means to compute it twice.
        env.setdefault("VIBE_CACHE", "off")
        server = Server(tmp_path_factory.mktemp("server"), env, keep)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def server(start_server):
    """The default server: default settings, the tiny model."""
    return start_server(keep=True)


@pytest.fixture(scope="module", autouse=True)
def stop_the_modules_servers():
    """The servers a test module started (in its fixtures or its tests) stop when the module ends: each holds
    a model and an engine thread (about 0.5 GB and a little CPU idle), and there are dozens in a session."""
    before = len(STARTED)
    yield
    for started in STARTED[before:]:
        if not started.keep:
            started.stop()


@pytest.fixture(scope="session")
def thinking_server(start_server):
    """A server whose demo model's reply is known (tests.support.thinking): the real engine runs every step,
    with its choice of token forced; an answer check has 2 s."""
    return start_server(keep=True, VIBE_FORCED_OUTPUT=FORCED, VIBE_ANSWER_CHECK_TIMEOUT_S=2)


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server for the session; `postgres.create_db(name)` gives a URL."""
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
    with Redis(tmp_path_factory.mktemp("redis")).start() as server:
        yield server


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


def pytest_terminal_summary(terminalreporter):
    if PHASES:
        terminalreporter.section("phase durations")
        for name, seconds in PHASES:
            terminalreporter.write_line(f"{seconds:8.1f} s  {name}")
