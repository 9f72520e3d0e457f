"""The deadline, the bounded queue and the single model-holding worker, against real gunicorn."""

import importlib.metadata
import json
import threading
import time

import psutil
import pytest
import requests

from auth.store import Store
from tests.support.reference import long_messages

DEADLINE_S = 1.5


@pytest.fixture(scope="module")
def strict_server(start_server):
    """A server with short deadlines, one running row and room for one waiting request."""
    return start_server(VIBE_REQUEST_DEADLINE_S=DEADLINE_S, VIBE_STREAM_DEADLINE_S=DEADLINE_S, VIBE_QUEUE_SIZE=1,
                        VIBE_HTTP_THREADS=8,
                        VIBE_MAX_BATCH_SIZE=1, VIBE_DEFAULT_MAX_CONCURRENT=10)


def test_deadline_stops_a_long_generation_with_504(strict_server, long_question):
    # The server's first generation: the engine has not measured its speed, so nothing sizes it in advance.
    started = time.monotonic()
    response = strict_server.post("/predict", {"question": long_question, "temperature": 0, "max_new_tokens": 2048})
    elapsed = time.monotonic() - started
    assert response.status_code == 504, response.text
    body = response.json()
    assert body["success"] is False
    assert body["error"]["code"] == "deadline_exceeded" and body["error"]["type"] == "timeout_error"
    assert DEADLINE_S * 0.9 <= elapsed < DEADLINE_S + 1.5
    # a failed generation still has its usage row, with what it computed
    store = Store(strict_server.env["VIBE_DB_URL"], upgrade=False)
    [row] = [r for r in store.usage_rows("root") if r["request_id"] == response.headers["X-Request-ID"]]
    store.close()
    assert (row["status"], row["finish_reason"]) == (504, "timeout") and row["completion_tokens"] > 0
    # the engine is free again at once: the long generation really stopped
    started = time.monotonic()
    quick = strict_server.post("/predict", {"question": "hi", "temperature": 0, "max_new_tokens": 4})
    assert quick.status_code == 200 and time.monotonic() - started < 0.9


def test_full_queue_gets_503_with_retry_after_at_once(strict_server, long_question):
    # Streams: a whole answer asking for more than fits its deadline is refused before it queues.
    long_body = {"model": "VibeThinker-1.5B", "messages": long_messages(long_question),
                 "temperature": 0, "max_tokens": 2048, "stream": True}
    results = {}

    def call(name):
        response = strict_server.post("/v1/chat/completions", long_body, stream=True)
        events = [line for line in response.iter_lines() if line.startswith(b"data: {")]
        results[name] = json.loads(events[-1][6:])

    def wait_for(key):
        deadline = time.monotonic() + DEADLINE_S * 0.8
        while requests.get(strict_server.url("/readyz"), timeout=5).json()[key] < 1:
            assert time.monotonic() < deadline, f"no request {key} in time"
            time.sleep(0.01)

    running = threading.Thread(target=call, args=("running",))
    running.start()
    wait_for("running")
    waiting = threading.Thread(target=call, args=("waiting",))
    waiting.start()
    wait_for("queued")
    started = time.monotonic()
    refused = strict_server.post("/v1/chat/completions", long_body)
    assert time.monotonic() - started < 0.5
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "queue_full"
    assert int(refused.headers["Retry-After"]) >= 1
    running.join()
    waiting.join()
    assert results["running"]["error"]["code"] == "deadline_exceeded"
    # the waiting request spent its deadline in the queue and was never run
    assert results["waiting"]["error"]["code"] == "deadline_exceeded"


def test_exactly_one_worker_holds_the_model(server, tiny_model):
    master = psutil.Process(server.proc.pid)
    workers = master.children(recursive=True)
    assert len(workers) == 1

    def mapped(proc):
        return {m.path for m in proc.memory_maps(grouped=True)}

    assert not any("libtorch" in path for path in mapped(master)), "torch loaded in gunicorn's master"
    worker_maps = mapped(workers[0])
    assert any("libtorch_cpu" in path for path in worker_maps)
    ready = requests.get(server.url("/readyz"), timeout=5).json()
    assert ready["status"] == "ready"
    assert ready["version"] == importlib.metadata.version("vibethinker-service")  # which build is serving


def test_bad_settings_stop_start_up_naming_the_setting(tmp_path, tiny_model):
    import subprocess

    from tests.support.servers import BIN, ROOT, clean_env

    for env, name in [({"VIBE_MODEL_PATH": tiny_model, "VIBE_QUEUE_SIZE": "0"}, "VIBE_QUEUE_SIZE"),
                      ({"VIBE_MODEL_PATH": tmp_path}, "VIBE_MODEL_PATH"),
                      ({}, "VIBE_MODEL_PATH"),
                      ({"VIBE_MODEL_PATH": tiny_model, "VIBE_MODLE_PATH": "x"}, "VIBE_MODLE_PATH"),
                      ({"VIBE_MODEL_PATH": tiny_model, "VIBE_JWT_KEY_DIR": tmp_path / "nokeys"}, "VIBE_JWT_KEY_DIR")]:
        proc = subprocess.run([str(BIN / "gunicorn"), "-c", "service/gunicorn_conf.py", "service.app:create_app()"],
                              cwd=ROOT, env=clean_env(VIBE_BIND="127.0.0.1:1", **env),
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0
        assert name in proc.stderr and "Traceback" not in proc.stderr


KV_BOUND = 1 << 20  # the smallest bound the settings take


@pytest.fixture(scope="module")
def bounded(start_server):
    return start_server(VIBE_KV_CACHE_BYTES=KV_BOUND, VIBE_DEFAULT_MAX_NEW_TOKENS=2048)  # the default passes it


def test_the_kv_cache_bound_is_shown_and_a_request_that_could_never_fit_gets_400(bounded):
    ready = requests.get(bounded.url("/readyz"), timeout=10).json()
    [model] = ready["models"]
    cache = model["kv_cache"]
    assert cache["bound"] == KV_BOUND and cache["reserved"] == 0 and cache["free"] == KV_BOUND
    assert cache["dtype"] == "float32" and cache["bytes_per_token"] > 0  # the float32 mode's auto
    capacity = KV_BOUND // cache["bytes_per_token"]
    card = bounded.get("/v1/models/VibeThinker-1.5B").json()
    assert card["max_tokens"] == min(2048, capacity - 1)  # the settings' limit, or what the bound leaves
    body = {"model": "VibeThinker-1.5B", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2048}
    refused = bounded.post("/v1/chat/completions", body)
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "max_tokens"
    assert "KV cache" in error["message"] and "new tokens fit" in error["message"]
    fits = bounded.post("/v1/chat/completions", {**body, "max_tokens": 16})
    assert fits.status_code == 200 and fits.json()["usage"]["completion_tokens"] > 0
    # no max_tokens at all: the server's default is lowered to what fits, not refused
    predicted = bounded.post("/predict", {"question": "hi", "temperature": 0})
    assert predicted.status_code == 200, predicted.text
    metrics = requests.get(bounded.url("/metrics"), timeout=10).text
    assert 'vibethinker_kv_cache_bytes{model="VibeThinker-1.5B",state="bound"} 1.048576e+06' in metrics
    assert 'vibethinker_kv_cache_bytes{model="VibeThinker-1.5B",state="reserved"} 0.0' in metrics
    after = requests.get(bounded.url("/readyz"), timeout=10).json()["models"][0]
    assert set(after["decode_tokens_per_s_by_depth"]) == {"1024", "4096", "16384", "32768"}
    rates = list(after["decode_tokens_per_s_by_depth"].values())
    assert rates == sorted(rates, reverse=True)  # deeper is never faster (the slope's math: test_deadlines)
