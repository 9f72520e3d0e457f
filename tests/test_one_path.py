"""One serving path: the same body answered as a live request and as a batch line gets the same answer, or
the same refusal (code and message), and usage rows with the same fields.

In process, through Flask's test client: the routes, serving, the batch runner and the store are the real
ones; no server is needed to compare the two roads. The app's own runner is stopped, and a fresh one is
started for each batch once the test has set the stage (a user disabled, a budget spent), so the line runs
under the owner's rights at that moment, as it would whenever a runner takes it.
"""

import base64
import io
import json
import time

import pytest

from auth import keys
from auth.tokens import issue_token
from service.app import create_app
from service.batches.runner import BatchRunner
from service.settings import load_settings
from service.state import state

PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")
# Fields a usage row of a live request and of its batch line may differ in: which row, when, the road.
OWN_FIELDS = {"id", "at", "route", "request_id", "latency_ms"}


@pytest.fixture
def app(tiny_model, tmp_path):
    keys.generate(tmp_path / "keys")
    app = create_app(load_settings(model_path=tiny_model, torch_threads=1, jwt_key_dir=tmp_path / "keys",
                                   db_url=f"sqlite:///{tmp_path}/db.sqlite", files_dir=tmp_path / "files",
                                   cache="off", max_prompt_tokens=160, ratelimit_storage_uri="memory://"))
    state(app).batch_runner.stop(timeout=10)
    deadline = time.monotonic() + 60
    while not all(served.engine.ready for served in state(app).models) and time.monotonic() < deadline:
        time.sleep(0.05)
    yield app
    for served in state(app).models:
        served.engine.stop(timeout=30)


def bearer(app, name, **quotas):
    """The Authorization header of a new user `name`'s token."""
    store, keyset, settings = state(app).store, state(app).keys, state(app).settings
    store.add_user(name, **quotas)
    token, _ = issue_token(store, keyset, name, issuer=settings.jwt_issuer, audience=settings.jwt_audience)
    return {"Authorization": f"Bearer {token}"}


class Caller:
    """A user of the app with a token, who asks live and by batch; an admin watches the batches (the user may
    be disabled by then)."""

    def __init__(self, app, name, **quotas):
        self.app, self.client, self.name = app, app.test_client(), name
        self.headers = bearer(app, name, **quotas)
        self.admin = bearer(app, f"{name}-admin", is_admin=True)

    def live(self, endpoint, body):
        return self.client.post(endpoint, json=body, headers=self.headers)

    def submit(self, endpoint, body):
        """A one-line batch of `body`: the created batch (in progress, or failed with the line's errors)."""
        line = json.dumps({"custom_id": "only", "method": "POST", "url": endpoint, "body": body})
        upload = self.client.post("/v1/files", headers=self.headers, content_type="multipart/form-data",
                                  data={"purpose": "batch", "file": (io.BytesIO(line.encode()), "in.jsonl")})
        assert upload.status_code == 200, upload.get_json()
        created = self.client.post("/v1/batches", headers=self.headers, json={
            "input_file_id": upload.get_json()["id"], "endpoint": endpoint, "completion_window": "24h"})
        assert created.status_code == 200, created.get_json()
        return created.get_json()

    def run(self, batch):
        """Run `batch` to its end with a fresh runner: its one output or error line."""
        runner = BatchRunner(state(self.app)).start()
        try:
            deadline = time.monotonic() + 60
            while batch["status"] not in ("completed", "failed") and time.monotonic() < deadline:
                time.sleep(0.05)
                batch = self.client.get(f"/v1/batches/{batch['id']}", headers=self.admin).get_json()
        finally:
            runner.stop(timeout=30)
        assert batch["status"] == "completed", batch
        file_id = batch["output_file_id"] or batch["error_file_id"]
        content = self.client.get(f"/v1/files/{file_id}/content", headers=self.admin).get_data(as_text=True)
        return json.loads(content.splitlines()[0])

    def rows(self):
        return state(self.app).store.usage_rows(self.name)


def without(body, *names):
    return {key: value for key, value in body.items() if key not in names}


@pytest.mark.parametrize("endpoint,body", [
    ("/v1/predict", {"question": "What is 2 + 3?", "max_new_tokens": 6, "temperature": 0}),
    ("/v1/chat/completions", {"model": "auto", "max_tokens": 6, "temperature": 0,
                              "messages": [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "What is 2 + 3?"}]}),
    ("/v1/predict", {"question": "What is 2 + 3?", "max_new_tokens": 6, "temperature": 0,
                     "expected_answer": "5"}),
    ("/v1/chat/completions", {"model": "auto", "max_tokens": 6, "temperature": 0, "reasoning_format": "none",
                              "expected_answer": "5", "presence_penalty": 0, "logprobs": False, "store": False,
                              "service_tier": "auto", "messages": [{"role": "user", "content": "What is 2 + 3?"}]}),
])
def test_a_good_body_gets_the_same_answer_and_usage_row_both_ways(app, endpoint, body):
    caller = Caller(app, "ann")
    live = caller.live(endpoint, body)
    assert live.status_code == 200, live.get_json()
    line = caller.run(caller.submit(endpoint, body))
    assert line["error"] is None and line["response"]["status_code"] == 200
    assert without(line["response"]["body"], "id", "created") == without(live.get_json(), "id", "created")
    batch_row, live_row = caller.rows()  # newest first
    assert (live_row["route"], batch_row["route"]) == (endpoint, "/v1/batches")
    assert set(batch_row) == set(live_row)
    assert without(batch_row, *OWN_FIELDS) == without(live_row, *OWN_FIELDS)
    assert live_row["completion_tokens"] == 6 and live_row["prompt_tokens"] > 0


LONG = " ".join(["seven"] * 300)  # far more than the 160-token prompt limit of this app
PDF_THAT_IS_A_PNG = f"data:application/pdf;base64,{base64.b64encode(PNG).decode()}"


@pytest.mark.parametrize("endpoint,body,status,code", [
    ("/v1/predict", {"question": "hi", "max_new_tokens": 0}, 400, "out_of_range"),
    ("/v1/predict", {"question": "hi", "temprature": 0.5}, 400, "unknown_field"),
    ("/v1/chat/completions", {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "n": 3}, 400,
     "unsupported_value"),
    ("/v1/chat/completions", {"model": "auto", "messages": [{"role": "user", "content": "hi"}],
                              "frequency_penalty": 1.5}, 400, "unsupported_value"),
    ("/v1/chat/completions", {"model": "auto", "messages": [{"role": "user", "content": "hi"}],
                              "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "unsupported_value"),
    ("/v1/predict", {"question": LONG}, 400, "context_length_exceeded"),
    ("/v1/chat/completions", {"model": "auto", "messages": [{"role": "user", "content": LONG}]}, 400,
     "context_length_exceeded"),
    ("/v1/chat/completions", {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}, 404,
     "model_not_found"),
    ("/v1/chat/completions", {"model": "auto", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "read this"}, {"type": "file", "file": {"file_data": PDF_THAT_IS_A_PNG}}]}]},
     415, "file_type_mismatch"),
    ("/v1/chat/completions", {"model": "auto", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.invalid/a.png"}}]}]}, 400, "unsupported_url"),
])
def test_a_bad_body_is_refused_the_same_way_both_ways(app, endpoint, body, status, code):
    caller = Caller(app, "bob")
    live = caller.live(endpoint, body)
    error = live.get_json()["error"]
    assert (live.status_code, error["code"]) == (status, code), error
    batch = caller.submit(endpoint, body)
    assert batch["status"] == "failed"
    [line_error] = batch["errors"]["data"]
    assert (line_error["code"], line_error["message"], line_error["param"]) == \
        (error["code"], error["message"], error["param"])
    assert line_error["line"] == 1
    assert caller.rows() == []  # refused before admission, both ways: nothing used, nothing owed


def test_over_budget_is_the_same_refusal_both_ways(app):
    caller = Caller(app, "cy", daily_tokens=20)
    body = {"question": "What is 2 + 3?", "max_new_tokens": 8}
    live = caller.live("/v1/predict", body)
    assert live.status_code == 429
    line = caller.run(caller.submit("/v1/predict", body))
    assert line["response"]["status_code"] == 429
    assert line["error"]["code"] == live.get_json()["error"]["code"] == "daily_token_quota_exceeded"
    assert line["error"]["message"] == live.get_json()["error"]["message"]
    assert line["response"]["body"] == without(live.get_json(), "success")
    assert caller.rows() == []


def test_a_user_disabled_after_the_batch_was_made_is_refused_the_same_way_both_ways(app):
    caller = Caller(app, "dee")
    body = {"question": "What is 2 + 3?", "max_new_tokens": 4}
    batch = caller.submit("/v1/predict", body)
    assert batch["status"] == "in_progress"
    state(app).store.update_user("dee", active=False)
    line = caller.run(batch)
    live = caller.live("/v1/predict", body)
    assert (live.status_code, line["response"]["status_code"]) == (403, 403)
    assert line["error"]["code"] == live.get_json()["error"]["code"] == "account_disabled"
    assert line["error"]["message"] == live.get_json()["error"]["message"]
    assert caller.rows() == []
