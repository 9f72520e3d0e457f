"""One serving path: the same body answered as a live request and as a batch line gets the same answer, or
the same refusal (code and message), and usage rows with the same fields.

In process, through Flask's test client: the routes, serving, the batch runner and the store are the real
ones; no server is needed to compare the two roads. The app's own runner is stopped, and a fresh one is
started for each batch once the test has set the stage (a user disabled, a budget spent), so the line runs
under the owner's rights at that moment, as it would whenever a runner takes it.
"""

import base64
import json

import pytest

from service.state import state
from tests.support.inprocess import BatchUser as Caller
from tests.support.inprocess import make_app, stop_app

PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")
MODEL = "VibeThinker-1.5B"  # the tiny model's served name (the settings' default)
# Fields a usage row of a live request and of its batch line may differ in: which row, when, the road.
OWN_FIELDS = {"id", "at", "route", "request_id", "latency_ms"}


@pytest.fixture
def app(tiny_model, tmp_path):
    app = make_app(tiny_model, tmp_path)
    yield app
    stop_app(app)


def without(body, *names):
    return {key: value for key, value in body.items() if key not in names}


def uncached(body):
    """An answer without what the prefix cache changes: the second of two equal prompts reads the first's."""
    cache_fields = ("cached_tokens", "prompt_tokens_details")
    return {**body, "usage": {key: value for key, value in body["usage"].items() if key not in cache_fields}}


def cached(body):
    return body["usage"]["prompt_tokens_details"]["cached_tokens"]


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
    line = caller.first_line(caller.submit(endpoint, body))
    assert line["error"] is None and line["response"]["status_code"] == 200
    # the same answer; where the time went is the line body's extension (a live answer's is its header)
    phases = line["response"]["body"]["server_timing"]
    assert phases["decode"] > 0 and phases["total"] >= phases["decode"] + phases["queue"] + phases["prefill"]
    assert "Server-Timing" in live.headers
    assert uncached(without(line["response"]["body"], "id", "created", "server_timing")) == \
        uncached(without(live.get_json(), "id", "created"))
    assert cached(live.get_json()) <= cached(line["response"]["body"])  # the line came second
    batch_row, live_row = caller.rows()  # newest first
    assert (live_row["route"], batch_row["route"]) == (endpoint, "/v1/batches")
    assert set(batch_row) == set(live_row)
    assert (live_row["cached_tokens"], batch_row["cached_tokens"]) == (cached(live.get_json()),
                                                                       cached(line["response"]["body"]))
    assert without(batch_row, *OWN_FIELDS, "cached_tokens") == without(live_row, *OWN_FIELDS, "cached_tokens")
    assert live_row["completion_tokens"] == 6 and live_row["prompt_tokens"] > 0


LONG = " ".join(["seven"] * 300)  # far more than the 160-token prompt limit of this app
PDF_THAT_IS_A_PNG = f"data:application/pdf;base64,{base64.b64encode(PNG).decode()}"


@pytest.mark.parametrize("endpoint,body,status,code", [
    ("/v1/predict", {"question": "hi", "max_new_tokens": 0}, 400, "out_of_range"),
    ("/v1/predict", {"question": "hi", "temprature": 0.5}, 400, "unknown_field"),
    ("/v1/chat/completions", {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "n": 99}, 400,
     "out_of_range"),
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
    line = caller.first_line(caller.submit("/v1/predict", body))
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
    line = caller.first_line(batch)
    live = caller.live("/v1/predict", body)
    assert (live.status_code, line["response"]["status_code"]) == (403, 403)
    assert line["error"]["code"] == live.get_json()["error"]["code"] == "account_disabled"
    assert line["error"]["message"] == live.get_json()["error"]["message"]
    assert caller.rows() == []


def test_rate_limited_is_the_same_refusal_both_ways(app):
    caller = Caller(app, "eve", rate_limit="1/hour")
    body = {"question": "What is 2 + 3?", "max_new_tokens": 4}
    assert caller.live("/v1/predict", body).status_code == 200  # the hour's one request
    live = caller.live("/v1/predict", body)
    upload = caller.upload(b"{}\n")  # a batch is made by requests that count against the same limit
    assert (live.status_code, upload.status_code) == (429, 429)
    assert upload.get_json()["error"]["code"] == live.get_json()["error"]["code"] == "rate_limit_exceeded"
    assert upload.headers.get("x-should-retry") == live.headers.get("x-should-retry")


@pytest.mark.parametrize("narrowed,body", [
    ({"system_prompts": ["Answer in French."]},
     {"question": "What is 2 + 3?", "max_new_tokens": 4, "system_prompt": "Be brief."}),
    ({"models": ["some-other-model"]}, {"question": "What is 2 + 3?", "max_new_tokens": 4, "model": MODEL}),
])
def test_a_right_narrowed_after_the_batch_was_made_is_refused_the_same_way_both_ways(app, narrowed, body):
    caller = Caller(app, "fay", system_prompts=["Be brief."], models=[MODEL])
    batch = caller.submit("/v1/predict", body)
    assert batch["status"] == "in_progress"  # allowed when the batch was made
    state(app).store.update_user("fay", **narrowed)
    line = caller.first_line(batch)
    live = caller.live("/v1/predict", body)
    assert (live.status_code, line["response"]["status_code"]) == (403, 403)
    assert line["error"]["code"] == live.get_json()["error"]["code"]
    assert line["error"]["code"] in ("system_prompt_not_allowed", "model_not_allowed")
    assert line["error"]["message"] == live.get_json()["error"]["message"]
    assert caller.rows() == []


@pytest.mark.parametrize("scope", ["model", "user"])
def test_the_engine_shares_prefixes_within_the_scope_of_the_setting_both_ways(tiny_model, tmp_path, scope):
    app = make_app(tiny_model, tmp_path, prefix_cache_scope=scope)
    try:
        engine, scopes = state(app).models.default.engine, []
        submit = engine.submit
        engine.submit = lambda request: scopes.append(request.prefix_scope) or submit(request)
        body = {"question": "What is 2 + 3?", "max_new_tokens": 4, "temperature": 0}
        for name in ("ann", "bob"):
            caller = Caller(app, name)
            assert caller.live("/v1/predict", body).status_code == 200
            assert caller.first_line(caller.submit("/v1/predict", body))["response"]["status_code"] == 200
        # a live request and a batch line of one user share a scope; two users never do under "user"
        assert scopes == (["", "", "", ""] if scope == "model" else ["user:ann", "user:ann", "user:bob", "user:bob"])
    finally:
        stop_app(app)


def test_a_replayed_answer_says_its_whole_prompt_was_cached_live_streamed_and_as_a_batch_line(tiny_model, tmp_path):
    app = make_app(tiny_model, tmp_path, cache="user")
    try:
        caller = Caller(app, "gus")
        chat = {"model": MODEL, "max_tokens": 6, "temperature": 0, "messages": [{"role": "user", "content": "2+3?"}]}
        computed = caller.live("/v1/chat/completions", chat).get_json()["usage"]
        assert computed["prompt_tokens_details"]["cached_tokens"] < computed["prompt_tokens"]
        replayed = caller.live("/v1/chat/completions", chat)
        assert replayed.headers["x-cache"] == "hit"
        whole = computed["prompt_tokens"]
        assert replayed.get_json()["usage"]["prompt_tokens_details"] == {"cached_tokens": whole}
        events = caller.client.post("/v1/chat/completions", headers=caller.headers, json={
            **chat, "stream": True, "stream_options": {"include_usage": True}}).get_data(as_text=True)
        [usage] = [chunk["usage"] for chunk in (json.loads(line[6:]) for line in events.splitlines()
                                                if line.startswith("data: {")) if chunk.get("usage")]
        assert usage["prompt_tokens_details"] == {"cached_tokens": whole}
        line = caller.first_line(caller.submit("/v1/chat/completions", chat))
        assert line["response"]["body"]["usage"]["prompt_tokens_details"] == {"cached_tokens": whole}
        predict = {"question": "2+3?", "max_new_tokens": 6, "temperature": 0}
        prompt = caller.live("/v1/predict", predict).get_json()["usage"]["prompt_tokens"]
        line = caller.first_line(caller.submit("/v1/predict", predict))
        assert line["response"]["body"]["usage"]["cached_tokens"] == prompt
        hits = [row for row in caller.rows() if row["cached"]]
        assert sorted(row["cached_tokens"] for row in hits) == sorted([whole] * 3 + [prompt])
    finally:
        stop_app(app)
