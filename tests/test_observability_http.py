"""Metrics, usage rows and JSON logs agree with what was sent, over real gunicorn."""

import json
import os
import re
import signal
import sqlite3
import subprocess
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from auth.store import Store
from tests.support.servers import ROOT, clean_env, free_port

NAMES = ["vibethinker_http_requests_total", "vibethinker_request_duration_seconds",
         "vibethinker_time_to_first_token_seconds", "vibethinker_inter_token_latency_seconds",
         "vibethinker_queue_wait_seconds", "vibethinker_requests_running", "vibethinker_requests_waiting",
         "vibethinker_batch_size", "vibethinker_prompt_tokens_total", "vibethinker_generation_tokens_total",
         "vibethinker_request_finish_total", "vibethinker_refusals_total", "vibethinker_model_load_seconds",
         "vibethinker_model_info"]


def scrape(server):
    """{(sample name, frozenset(labels)): value} from /metrics, fetched without a token."""
    text = requests.get(server.url("/metrics"), timeout=10).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def observed(start_server):
    return start_server()


def test_metric_names_exist(observed):
    text = requests.get(observed.url("/metrics"), timeout=10).text
    declared = set(re.findall(r"^# TYPE (\S+) ", text, flags=re.M))
    for name in NAMES:
        assert name in declared or name.removesuffix("_total") in declared \
            or name.removesuffix("_info") in declared, name
    info = {dict(labels).get("model") for name, labels in scrape(observed) if name == "vibethinker_model_info"}
    assert info == {"VibeThinker-1.5B"}


def test_counters_and_usage_rows_match_what_was_sent(observed):
    observed.cli("users", "add", "obs", "--rate-limit", "4/minute")
    token = observed.cli("tokens", "issue", "obs").stdout.strip().splitlines()[-1]
    before = scrape(observed)
    statuses, usages = [], []
    bad = observed.post("/predict", {"question": "hi", "max_new_tokens": 0}, token=token)
    statuses.append(bad.status_code)
    for n in (3, 4, 5):
        ok = observed.post("/predict", {"question": f"q{n}", "max_new_tokens": n, "temperature": 0}, token=token)
        statuses.append(ok.status_code)
        usages.append(ok.json()["usage"])
    statuses += [observed.post("/predict", {"question": "more"}, token=token).status_code for _ in range(2)]
    statuses.append(requests.post(observed.url("/predict"), json={"question": "x"}, timeout=10).status_code)
    assert statuses == [400, 200, 200, 200, 429, 429, 401]
    after = scrape(observed)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    route = {"route": "/predict", "method": "POST"}
    assert [delta("vibethinker_http_requests_total", **route, status=s) for s in ("200", "400", "429", "401")] \
        == [3, 1, 2, 1]
    assert [delta("vibethinker_refusals_total", reason=r) for r in ("validation", "rate_limit", "auth")] == [1, 2, 1]
    prompt, completion = sum(u["prompt_tokens"] for u in usages), sum(u["completion_tokens"] for u in usages)
    model = {"model": "VibeThinker-1.5B"}  # generation figures carry the served model
    assert delta("vibethinker_prompt_tokens_total", **model) == prompt
    assert delta("vibethinker_generation_tokens_total", **model) == completion
    assert delta("vibethinker_request_finish_total", **model, finish_reason="length") == 3
    assert delta("vibethinker_time_to_first_token_seconds_count", **model) == 3
    assert delta("vibethinker_inter_token_latency_seconds_count", **model) == completion - 3
    assert delta("vibethinker_request_duration_seconds_count", route="/predict") == 7

    store = Store(observed.env["VIBE_DB_URL"], upgrade=False)
    rows = store.usage_rows("obs")
    store.close()
    assert len(rows) == 3 and {r["status"] for r in rows} == {200}
    assert sorted((r["prompt_tokens"], r["completion_tokens"]) for r in rows) == \
        sorted((u["prompt_tokens"], u["completion_tokens"]) for u in usages)
    [day] = json.loads(observed.cli("--json", "usage", "--user", "obs").stdout)
    assert (day["requests"], day["total_tokens"]) == (3, prompt + completion)
    assert observed.get("/admin/usage?user=obs").json()["data"] == [day]
    today = observed.get("/v1/me", token=token).json()["today"]
    assert today == {"requests": 3, "prompt_tokens": prompt, "completion_tokens": completion,
                     "total_tokens": prompt + completion}


def test_every_request_is_one_json_log_line_without_secrets(observed):
    # The marker is no hex number: a random request id or timestamp in the log can never contain it.
    observed.post("/predict", {"question": "log me: a secret question qz5521xw", "max_new_tokens": 2},
                  headers={"X-Request-ID": "log-check-1"})
    lines = [json.loads(line) for line in observed.log().splitlines() if line.startswith("{")]
    [line] = [entry for entry in lines if entry.get("request_id") == "log-check-1"]
    assert line["route"] == "/predict" and line["status"] == 200 and line["user"] == "root"
    assert line["completion_tokens"] == 2 and line["finish_reason"] == "length" and line["latency_ms"] > 0
    text = observed.log()
    assert "qz5521xw" not in text and observed.token.split(".")[2] not in text
    assert any(entry.get("message") == "service starting" for entry in lines)
    assert any(entry.get("logger") == "gunicorn.error" for entry in lines)  # gunicorn's own lines are JSON too


def test_a_500_is_logged_as_json_with_its_request_id(start_server):
    server = start_server()
    db = sqlite3.connect(server.env["VIBE_DB_URL"].removeprefix("sqlite:///"))
    db.execute("DROP TABLE audit")  # a broken database: the next admin write fails
    db.commit()
    db.close()
    response = server.post("/admin/users", {"name": "doomed"}, headers={"X-Request-ID": "req-500-check"})
    assert response.status_code == 500
    assert "audit" not in response.text and "req-500-check" in response.json()["error"]["message"]
    entries = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    [error] = [e for e in entries if e.get("request_id") == "req-500-check" and e["level"] == "error"]
    assert "Traceback" in error["exception"] and "audit" in error["exception"]
    assert server.token.split(".")[2] not in server.log()


def test_make_run_serves_and_says_where_logs_and_metrics_are(tmp_path, tiny_model):
    port = free_port()
    env = clean_env(VIBE_MODEL_PATH=tiny_model, VIBE_BIND=f"127.0.0.1:{port}", VIBE_TORCH_THREADS=1,
                    VIBE_DB_URL=f"sqlite:///{tmp_path}/db.sqlite", VIBE_JWT_KEY_DIR=tmp_path / "keys")
    proc = subprocess.Popen(["make", "--no-print-directory", "run"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        out, token = [], None
        while not any("metrics:" in line for line in out):
            line = proc.stdout.readline()
            assert line, "make run ended early:\n" + "".join(out)
            out.append(line)
        text = "".join(out)
        token = re.search(r"export TOKEN=(\S+)", text).group(1)
        assert "JSON" in text and f"http://127.0.0.1:{port}/metrics" in text
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.2)
        me = requests.get(f"http://127.0.0.1:{port}/v1/me", headers={"Authorization": f"Bearer {token}"}, timeout=5)
        assert me.json()["user"] == "admin" and me.json()["token"]["scope"] == ["generate", "admin"]
        link = re.search(rf"(http://127\.0\.0\.1:{port}/admin/console/login/link/\S+)", text).group(1)
        assert 'id="continue"' in requests.get(link, timeout=5).text  # the console's sign-in works
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        proc.stdout.close()
