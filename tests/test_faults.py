"""Faults against the real stack: a broken model, a worker killed during load, Redis restarted during load.

Each asserts exact numbers: every answer a client got has its usage row, the dead worker's slots and
reservations come back when the next worker starts, only shaped errors while a part is down.
"""

import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import psutil
import pytest
import requests

from auth.store import Store
from tests.support.databases import Redis
from tests.support.load import Load
from tests.support.nginx import Nginx, make_certificate, render
from tests.support.tokens import user_token

pytestmark = pytest.mark.slow
MODEL = "VibeThinker-1.5B"


def usage_rows(server, user=None):
    store = Store(server.env["VIBE_DB_URL"], upgrade=False)
    try:
        return store.usage_rows(user, limit=100_000)
    finally:
        store.close()


# --- a model that fails: one row's failure is that row's alone ------------------------------------------------

@pytest.fixture(scope="module")
def broken(start_server, tiny_model, tmp_path_factory):
    """The tiny model with NaN final-norm weights (a corrupted checkpoint): every logit is NaN, so sampling
    fails in the engine, while greedy decoding still picks a token."""
    import torch
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("broken") / "model"
    shutil.copytree(tiny_model, out)
    weights = out / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.norm.weight"] = torch.full_like(tensors["model.norm.weight"], float("nan"))
    save_file(tensors, weights, metadata={"format": "pt"})
    return start_server(VIBE_MODEL_PATH=out)


def chat(server, request_id, temperature, stream=False, max_tokens=8):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
            "temperature": temperature, "stream": stream}
    return requests.post(server.url("/v1/chat/completions"), json=body, stream=stream, timeout=60,
                         headers={**server.auth(), "X-Request-ID": request_id})


def test_a_failed_row_fails_alone_among_concurrent_requests(broken):
    results = {}

    def one(i):
        temperature = 1.0 if i % 2 else 0.0
        results[i] = (temperature, chat(broken, f"mixed-{i}", temperature))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    greedy = [r for t, r in results.values() if t == 0.0]
    sampled = [r for t, r in results.values() if t == 1.0]
    assert [r.status_code for r in greedy] == [200] * 6
    assert [r.status_code for r in sampled] == [500] * 6
    assert all(r.json()["error"]["code"] == "internal_error" for r in sampled)
    assert "probability" not in sampled[0].text  # no exception text reaches a client
    rows = {r["request_id"]: r for r in usage_rows(broken)}
    assert sorted(rows[f"mixed-{i}"]["status"] for i in range(12)) == [200] * 6 + [500] * 6


def test_an_engine_failure_ends_the_stream_with_an_error_event_and_a_500_row(broken):
    response = chat(broken, "engine-fails-stream", 1.0, stream=True)
    assert response.status_code == 200  # the stream had begun: the failure is its last event
    events = [line.removeprefix(b"data: ") for line in response.iter_lines() if line.startswith(b"data: ")]
    error = json.loads(events[-2])["error"]
    assert events[-1] == b"[DONE]" and error["code"] == "internal_error" and error["type"] == "server_error"
    assert "engine-fails-stream" in error["message"] and "multinomial" not in error["message"]
    time.sleep(0.3)
    [row] = [r for r in usage_rows(broken, "root") if r["request_id"] == "engine-fails-stream"]
    assert row["status"] == 500 and row["completion_tokens"] == 0


# --- kill -9 of the worker during load, through nginx ---------------------------------------------------------

@pytest.fixture
def fronted(start_server, tmp_path_factory):
    """Real nginx before a real gunicorn on a unix socket, with its own Redis; yields (nginx, app, redis)."""
    redis = Redis(tmp_path_factory.mktemp("redis-kill")).start()
    folder = Path(tempfile.mkdtemp(prefix="vibethinker-kill-"))
    os.chmod(folder, 0o755)
    sock = folder / "gunicorn.sock"
    app = start_server(VIBE_BIND=f"unix:{sock}", VIBE_PROXY_FIX_HOPS=1, VIBE_RATELIMIT_STORAGE_URI=redis.uri)
    cert, key = make_certificate(folder)
    https_port = _port()
    site = render(server_name="localhost", http_port=_port(), https_port=https_port, listen_address="127.0.0.1",
                  socket_path=sock, cert_path=cert, key_path=key, max_body_bytes=65536, proxy_read_timeout_s=90,
                  req_rate="1000r/s", req_burst=1000, conn_limit=200, metrics_allow=["127.0.0.1"],
                  admin_allow=["127.0.0.1"])
    nginx = Nginx(folder, site).start()
    nginx.https, nginx.cert = f"https://localhost:{https_port}", str(cert)
    yield nginx, app, redis
    nginx.stop()
    app.stop()
    redis.stop()
    shutil.rmtree(folder, ignore_errors=True)


def _port():
    from tests.support.servers import free_port

    return free_port()


def worker_of(app):
    [worker] = psutil.Process(app.proc.pid).children()
    return worker


def test_kill_9_of_the_worker_during_load(fronted, long_question):
    import redis as redis_client

    nginx, app, redis = fronted
    capped = user_token(app, "capped", "--max-concurrent", "1", "--daily-tokens", "1000000", "--rate-limit", "10000/minute")

    def ask(session, request_id, token=app.token, tokens=None):
        # No max_new_tokens by default: the server sizes each answer to what fits its deadline at the speed it
        # measures (up to 512 tokens, many seconds here), so no request is refused on a slow or busy machine.
        body = {"question": long_question, "temperature": 0} | ({"max_new_tokens": tokens} if tokens else {})
        return session.post(nginx.https + "/predict", verify=nginx.cert, timeout=120, json=body,
                            headers={"Authorization": f"Bearer {token}", "X-Request-ID": request_id})

    first = worker_of(app)
    with Load(5, ask) as load, Load(1, lambda s, rid: ask(s, rid, capped)) as capped_load:
        # Every client mid-generation: all six running, then killed at once (a fixed sleep could land as an
        # answer ends, after its budget is settled and before its usage row is committed)
        deadline = time.monotonic() + 30
        while requests.get(nginx.https + "/readyz", verify=nginx.cert, timeout=10).json().get("running", 0) < 6:
            assert time.monotonic() < deadline, "the six clients never ran together"
            time.sleep(0.05)
        time.sleep(0.2)
        first.kill()
        first.wait(10)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            ready = requests.get(nginx.https + "/readyz", verify=nginx.cert, timeout=10)
            if ready.status_code == 200:
                break
            time.sleep(0.2)
        assert ready.status_code == 200, ready.text
        time.sleep(1.0)
    assert worker_of(app).pid != first.pid

    outcomes = load.outcomes + capped_load.outcomes
    cut = [o for o in outcomes if o[3] < o[4] and o[1] == 502]
    assert cut, "no request was in flight when the worker died"
    for _, status, text, *_ in cut:
        assert json.loads(text)["error"]["code"] == "bad_gateway"
    assert {o[1] for o in outcomes} <= {200, 502, 503}, [o[:3] for o in outcomes if o[1] not in (200, 502, 503)]
    for _, status, text, *_ in outcomes:
        if status == 503:
            assert json.loads(text)["error"]["code"] == "model_loading"

    # Every answer a client received has its usage row.
    rows = usage_rows(app)
    delivered = {o[0] for o in outcomes if o[1] == 200}
    assert delivered <= {r["request_id"] for r in rows if r["status"] == 200}

    # The dead worker's slot and reservation came back: a user capped at 1 generates again at once.
    again = ask(requests.Session(), "capped-again", capped, tokens=4)
    assert again.status_code == 200, again.text
    budget = redis_client.Redis(unix_socket_path=str(redis.sock))
    spent = int(budget.get(f"vibethinker:budget:capped:{datetime.now(timezone.utc):%Y-%m-%d}"))
    counted = sum(r["prompt_tokens"] + r["completion_tokens"] for r in usage_rows(app, "capped"))
    assert spent == counted  # only what was computed and delivered; no lost reservation
    assert not budget.zcard("vibethinker:inflight:capped")


# --- Redis restarted during load --------------------------------------------------------------------------------

@pytest.mark.parametrize("fail_open", [False, True])
def test_redis_restarted_during_load(start_server, tmp_path_factory, fail_open):
    redis = Redis(tmp_path_factory.mktemp("redis-restart")).start()
    server = start_server(VIBE_RATELIMIT_STORAGE_URI=redis.uri, VIBE_RATELIMIT_FAIL_OPEN=str(fail_open).lower())
    exact = user_token(server, "exact", "--rate-limit", "5/minute")

    def ask(session, request_id, token=server.token):
        return session.post(server.url("/predict"), json={"question": "hi", "max_new_tokens": 4}, timeout=60,
                            headers={"Authorization": f"Bearer {token}", "X-Request-ID": request_id})

    try:
        with Load(4, ask) as load:
            time.sleep(1.5)
            redis.stop()
            down_from = time.monotonic()
            time.sleep(2.0)
            down_until = time.monotonic()
            redis.start()
            time.sleep(1.5)
        statuses = load.statuses()
        assert None not in statuses and 500 not in statuses
        during = [o for o in load.outcomes if o[3] > down_from + 0.2 and o[4] < down_until]
        assert during, "no request was made while Redis was down"
        for _, status, text, *_ in during:
            if fail_open:
                assert status == 200, text
            else:
                assert status == 503 and json.loads(text)["error"]["code"] == "ratelimit_storage_unavailable", text
        assert set(statuses) <= ({200} if fail_open else {200, 503})
        assert load.outcomes[-1][1] == 200  # back without a restart
        # Exact limits again: 5 a minute for this user.
        session = requests.Session()
        assert [ask(session, uuid.uuid4().hex, exact).status_code for _ in range(7)] == [200] * 5 + [429] * 2
        # Every success has its usage row, and only those.
        time.sleep(0.5)
        rows = [r for r in usage_rows(server, "root") if r["status"] == 200]
        assert {r["request_id"] for r in rows} == {o[0] for o in load.outcomes if o[1] == 200}
    finally:
        server.stop()
        redis.stop()
