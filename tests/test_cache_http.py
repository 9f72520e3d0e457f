"""The response cache over real gunicorn and real Redis: hits and misses on both routes and in streams,
what a hit costs, isolation between users and between model revisions, purge, batch lines, Redis down."""

import io
import json
import os
import shutil
import sqlite3
import time

import openai
import pytest
import requests

from tests.support.databases import Redis
from tests.support.tokens import user_token

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "What is 12 * 12?"}]


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    """A Redis of this module's own: the entries of one test's server never meet another module's."""
    with Redis(tmp_path_factory.mktemp("redis-cache")).start() as server:
        yield server


@pytest.fixture(scope="module")
def cached(start_server, redis):
    return start_server(VIBE_RATELIMIT_STORAGE_URI=redis.uri, VIBE_CACHE="user")


def chat(server, token, messages=QUESTION, **extra):
    body = {"model": "VibeThinker-1.5B", "messages": messages, "max_tokens": 10, "temperature": 0, **extra}
    return server.post("/v1/chat/completions", body, token=token)


def stream(server, token, messages=QUESTION, **extra):
    """(x-cache header, content pieces, finish reason, usage) of a streamed answer."""
    body = {"model": "VibeThinker-1.5B", "messages": messages, "max_tokens": 10, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **extra}
    with requests.post(server.url("/v1/chat/completions"), json=body, headers=server.auth(token), stream=True,
                       timeout=60) as response:
        assert response.status_code == 200, response.text
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith(b"data: {")]
    pieces = [e["choices"][0]["delta"].get("content") for e in events if e["choices"]]
    finish = [e["choices"][0]["finish_reason"] for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    usage = [e["usage"] for e in events if e.get("usage")]
    return response.headers.get("x-cache"), [p for p in pieces if p], finish, usage


def last_usage_rows(server, count=1):
    with sqlite3.connect(server.env["VIBE_DB_URL"].removeprefix("sqlite:///")) as conn:
        return conn.execute("SELECT user, route, status, cached, prompt_tokens, completion_tokens, model, "
                            "cached_tokens FROM usage ORDER BY id DESC LIMIT ?", (count,)).fetchall()[::-1]


def replayed_usage(usage):
    """A chat answer's usage as its replay says it: the same, but a replay computed nothing, so its whole prompt
    was cached."""
    return {**usage, "prompt_tokens_details": {"cached_tokens": usage["prompt_tokens"]}}


def test_a_repeated_deterministic_request_is_a_hit_on_both_routes(cached):
    token = user_token(cached, "repeat")
    first, second = chat(cached, token), chat(cached, token)
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit")
    assert second.json()["choices"] == first.json()["choices"]
    assert second.json()["usage"] == replayed_usage(first.json()["usage"])
    assert second.json()["id"] != first.json()["id"]
    rows = last_usage_rows(cached, 2)
    assert [(r[3], r[6]) for r in rows] == [(0, "VibeThinker-1.5B"), (1, "VibeThinker-1.5B")]
    assert rows[1][4:6] == rows[0][4:6]  # the cached row records the answer's tokens, marked cached
    assert rows[1][7] == rows[1][4]  # ... its whole prompt cached
    ask = {"question": "What is 3 + 4?", "temperature": 0, "max_new_tokens": 6}
    one, two = cached.post("/predict", ask, token=token), cached.post("/predict", ask, token=token)
    assert (one.headers["x-cache"], two.headers["x-cache"]) == ("miss", "hit")
    assert two.json()["response"] == one.json()["response"] and two.json()["success"] is True
    prompt = one.json()["usage"]["prompt_tokens"]
    assert two.json()["usage"] == {**one.json()["usage"], "cached_tokens": prompt,
                                   "prompt_tokens_details": {"cached_tokens": prompt}}
    refused = cached.post("/predict", {**ask, "temperature": 7}, token=token)
    assert refused.status_code == 400 and "x-cache" not in refused.headers  # checked before the cache


def test_a_hit_costs_no_token_budget_but_counts_against_the_rate_limit(cached):
    prompt = chat(cached, cached.token).json()["usage"]["prompt_tokens"]  # the root user's, not ours
    token = user_token(cached, "thrifty", "--rate-limit", "3/minute", "--daily-tokens", str(prompt + 10))
    assert chat(cached, token).headers["x-cache"] == "miss"
    other = chat(cached, token, [{"role": "user", "content": "And 13 * 13?"}])
    assert other.status_code == 429 and other.json()["error"]["code"] == "daily_token_quota_exceeded"
    hit = chat(cached, token)
    assert hit.status_code == 200 and hit.headers["x-cache"] == "hit"  # the budget is spent, the hit still answers
    limited = chat(cached, token)
    assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limit_exceeded"
    today = cached.get("/v1/me", token=token).json()["today"]
    assert today["requests"] == 2 and today["total_tokens"] <= prompt + 10  # the hit's tokens are not counted
    day = cached.get("/admin/usage", params={"user": "thrifty"}).json()["data"][0]
    assert day["cached"] == 1 and day["total_tokens"] == today["total_tokens"]


def test_streams_are_stored_and_replayed_as_chunks(cached):
    token = user_token(cached, "streamer")
    messages = [{"role": "user", "content": "Name three primes."}]
    miss, pieces, finish, usage = stream(cached, token, messages, max_tokens=24)
    hit, replayed, finish_again, usage_again = stream(cached, token, messages, max_tokens=24)
    assert (miss, hit) == ("miss", "hit")
    assert "".join(replayed) == "".join(pieces) and finish_again == finish
    assert usage_again == [replayed_usage(usage[0])]
    assert len(replayed) > 1 or len("".join(pieces)) <= 16  # pieces, not one lump
    whole = chat(cached, token, messages, max_tokens=24)  # a whole answer of the same request: the same entry
    assert whole.headers["x-cache"] == "hit" and whole.json()["choices"][0]["message"]["content"] == "".join(pieces)


def test_only_deterministic_requests_are_cached(cached):
    token = user_token(cached, "sampler")
    sampled = [chat(cached, token, temperature=0.9) for _ in range(2)]
    assert all(r.status_code == 200 and "x-cache" not in r.headers for r in sampled)
    seeded = [chat(cached, token, temperature=0.9, seed=7) for _ in range(2)]
    assert [r.headers["x-cache"] for r in seeded] == ["miss", "hit"]
    assert seeded[0].json()["choices"] == seeded[1].json()["choices"]
    assert chat(cached, token, temperature=0.9, seed=8).headers["x-cache"] == "miss"  # another seed, another key
    assert chat(cached, token, max_tokens=9).headers["x-cache"] == "miss"  # every parameter is in the key


def test_users_never_share_entries_unless_the_cache_is_shared(cached, start_server, redis):
    ann, bob = user_token(cached, "ann"), user_token(cached, "bob")
    question = [{"role": "user", "content": "A private question about 17."}]
    assert [chat(cached, t, question).headers["x-cache"] for t in (ann, ann, bob)] == ["miss", "hit", "miss"]
    shared = start_server(VIBE_RATELIMIT_STORAGE_URI=redis.uri, VIBE_CACHE="shared")
    carl, dana = user_token(shared, "carl"), user_token(shared, "dana")
    assert [chat(shared, t, question).headers["x-cache"] for t in (carl, dana)] == ["miss", "hit"]
    shared.stop()


def test_a_changed_model_never_serves_an_old_answer(start_server, redis, tmp_path_factory, tiny_model):
    folder = tmp_path_factory.mktemp("revision") / "model"
    shutil.copytree(tiny_model, folder)
    server = start_server(VIBE_RATELIMIT_STORAGE_URI=redis.uri, VIBE_CACHE="user", VIBE_MODEL_PATH=folder)
    ask = lambda: chat(server, server.token, [{"role": "user", "content": "Which revision?"}])  # noqa: E731
    assert [ask().headers["x-cache"] for _ in range(2)] == ["miss", "hit"]
    server.restart()
    assert ask().headers["x-cache"] == "hit"  # the same files: the entry outlives a restart
    weights = folder / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # a new model's files
    server.restart()
    assert ask().headers["x-cache"] == "miss"
    server.stop()


def test_purge_from_the_cli_and_over_http_is_audited(cached):
    token = user_token(cached, "purged")
    assert [chat(cached, token).headers["x-cache"] for _ in range(2)] == ["miss", "hit"]
    done = cached.cli("cache", "purge", "--user", "purged")
    assert done.stdout.strip() == "purged 1 cached answer(s)"
    assert chat(cached, token).headers["x-cache"] == "miss"
    assert chat(cached, token).headers["x-cache"] == "hit"
    purged = cached.post("/admin/cache/purge", {"model": "vibethinker-1.5b"})
    assert purged.status_code == 200 and purged.json()["purged"] >= 1 and purged.json()["cache"] == "user"
    assert chat(cached, token).headers["x-cache"] == "miss"
    assert cached.post("/admin/cache/purge", {"model": "gpt-4o"}).status_code == 404
    assert cached.post("/admin/cache/purge", {"user": "nobody"}).status_code == 404
    assert cached.post("/admin/cache/purge", {"user": "purged"}, token=token).status_code == 403
    failed = cached.cli("cache", "purge", "--model", "gpt-4o", check=False)
    assert failed.returncode == 1 and "not served here" in failed.stderr
    audit = cached.get("/admin/audit", params={"action": "cache.purge"}).json()["data"]
    assert {(a["target"], a["source"]) for a in audit} >= {("purged", "cli"), ("*", "127.0.0.1")}


def test_an_answer_cut_short_is_never_stored(cached):
    token = user_token(cached, "leaver")
    body = {"model": "VibeThinker-1.5B", "messages": [{"role": "user", "content": "Count slowly."}],
            "max_tokens": 2000, "temperature": 0, "stream": True}
    with requests.post(cached.url("/v1/chat/completions"), json=body, headers=cached.auth(token), stream=True,
                       timeout=60) as response:
        assert response.headers["x-cache"] == "miss"
        next(response.iter_lines())  # the first event, then the client goes away
    time.sleep(1)
    with requests.post(cached.url("/v1/chat/completions"), json=body, headers=cached.auth(token), stream=True,
                       timeout=60) as response:
        assert response.headers["x-cache"] == "miss"


def test_batch_lines_are_answered_from_the_cache_and_fill_it(cached):
    token = user_token(cached, "batcher")
    live = chat(cached, token)
    assert live.headers["x-cache"] == "miss"
    client = openai.OpenAI(base_url=cached.url("/v1"), api_key=token, max_retries=0, timeout=60)
    lines = [{"custom_id": "same", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "VibeThinker-1.5B", "messages": QUESTION, "max_tokens": 10, "temperature": 0}},
             {"custom_id": "new", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "VibeThinker-1.5B", "messages": [{"role": "user", "content": "What is 5 * 5?"}],
                       "max_tokens": 10, "temperature": 0}}]
    uploaded = client.files.create(file=("q.jsonl", io.BytesIO("".join(json.dumps(x) + "\n" for x in lines)
                                                               .encode())), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    deadline = time.monotonic() + 120
    while batch.status not in ("completed", "failed") and time.monotonic() < deadline:
        time.sleep(0.2)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed", batch
    output = {o["custom_id"]: o for o in map(json.loads, client.files.content(batch.output_file_id).text.splitlines())}
    assert output["same"]["response"]["body"]["choices"] == live.json()["choices"]
    assert output["same"]["response"]["body"]["usage"] == replayed_usage(live.json()["usage"])
    rows = last_usage_rows(cached, 2)
    assert sorted((r[0], r[1], r[3]) for r in rows) == [("batcher", "/v1/batches", 0), ("batcher", "/v1/batches", 1)]
    again = chat(cached, token, lines[1]["body"]["messages"])  # the line's answer was stored
    assert again.headers["x-cache"] == "hit"
    assert again.json()["choices"][0]["message"]["content"] == \
        output["new"]["response"]["body"]["choices"][0]["message"]["content"]


def test_redis_down_means_no_cache_never_an_error(start_server, tmp_path_factory):
    own = Redis(tmp_path_factory.mktemp("redis-down")).start()
    try:
        server = start_server(VIBE_RATELIMIT_STORAGE_URI=own.uri, VIBE_CACHE="user", VIBE_RATELIMIT_FAIL_OPEN="true")
        first = chat(server, server.token)
        assert [first.headers["x-cache"], chat(server, server.token).headers["x-cache"]] == ["miss", "hit"]
        own.stop()
        down = chat(server, server.token)
        assert down.status_code == 200 and down.headers["x-cache"] == "miss"
        assert down.json()["choices"] == first.json()["choices"]  # computed again
        assert "response cache lookup failed" in server.log()
        purge = server.post("/admin/cache/purge", {})
        assert purge.status_code == 503 and purge.json()["error"]["code"] == "cache_unavailable"
        own.start()
        assert [chat(server, server.token).headers["x-cache"] for _ in range(2)] == ["miss", "hit"]
        server.stop()
    finally:
        own.stop()
