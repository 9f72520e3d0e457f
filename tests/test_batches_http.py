"""Batch jobs through the official openai client against real gunicorn: the round trip, and what can go wrong."""

import io
import json
import time

import openai
import psutil
import pytest
import requests

from auth.store import Store
from tests.support.batches import MODEL, chat_line, jsonl, wait
from tests.support.tokens import user_token

pytestmark = pytest.mark.slow


def client_of(server, token=None):
    return openai.OpenAI(base_url=server.url("/v1"), api_key=token or server.token, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def batching(start_server):
    return start_server(VIBE_MAX_BATCH_SIZE=4, VIBE_BATCH_RESERVED_ROWS=1)


def test_the_coach_round_trip_with_the_openai_client(batching, reference):
    client = client_of(batching)
    uploaded = client.files.create(file=("problems.jsonl", jsonl([chat_line(i) for i in range(30)])),
                                   purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes > 0
    assert client.files.retrieve(uploaded.id).filename == "problems.jsonl"
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"course": "algebra"})
    assert batch.status == "in_progress" and batch.request_counts.total == 30
    finished, seen = wait(client, batch.id)
    assert finished.status == "completed", finished
    assert finished.request_counts.completed == 30 and finished.request_counts.failed == 0
    assert finished.error_file_id is None and finished.metadata == {"course": "algebra"}
    assert finished.in_progress_at and finished.finalizing_at and finished.completed_at
    output = [json.loads(line) for line in client.files.content(finished.output_file_id).text.splitlines()]
    assert [o["custom_id"] for o in output] == [f"problem-{i}" for i in range(30)]  # input order
    first = output[0]["response"]
    assert first["status_code"] == 200 and first["body"]["object"] == "chat.completion"
    # The same answer a live request gets (greedy).
    live = client.chat.completions.create(model=MODEL, messages=chat_line(0)["body"]["messages"], max_tokens=6,
                                          temperature=0)
    assert first["body"]["choices"][0]["message"]["content"] == live.choices[0].message.content
    assert batch.id in [b.id for b in client.batches.list()]
    assert client.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)
    # One usage row per line, under the batch's route.
    store = Store(batching.env["VIBE_DB_URL"], upgrade=False)
    rows = [r for r in store.usage_rows(limit=10_000) if r["request_id"].startswith(batch.id + ":")]
    store.close()
    assert len(rows) == 30 and {r["route"] for r in rows} == {"/v1/batches"} and {r["status"] for r in rows} == {200}


def test_predict_lines_are_accepted_too(batching):
    client = client_of(batching)
    items = [{"custom_id": f"q{i}", "method": "POST", "url": "/v1/predict",
              "body": {"question": f"What is {i}?", "max_new_tokens": 4}} for i in range(3)]
    uploaded = client.files.create(file=("q.jsonl", jsonl(items)), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/predict", completion_window="24h")
    finished, _ = wait(client, batch.id)
    output = [json.loads(line) for line in client.files.content(finished.output_file_id).text.splitlines()]
    assert [o["response"]["body"]["input"] for o in output] == ["What is 0?", "What is 1?", "What is 2?"]


@pytest.mark.parametrize("content, code, line", [
    (b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}\nnot json\n', "missing", 1),
    (b"not json\n", "invalid_json", 1),
    (b'{"custom_id": "a\\ud800", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n',
     "invalid_unicode", 1),
    (json.dumps(chat_line(0)).encode() + b"\n" + json.dumps(chat_line(0)).encode() + b"\n", "duplicate_custom_id", 2),
    (json.dumps({**chat_line(0), "url": "/v1/predict"}).encode() + b"\n", "invalid_value", 1),
    (json.dumps(chat_line(0, max_tokens=0)).encode() + b"\n", "out_of_range", 1),
    (json.dumps(chat_line(0, stream=True)).encode() + b"\n", "unsupported_value", 1),
    (b"\n\n", "empty_file", None),
])
def test_a_bad_input_file_fails_the_batch_at_once_naming_the_line(batching, content, code, line):
    client = client_of(batching)
    uploaded = client.files.create(file=("bad.jsonl", io.BytesIO(content)), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    assert batch.status == "failed" and batch.failed_at
    first = batch.errors.data[0]
    assert first.code == code and first.line == line, batch.errors


def test_users_see_only_their_own_files_and_batches(batching):
    owner = client_of(batching)
    other = client_of(batching, user_token(batching, "stranger"))
    uploaded = owner.files.create(file=("mine.jsonl", jsonl([chat_line(1)])), purpose="batch")
    batch = owner.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                 completion_window="24h")
    for call in (lambda: other.files.retrieve(uploaded.id), lambda: other.files.content(uploaded.id),
                 lambda: other.batches.retrieve(batch.id), lambda: other.batches.cancel(batch.id),
                 lambda: other.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                              completion_window="24h")):
        with pytest.raises(openai.NotFoundError):
            call()
    assert uploaded.id not in [f.id for f in other.files.list()]
    assert batch.id not in [b.id for b in other.batches.list()]
    assert owner.batches.retrieve(batch.id).id == batch.id  # root is an admin: sees all, its own included


def test_cancel_stops_the_rest(batching, long_question):
    client = client_of(batching)
    items = [{"custom_id": f"long-{i}", "method": "POST", "url": "/v1/predict",
              "body": {"question": long_question, "max_new_tokens": 2048, "temperature": 0}} for i in range(12)]
    uploaded = client.files.create(file=("long.jsonl", jsonl(items)), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/predict", completion_window="24h")
    time.sleep(1.0)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    finished, _ = wait(client, batch.id, timeout=60)
    assert finished.status == "cancelled" and finished.cancelled_at
    assert finished.request_counts.completed + finished.request_counts.failed < 12
    assert requests.get(batching.url("/readyz"), timeout=10).json()["running"] == 0


def test_a_line_over_the_budget_fails_in_the_error_file(batching):
    token = user_token(batching, "thrifty", "--daily-tokens", "300")
    client = client_of(batching, token)
    uploaded = client.files.create(file=("b.jsonl", jsonl([chat_line(i, max_tokens=40) for i in range(10)])),
                                   purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    finished, _ = wait(client, batch.id)
    assert finished.status == "completed"
    counts = finished.request_counts
    assert counts.completed >= 1 and counts.failed >= 1 and counts.completed + counts.failed == 10
    errors = [json.loads(line) for line in client.files.content(finished.error_file_id).text.splitlines()]
    assert {e["error"]["code"] for e in errors} == {"daily_token_quota_exceeded"}
    assert all(e["response"]["status_code"] == 429 for e in errors)


def test_an_expired_batch_ends_with_what_was_done(start_server, long_question):
    server = start_server(VIBE_BATCH_WINDOW_S=1.5, VIBE_MAX_BATCH_SIZE=2, VIBE_BATCH_RESERVED_ROWS=1)
    client = client_of(server)
    items = [{"custom_id": f"e{i}", "method": "POST", "url": "/v1/predict",
              "body": {"question": long_question, "max_new_tokens": 1500, "temperature": 0}} for i in range(5)]
    uploaded = client.files.create(file=("e.jsonl", jsonl(items)), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/predict", completion_window="24h")
    finished, _ = wait(client, batch.id, timeout=60)
    assert finished.status == "expired" and finished.expired_at
    errors = [json.loads(line) for line in client.files.content(finished.error_file_id).text.splitlines()]
    assert "batch_expired" in {e["error"]["code"] for e in errors}
    assert finished.request_counts.completed + finished.request_counts.failed == 5


@pytest.mark.parametrize("how", ["restart", "kill"])
def test_a_restart_or_kill_mid_batch_answers_every_line_exactly_once(start_server, long_question, how):
    server = start_server(VIBE_MAX_BATCH_SIZE=2, VIBE_BATCH_RESERVED_ROWS=1)
    client = client_of(server)
    items = [{"custom_id": f"k{i}", "method": "POST", "url": "/v1/predict",
              "body": {"question": long_question if i % 2 else "hi", "max_new_tokens": 400, "temperature": 0}}
             for i in range(8)]
    uploaded = client.files.create(file=("k.jsonl", jsonl(items)), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/predict", completion_window="24h")
    deadline = time.monotonic() + 60
    while client.batches.retrieve(batch.id).request_counts.completed < 2:
        assert time.monotonic() < deadline
        time.sleep(0.15)  # under the polling limit (600/minute)
    if how == "kill":
        [worker] = psutil.Process(server.proc.pid).children()
        worker.kill()
        worker.wait(10)
        deadline = time.monotonic() + 90
        while True:
            try:
                if requests.get(server.url("/readyz"), timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.2)
    else:
        server.restart()
    client = client_of(server)
    finished, _ = wait(client, batch.id, timeout=120)
    assert finished.status == "completed" and finished.request_counts.completed == 8
    output = [json.loads(line) for line in client.files.content(finished.output_file_id).text.splitlines()]
    assert sorted(o["custom_id"] for o in output) == sorted(f"k{i}" for i in range(8))  # each exactly once
    store = Store(server.env["VIBE_DB_URL"], upgrade=False)
    rows = [r for r in store.usage_rows(limit=10_000) if r["request_id"].startswith(batch.id + ":")]
    store.close()
    assert sorted(r["request_id"] for r in rows) == sorted({r["request_id"] for r in rows})  # none repeated
    assert len(rows) == 8


def test_a_disabled_users_batch_gets_no_more_answers(batching, long_question):
    token = user_token(batching, "leaver")
    client = client_of(batching, token)
    items = [{"custom_id": f"d{i}", "method": "POST", "url": "/v1/predict",
              "body": {"question": long_question, "max_new_tokens": 1000, "temperature": 0}} for i in range(8)]
    uploaded = client.files.create(file=("d.jsonl", jsonl(items)), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/predict", completion_window="24h")
    batching.cli("users", "disable", "leaver")
    admin = client_of(batching)
    finished, _ = wait(admin, batch.id)
    assert finished.status == "completed" and finished.request_counts.failed >= 1
    errors = [json.loads(line) for line in admin.files.content(finished.error_file_id).text.splitlines()]
    assert {e["error"]["code"] for e in errors} == {"account_disabled"}


def test_users_batches_take_turns(start_server, long_question):
    server = start_server(VIBE_MAX_BATCH_SIZE=2, VIBE_BATCH_RESERVED_ROWS=1)  # one line at a time
    big, small = client_of(server, user_token(server, "big")), client_of(server, user_token(server, "small"))
    long_items = [{"custom_id": f"b{i}", "method": "POST", "url": "/v1/predict",
                   "body": {"question": long_question, "max_new_tokens": 300, "temperature": 0}} for i in range(10)]
    first = big.batches.create(input_file_id=big.files.create(file=("b.jsonl", jsonl(long_items)),
                                                              purpose="batch").id,
                               endpoint="/v1/predict", completion_window="24h")
    # the small batch comes once the big one has answered a line (however fast lines go: speculation makes a
    # looping answer's lines several times faster), so its head start is a line or two, not a time
    deadline = time.monotonic() + 60
    while big.batches.retrieve(first.id).request_counts.completed < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    second = small.batches.create(input_file_id=small.files.create(file=("s.jsonl", jsonl(long_items[:2])),
                                                                   purpose="batch").id,
                                  endpoint="/v1/predict", completion_window="24h")
    done_small, _ = wait(small, second.id)
    progress = big.batches.retrieve(first.id)
    assert done_small.status == "completed" and progress.status == "in_progress"
    assert progress.request_counts.completed <= 5  # the small batch did not wait for the big one to end


def test_a_user_may_have_only_so_many_open_batches(start_server, long_question):
    server = start_server(VIBE_MAX_OPEN_BATCHES=1)
    client = client_of(server)
    items = [{"custom_id": f"o{i}", "method": "POST", "url": "/v1/predict",
              "body": {"question": long_question, "max_new_tokens": 2000, "temperature": 0}} for i in range(4)]
    file_id = client.files.create(file=("o.jsonl", jsonl(items)), purpose="batch").id
    open_one = client.batches.create(input_file_id=file_id, endpoint="/v1/predict", completion_window="24h")
    with pytest.raises(openai.RateLimitError) as refused:
        client.batches.create(input_file_id=file_id, endpoint="/v1/predict", completion_window="24h")
    assert refused.value.body["code"] == "too_many_batches"
    client.batches.cancel(open_one.id)
