"""Several models in one real gunicorn: by name, alias and "auto" routing, allow-lists, per-model readiness,
the model in usage rows, metrics and logs, and the memory check at start."""

import json
import shutil
import sqlite3
import subprocess
import time

import pytest
import requests

from tests.support.reference import greedy
from tests.support.servers import BIN, ROOT, Server, state_env
from tests.support.tokens import user_token

MESSAGES = [{"role": "user", "content": "What is 6 * 7?"}]
CODE = [{"role": "user", "content": "Write a Python function that adds two numbers."}]


def config(tmp_path, math_path, code_path, extra=""):
    path = tmp_path / "config.toml"
    path.write_text(f"""{extra}
[[models]]
name = "math-model"
path = "{math_path}"
aliases = ["VibeThinker-1.5B"]
description = "math reasoning"

[[models]]
name = "code-model"
path = "{code_path}"
aliases = ["coder"]
description = "code"

[[routing]]
model = "code-model"
regex = '(?i)\\b(python|function|code)\\b'

[[routing]]
model = "code-model"
keywords = ["javascript", "rust"]
""")
    return path


@pytest.fixture(scope="module")
def two(start_server, tmp_path_factory, tiny_model, second_model):
    return start_server(VIBE_CONFIG=config(tmp_path_factory.mktemp("two"), tiny_model, second_model))


@pytest.fixture(scope="module")
def second_reference(second_model):
    from service.inference import model

    return model.load(str(second_model))


def chat(server, model, messages, token=None, **extra):
    return server.post("/v1/chat/completions", {"model": model, "messages": messages, "max_tokens": 12,
                                                "temperature": 0, **extra}, token=token)


def test_each_model_answers_as_itself_and_is_listed_ready(two, reference, second_reference):
    listed = two.get("/v1/models").json()["data"]
    assert [(m["id"], m["ready"], m["state"], m["aliases"]) for m in listed] == [
        ("math-model", True, "ready", ["VibeThinker-1.5B"]), ("code-model", True, "ready", ["coder"])]
    assert listed[1]["description"] == "code"
    math = chat(two, "math-model", MESSAGES).json()
    code = chat(two, "CODER", MESSAGES).json()  # an alias, in any case
    assert math["model"] == "math-model" and code["model"] == "code-model"
    assert math["choices"][0]["message"]["content"] == greedy(reference, MESSAGES, 12)[0]
    assert code["choices"][0]["message"]["content"] == greedy(second_reference, MESSAGES, 12)[0]
    assert math["choices"][0]["message"]["content"] != code["choices"][0]["message"]["content"]
    assert chat(two, "VibeThinker-1.5B", MESSAGES).json()["model"] == "math-model"
    assert two.get("/v1/models/coder").json()["id"] == "code-model"


def test_auto_and_predict_without_a_model_route_by_the_question(two, reference, second_reference):
    routed = chat(two, "auto", CODE).json()
    assert routed["model"] == "code-model"
    assert routed["choices"][0]["message"]["content"] == greedy(second_reference, CODE, 12)[0]
    assert chat(two, "auto", MESSAGES).json()["model"] == "math-model"  # no rule matches: the default
    assert chat(two, "auto", [{"role": "user", "content": "fix my Rust borrow error"}]).json()["model"] == \
        "code-model"  # the keyword rule
    plain = two.post("/predict", {"question": "What is 6 * 7?", "temperature": 0, "max_new_tokens": 4}).json()
    coded = two.post("/v1/predict", {"question": "python code please", "temperature": 0,
                                     "max_new_tokens": 4}).json()
    named = two.post("/predict", {"question": "python code please", "model": "math-model", "temperature": 0,
                                  "max_new_tokens": 4}).json()
    assert (plain["model"], coded["model"], named["model"]) == ("math-model", "code-model", "math-model")


def test_an_unknown_model_is_a_404_naming_the_served_ones(two):
    for response in (chat(two, "gpt-4o", MESSAGES), two.post("/predict", {"question": "hi", "model": "gpt-4o"}),
                     two.get("/v1/models/gpt-4o"), two.get("/v1/models/auto")):
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] == "model_not_found"
    message = chat(two, "gpt-4o", MESSAGES).json()["error"]["message"]
    assert "'math-model'" in message and "'code-model'" in message and "'auto'" in message
    assert two.post("/predict", {"question": "hi", "model": "nope"}).json()["success"] is False


def test_a_user_may_be_restricted_to_some_models(two):
    token = user_token(two, "mathonly", "--allow-model", "VibeThinker-1.5B")
    refused = chat(two, "code-model", MESSAGES, token=token)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "model_not_allowed"
    assert "'code-model'" in refused.json()["error"]["message"]
    assert two.get("/v1/models/coder", token=token).status_code == 403
    assert [m["id"] for m in two.get("/v1/models", token=token).json()["data"]] == ["math-model"]
    assert chat(two, "auto", CODE, token=token).json()["model"] == "math-model"  # auto never picks a forbidden one
    assert chat(two, "math-model", MESSAGES, token=token).status_code == 200
    two.cli("users", "set", "mathonly", "--any-model")
    assert chat(two, "code-model", MESSAGES, token=token).status_code == 200  # the next request sees it
    admin = two.request("PATCH", "/admin/users/mathonly", {"models": ["coder"]})
    assert admin.status_code == 200 and admin.json()["models"] == ["coder"]
    assert chat(two, "math-model", MESSAGES, token=token).status_code == 403
    bad = two.request("PATCH", "/admin/users/mathonly", {"models": ["a b"]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "models"


def test_usage_rows_metrics_readiness_and_logs_carry_the_model(two):
    chat(two, "code-model", MESSAGES, max_tokens=3)
    db = two.env["VIBE_DB_URL"].removeprefix("sqlite:///")
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT model, cached, completion_tokens FROM usage ORDER BY id DESC LIMIT 1").fetchall()
    assert rows == [("code-model", 0, 3)]
    metrics = requests.get(two.url("/metrics"), timeout=10).text
    assert 'vibethinker_generation_tokens_total{model="code-model"}' in metrics
    assert 'vibethinker_requests_running{model="math-model"}' in metrics
    info = [line for line in metrics.splitlines() if line.startswith("vibethinker_model_info{")]
    assert len(info) == 2 and any('model="code-model"' in line and 'dtype="float32"' in line for line in info)
    ready = requests.get(two.url("/readyz"), timeout=10).json()
    assert ready["model"] == "math-model" and [m["name"] for m in ready["models"]] == ["math-model", "code-model"]
    assert all(m["state"] == "ready" and m["device"] == "cpu" for m in ready["models"])
    lines = [json.loads(line) for line in two.log().splitlines() if line.startswith("{")]
    assert any(line.get("model") == "code-model" and line.get("route") == "/v1/chat/completions" for line in lines)


def test_a_model_that_fails_to_load_fails_alone(tmp_path_factory, tiny_model, second_model):
    broken = tmp_path_factory.mktemp("broken") / "code"
    shutil.copytree(second_model, broken)
    weights = broken / "model.safetensors"
    header = 8 + int.from_bytes(weights.read_bytes()[:8], "little")
    with open(weights, "r+b") as handle:  # the header stays readable (the memory check passes); the data is cut
        handle.truncate(header + 16)
    server = Server(tmp_path_factory.mktemp("server"), {"VIBE_CONFIG": config(broken.parent, tiny_model, broken),
                                                       "VIBE_CACHE": "off"})
    server.ready = lambda: requests.get(server.url("/healthz"), timeout=2).status_code == 200
    server.start()
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            states = [m["state"] for m in server.get("/v1/models").json()["data"]]
            if "loading" not in states:
                break
            time.sleep(0.2)
        assert states == ["ready", "failed"]
        ready = requests.get(server.url("/readyz"), timeout=10)
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "model_failed"
        assert "'code-model'" in ready.json()["error"]["message"]
        assert [m["state"] for m in ready.json()["models"]] == ["ready", "failed"]
        assert chat(server, "math-model", MESSAGES).status_code == 200
        failed = chat(server, "code-model", MESSAGES)
        assert failed.status_code == 503 and failed.json()["error"]["code"] == "model_failed"
        assert failed.headers["Retry-After"]
    finally:
        server.stop()


def test_models_whose_weights_do_not_fit_stop_start_up_with_a_message(tmp_path, tiny_model, second_model):
    env = state_env(tmp_path, VIBE_CONFIG=config(tmp_path, tiny_model, second_model),
                    VIBE_MEMORY_LIMIT_BYTES=1_000_000, VIBE_BIND="127.0.0.1:9")
    done = subprocess.run([str(BIN / "gunicorn"), "-c", "service/gunicorn_conf.py", "service.app:create_app()"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "math-model 0.00 GiB, code-model 0.00 GiB" in done.stderr and "do not fit in 80%" in done.stderr
    assert "memory_limit_bytes" in done.stderr
