"""Rate limits, token budgets, concurrency caps and storage failure, against real gunicorn and real Redis."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.support.databases import Redis
from tests.support.tokens import user_token

pytestmark = pytest.mark.slow  # real restarts, many CLI calls or long runs: not in make test-quick


@pytest.fixture(scope="module")
def limited(start_server, redis_server):
    """A server whose counters live in the session's Redis."""
    return start_server(VIBE_RATELIMIT_STORAGE_URI=redis_server.uri, VIBE_ANONYMOUS_RATE_LIMIT="3/minute")


def ask(server, token, max_new_tokens=1, question="hi", timeout=60):
    return server.post("/predict", {"question": question, "temperature": 0, "max_new_tokens": max_new_tokens},
                       token=token, timeout=timeout)


def test_twelve_concurrent_requests_of_a_five_per_minute_user(limited):
    token = user_token(limited, "five", "--rate-limit", "5/minute", "--max-concurrent", "20")
    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda _: ask(limited, token), range(12)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 5 + [429] * 7
    refused = next(r for r in responses if r.status_code == 429)
    error = refused.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "rate_limit_error"
    assert refused.json()["success"] is False and int(refused.headers["Retry-After"]) >= 1
    assert refused.headers["x-ratelimit-limit-requests"] == "5"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"].endswith("s")
    assert "x-should-retry" not in refused.headers  # a per-minute limit: retrying later helps

    other = user_token(limited, "unaffected")
    assert ask(limited, other).status_code == 200

    limited.restart()  # the counters are in Redis, not in the worker
    assert ask(limited, token).status_code == 429
    assert ask(limited, other).status_code == 200


def test_success_carries_rate_limit_headers(limited):
    token = user_token(limited, "headers", "--rate-limit", "10/minute", "--daily-tokens", "5000")
    response = ask(limited, token, max_new_tokens=3)
    assert response.status_code == 200
    assert (response.headers["x-ratelimit-limit-requests"], response.headers["x-ratelimit-remaining-requests"]) \
        == ("10", "9")
    total = response.json()["usage"]["total_tokens"]
    assert response.headers["x-ratelimit-limit-tokens"] == "5000"
    assert response.headers["x-ratelimit-remaining-tokens"] == str(5000 - total)
    assert response.headers["x-ratelimit-reset-tokens"].endswith("s")


def test_daily_token_budget_is_reserved_before_and_settled_after(limited):
    token = user_token(limited, "budget", "--daily-tokens", "300", "--max-concurrent", "5")
    first = ask(limited, token, max_new_tokens=100)
    assert first.status_code == 200
    used = first.json()["usage"]["total_tokens"]
    left = 300 - used
    assert first.headers["x-ratelimit-remaining-tokens"] == str(left)
    prompt = first.json()["usage"]["prompt_tokens"]
    assert prompt + 100 > left, "the test needs the second request not to fit"
    refused = ask(limited, token, max_new_tokens=100)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "daily_token_quota_exceeded"
    assert refused.json()["error"]["param"] == "max_new_tokens"
    assert refused.headers["x-should-retry"] == "false" and int(refused.headers["Retry-After"]) > 0
    assert f"{left} tokens left" in refused.json()["error"]["message"]
    assert refused.headers["x-ratelimit-remaining-tokens"] == str(left)  # a refusal costs nothing
    small = left - prompt
    assert ask(limited, token, max_new_tokens=small).status_code == 200  # what fits still runs


def test_concurrency_cap_refuses_the_extra_request_at_once(limited, long_question):
    token = user_token(limited, "conc", "--max-concurrent", "1")
    results = {}
    running = threading.Thread(target=lambda: results.setdefault("long", ask(limited, token, 2048, long_question)))
    running.start()
    deadline = time.monotonic() + 10
    while requests.get(limited.url("/readyz"), timeout=5).json()["running"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    started = time.monotonic()
    refused = ask(limited, token)
    assert time.monotonic() - started < 0.5
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "concurrency_limit_exceeded"
    assert refused.headers["Retry-After"] == "1"
    running.join()
    assert results["long"].status_code == 200
    assert ask(limited, token).status_code == 200  # the slot was released


def test_failed_authentication_is_limited_per_ip(limited):
    statuses = [requests.post(limited.url("/predict"), json={"question": "hi"}, timeout=10,
                              headers={"Authorization": "Bearer bad.token.here"}).status_code for _ in range(5)]
    assert statuses == [401, 401, 401, 429, 429]
    refused = requests.get(limited.url("/v1/me"), timeout=10)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_auth_failures"
    assert ask(limited, limited.token).status_code == 200  # a valid token from the same address still works


@pytest.mark.parametrize("fail_open", [False, True])
def test_redis_down_then_back(start_server, tmp_path_factory, fail_open):
    redis = Redis(tmp_path_factory.mktemp("redis-own")).start()
    try:
        server = start_server(VIBE_RATELIMIT_STORAGE_URI=redis.uri, VIBE_RATELIMIT_FAIL_OPEN=str(fail_open).lower())
        token = user_token(server, "flaky", "--rate-limit", "100/minute")
        assert ask(server, token).status_code == 200
        redis.stop()
        ready = requests.get(server.url("/readyz"), timeout=10)
        assert ready.status_code == (200 if fail_open else 503)
        down = ask(server, token)
        if fail_open:
            assert down.status_code == 200
        else:
            assert down.status_code == 503, down.text
            assert down.json()["error"]["code"] == "ratelimit_storage_unavailable"
            assert "unreachable" in down.json()["error"]["message"] and down.headers["Retry-After"] == "5"
        redis.start()
        assert ask(server, token).status_code == 200  # recovery needs no restart
        assert requests.get(server.url("/readyz"), timeout=10).status_code == 200
        server.stop()
    finally:
        redis.stop()
