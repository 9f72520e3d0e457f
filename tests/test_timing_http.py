"""Every millisecond accounted, on real gunicorn with a real Redis: each generation answer's phases in
`Server-Timing`, the same phases in its log line and /metrics, a stream's in its usage chunk, who sees them, and
the Redis round trips one whole answer costs, counted by Redis's own MONITOR."""

import json
import re
import threading
import time

import openai
import pytest
import redis as redis_py
import requests

from tests.support.databases import Redis
from tests.support.metrics import counter
from tests.support.tokens import user_token

pytestmark = pytest.mark.slow
PHASES = ("auth", "limits", "admission", "queue", "documents", "template", "prefill", "decode", "record")
FORCED = " ".join(["seven"] * 300)  # the demo model says this (256 tokens and more) instead of its own choices


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    with Redis(tmp_path_factory.mktemp("redis-timing")).start() as server:
        yield server


@pytest.fixture(scope="module")
def server(start_server, redis):
    """Defaults, but Redis as in production and a forced answer long enough for 256 tokens."""
    return start_server(VIBE_RATELIMIT_STORAGE_URI=redis.uri, VIBE_FORCED_OUTPUT=FORCED)


def phases_of(header):
    """{name: ms} of a Server-Timing value, checking its W3C syntax (name;dur=number, comma separated)."""
    phases = {}
    for entry in header.split(","):
        match = re.fullmatch(r"\s*([a-z]+);dur=(\d+(?:\.\d+)?(?:e-?\d+)?)\s*", entry)
        assert match, f"not W3C Server-Timing: {entry!r}"
        phases[match[1]] = float(match[2])
    return phases


def covered(phases):
    """The share of the total that the named phases cover."""
    return sum(phases[name] for name in PHASES) / phases["total"]


def chat(server, tokens, request_id, stream=False, token=None):
    body = {"model": "auto", "max_tokens": tokens, "temperature": 0, "stream": stream,
            "messages": [{"role": "user", "content": "Count sevens."}]}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return server.post("/v1/chat/completions", body, token=token, headers={"X-Request-ID": request_id},
                       stream=stream)


def log_line(server, request_id):
    """The request's JSON log line (the last for that id), waiting for a stream's to be written."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = [json.loads(line) for line in server.log().splitlines()
                 if line.startswith("{") and f'"request_id": "{request_id}"' in line]
        lines = [line for line in lines if line.get("logger") == "vibethinker.requests"]
        if lines:
            return lines[-1]
        time.sleep(0.1)
    pytest.fail(f"no log line for {request_id}")


@pytest.mark.parametrize("tokens", [1, 256])
def test_a_whole_answer_says_where_its_time_went(server, tokens):
    chat(server, 1, f"warm-{tokens}")  # the token cached and the first request's one-off costs paid
    before = counter(server, "vibethinker_request_phase_seconds_count", route="/v1/chat/completions",
                     phase="decode")
    response = chat(server, tokens, f"timed-{tokens}")
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == tokens
    phases = phases_of(response.headers["Server-Timing"])
    assert set(PHASES) | {"total"} <= set(phases)
    assert phases["decode"] > 0 if tokens > 1 else phases["prefill"] > 0
    assert phases["documents"] == 0 and phases["auth"] > 0 and phases["limits"] > 0 and phases["admission"] > 0
    assert covered(phases) >= 0.9, phases
    # the log line has the same phases, to the microsecond
    line = log_line(server, f"timed-{tokens}")
    assert line["phases"] == {name: phases[name] for name in line["phases"]} and set(line["phases"]) == set(phases)
    assert counter(server, "vibethinker_request_phase_seconds_count", route="/v1/chat/completions",
                   phase="decode") == before + 1


def test_predict_and_a_refusal_carry_them_too(server):
    answer = server.post("/v1/predict", {"question": "Count sevens.", "max_new_tokens": 3})
    assert answer.status_code == 200 and covered(phases_of(answer.headers["Server-Timing"])) >= 0.9
    refused = server.post("/v1/chat/completions", {"model": "auto", "messages": []})
    assert refused.status_code == 400
    phases = phases_of(refused.headers["Server-Timing"])  # where a refusal's time went: no engine
    assert phases["queue"] == phases["prefill"] == phases["decode"] == 0 and phases["total"] > 0


def test_a_stream_sends_its_phases_in_its_usage_chunk(server):
    client = openai.OpenAI(base_url=server.url("/v1"), api_key=server.token, max_retries=0, timeout=60)
    try:
        with client.chat.completions.with_streaming_response.create(
                model="auto", max_tokens=40, temperature=0, stream=True, stream_options={"include_usage": True},
                messages=[{"role": "user", "content": "Count sevens."}],
                extra_headers={"X-Request-ID": "streamed-timing"}) as raw:
            head = phases_of(raw.headers["Server-Timing"])  # the head leaves before the first token
            chunks = list(raw.parse())
    finally:
        client.close()
    usage = chunks[-1]
    assert usage.usage.completion_tokens == 40
    phases = usage.model_extra["server_timing"]
    assert set(phases) >= set(PHASES) | {"total"} and phases["decode"] > 0 and phases["prefill"] > 0
    assert head["decode"] == 0 and head["total"] < phases["total"]
    assert covered(phases) >= 0.9, phases
    logged = log_line(server, "streamed-timing")["phases"]
    assert logged["decode"] == phases["decode"] and logged["total"] >= phases["total"]


def test_who_sees_the_phases_is_a_setting(start_server, redis):
    admins_only = start_server(VIBE_RATELIMIT_STORAGE_URI=redis.uri, VIBE_SERVER_TIMING="admin")
    user = user_token(admins_only, "timing-user")  # a generate-scope token
    hidden = chat(admins_only, 2, "hidden-timing", token=user)
    assert hidden.status_code == 200 and "Server-Timing" not in hidden.headers
    assert log_line(admins_only, "hidden-timing")["phases"]["decode"] >= 0  # the log has them all the same
    shown = chat(admins_only, 2, "shown-timing")  # the admin's token
    assert shown.status_code == 200 and phases_of(shown.headers["Server-Timing"])["total"] > 0


class Monitor:
    """Redis's MONITOR on its own connection: every command a client sends, as Redis saw it (a script's own
    calls, which MONITOR shows too, are left out: the script is one round trip)."""

    def __init__(self, uri):
        self.client = redis_py.Redis(unix_socket_path=uri.removeprefix("redis+unix://"))
        self.commands, self.ready = [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        with self.client.monitor() as monitor:
            self.ready.set()
            for entry in monitor.listen():
                if entry.get("client_type") == "lua":  # a script's own calls: its EVALSHA counts them
                    continue
                self.commands.append(entry["command"])
                if "MONITOR-END" in entry["command"]:
                    return

    def __enter__(self):
        self.thread.start()
        self.ready.wait(5)
        time.sleep(0.2)
        return self

    def __exit__(self, *exc):
        redis_py.Redis(unix_socket_path=self.client.connection_pool.connection_kwargs["path"]).echo("MONITOR-END")
        self.thread.join(10)
        self.client.close()

    def sent(self):
        """The commands sent, without the monitor's own and /readyz's PINGs."""
        return [c.split()[0].upper() for c in self.commands if "MONITOR-END" not in c and c.upper() != "PING"]


def monitored(*redises):
    """MONITORs on each of `redises`, entered together."""
    from contextlib import ExitStack

    stack = ExitStack()
    return stack, [stack.enter_context(Monitor(r.uri)) for r in redises]


def test_a_whole_answer_costs_three_redis_round_trips(server, redis):
    body = {"model": "auto", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    assert server.post("/v1/chat/completions", body).status_code == 200  # its token cached now
    with Monitor(redis.uri) as monitor:
        response = server.post("/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    assert int(response.headers["x-ratelimit-remaining-requests"]) >= 0  # read from the hit: no trip of its own
    # the rate limit's two windows (60/minute and 2000/day) with the access epoch in one script, the lease, its
    # release
    assert monitor.sent() == ["EVALSHA", "EVALSHA", "EVALSHA"], monitor.sent()


def test_with_the_response_cache_on_a_miss_adds_its_lookup_and_store(start_server, redis, tmp_path_factory):
    with Redis(tmp_path_factory.mktemp("redis-answers")).start() as answers:
        cached = start_server(VIBE_RATELIMIT_STORAGE_URI=redis.uri, VIBE_CACHE="user",
                              VIBE_CACHE_STORAGE_URI=answers.uri)
        ask = lambda question: cached.post("/v1/predict", {"question": question, "max_new_tokens": 2,
                                                                  "temperature": 0})  # noqa: E731
        assert ask("What is 1 + 1?").headers["x-cache"] == "miss"  # its token cached now
        stack, (counters, cache) = monitored(redis, answers)
        with stack:
            assert ask("What is 2 + 2?").headers["x-cache"] == "miss"
        assert counters.sent() == ["EVALSHA", "EVALSHA", "EVALSHA"], counters.sent()
        assert cache.sent() == ["GET", "SET"], cache.sent()
        stack, (counters, cache) = monitored(redis, answers)
        with stack:
            assert ask("What is 2 + 2?").headers["x-cache"] == "hit"
        assert counters.sent() == ["EVALSHA"], counters.sent()  # a hit takes no lease: the rate limit's trip only
        assert cache.sent() == ["GET"], cache.sent()
        cached.stop()


def windows(redis, amount, unit):
    """The entries of the request-rate windows of `amount` per `unit` (limits' keys, every user's)."""
    client = redis_py.Redis(unix_socket_path=str(redis.sock))
    try:
        return sum(client.llen(key) for key in client.scan_iter(match=f"LIMITS:LIMITER/*/{amount}/1/{unit}"))
    finally:
        client.close()


def test_a_limit_changed_meanwhile_counts_under_the_new_one_only(server, redis):
    """The folded trip hits the windows of the limit the cached token had; when the epoch says the user
    changed, the request is counted under their new limit, and the prefetched hit is given back."""
    token = user_token(server, "changing", "--rate-limit", "7/minute")
    ask = lambda: server.post("/v1/predict", {"question": "hi", "max_new_tokens": 1}, token=token)  # noqa: E731
    assert ask().status_code == 200 and windows(redis, 7, "minute") == 1
    server.cli("users", "set", "changing", "--rate-limit", "2/minute")  # a new epoch
    assert ask().status_code == 200
    assert ask().status_code == 200
    refused = ask()
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert windows(redis, 2, "minute") == 2 and windows(redis, 7, "minute") == 1  # the prefetched one given back


def test_a_revoked_tokens_request_counts_nothing(server, redis):
    token = user_token(server, "revoked-timing", "--rate-limit", "9/minute")
    assert server.post("/v1/predict", {"question": "hi", "max_new_tokens": 1}, token=token).status_code == 200
    server.cli("tokens", "revoke-all", "revoked-timing")
    refused = server.post("/v1/predict", {"question": "hi", "max_new_tokens": 1}, token=token)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "token_revoked"
    assert windows(redis, 9, "minute") == 1


def test_a_limit_written_twice_is_hit_twice_as_flask_limiter_would(server, redis):
    token = user_token(server, "twice", "--rate-limit", "4/minute;4/minute")
    ask = lambda: server.post("/v1/predict", {"question": "hi", "max_new_tokens": 1}, token=token)  # noqa: E731
    assert ask().status_code == 200  # two entries in the one list its two windows share; the token cached
    assert ask().status_code == 200  # prefetched: both hits, each answered to flask-limiter in turn
    assert ask().status_code == 429
    assert windows(redis, 4, "minute") == 4


def test_a_token_this_route_refuses_folds_no_hit_in(server, redis):
    """An admin-only token on a generation route: refused (403) from the worker's cache as from the database,
    with nothing counted against its user's rate limit, not even for the length of the request."""
    server.cli("users", "add", "scoped", "--admin", "--rate-limit", "11/minute")
    token = server.cli("tokens", "issue", "scoped", "--scope", "admin").stdout.strip().splitlines()[-1]
    assert server.get("/v1/me", token=token).status_code == 200  # the token checked, and cached
    for _ in range(2):
        refused = server.post("/v1/predict", {"question": "hi", "max_new_tokens": 1}, token=token)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "insufficient_scope"
    with Monitor(redis.uri) as monitor:
        assert server.post("/v1/predict", {"question": "hi"}, token=token).status_code == 403
    assert windows(redis, 11, "minute") == 0
    assert "LREM" not in monitor.sent() and monitor.sent() == ["GET"], monitor.sent()  # the epoch, read alone
