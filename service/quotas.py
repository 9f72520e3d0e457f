"""Who may use how much: per-user rate limits, daily token budgets and concurrency caps.

- Request rate: flask-limiter, keyed by the token's user (never the IP), with
  the user's own limit from the store or the default from settings; storage in
  Redis so every worker shares it and it survives restarts.
- Failed authentication: limited per client IP (the real one, through
  ProxyFix); past the limit a bad or missing token gets 429 instead of 401.
- Daily token budget and concurrency: `admit` reserves prompt + max_new_tokens
  and a slot before the engine runs, and settles the real count after.
- Storage down: 503 (fail closed) by default, or serve unlimited (fail open).

Responses carry OpenAI-style headers: x-ratelimit-{limit,remaining,reset}-
{requests,tokens}, retry-after on every 429/503, and x-should-retry: false
when a daily quota is spent.
"""

import logging
import time
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone

from flask import current_app, g, request
from flask_limiter import Limiter
from flask_limiter.errors import RateLimitExceeded
from limits import parse_many

from service.counters import StorageUnavailable, open_counters
from service.errors import APIError, error_response

log = logging.getLogger("vibethinker.quotas")
DAY_S = 86400


def init_app(app, settings, limited_blueprints):
    """Bind the limiter (after the auth hook, so it sees the user) and the admission counters."""
    limiter = Limiter(key_func=_user_key, storage_uri=settings.ratelimit_storage_uri, strategy="moving-window",
                      headers_enabled=False, swallow_errors=settings.ratelimit_fail_open,
                      storage_options={"socket_timeout": 2, "socket_connect_timeout": 2})
    for bp in limited_blueprints:
        limiter.shared_limit(_user_limit, scope="generate", key_func=_user_key)(bp)
    limiter.init_app(app)
    if settings.ratelimit_storage_uri.startswith("memory://"):
        log.warning("rate limits, token budgets and concurrency use memory://: per process and lost on "
                    "restart; set VIBE_RATELIMIT_STORAGE_URI to Redis in production")
    app.extensions["vibethinker.limiter"] = limiter
    app.extensions["vibethinker.counters"] = open_counters(settings.ratelimit_storage_uri)
    app.register_error_handler(RateLimitExceeded, _rate_limited)
    app.register_error_handler(StorageUnavailable, _storage_down)
    try:
        import redis

        app.register_error_handler(redis.exceptions.RedisError, _storage_down)
    except ImportError:  # memory:// only
        pass
    app.after_request(_headers)


def _settings():
    return current_app.extensions["vibethinker.settings"]


def _user_key():
    return f"user:{g.auth['user']}"


def _user_limit():
    return g.auth.get("rate_limit") or _settings().default_rate_limit


def _rate_limited(exc):
    window = exc.limit.limit
    per_day = window.get_expiry() >= DAY_S
    retry = _request_reset_s() or 1
    headers = {"Retry-After": retry, **({"x-should-retry": "false"} if per_day else {})}
    return error_response(429, f"rate limit of {window} reached for {g.auth['user']}; retry in {retry} s",
                          "rate_limit_exceeded", headers=headers)


def _storage_down(exc):
    log.error("rate-limit storage unreachable: %s", type(exc).__name__)
    return error_response(503, "rate-limit storage is unreachable, so requests are refused until it is back",
                          "ratelimit_storage_unavailable", headers={"Retry-After": 5})


def _request_reset_s():
    current = current_app.extensions["vibethinker.limiter"].current_limit
    return max(0, int(current.reset_at - time.time())) if current else None


def _headers(response):
    """x-ratelimit-* for requests (flask-limiter's window) and tokens (the daily budget)."""
    limiter = current_app.extensions["vibethinker.limiter"]
    try:
        current = limiter.current_limit if g.get("auth") else None
        if current is not None:
            response.headers["x-ratelimit-limit-requests"] = str(current.limit.amount)
            response.headers["x-ratelimit-remaining-requests"] = str(current.remaining)
            response.headers["x-ratelimit-reset-requests"] = f"{max(0, int(current.reset_at - time.time()))}s"
    except Exception:  # the storage went away between check and response: headers are best effort
        log.warning("rate-limit headers skipped: storage unreachable")
    for name, value in g.get("token_headers", {}).items():
        response.headers[name] = str(value)
    return response


def record_auth_failure(status, message, code):
    """The auth layer's refusal, counted per client IP: past the limit, 429 instead of 401."""
    if status == 401:
        ip = request.remote_addr or "-"
        limiter = current_app.extensions["vibethinker.limiter"].limiter
        try:
            allowed = all([limiter.hit(item, "auth-failures", ip)
                           for item in parse_many(_settings().anonymous_rate_limit)])
        except Exception:  # storage down: the request is refused anyway
            log.warning("auth-failure counter unreachable")
            allowed = True
        if not allowed:
            return error_response(429, f"too many unauthenticated requests from {ip}; slow down",
                                  "too_many_auth_failures", headers={"Retry-After": 60})
    return error_response(status, message, code)


class Ticket:
    """An admitted generation and what it used; accounting writes it to the usage table."""

    def __init__(self, user, prompt_tokens, reserved):
        self.user, self.prompt_tokens, self.reserved = user, prompt_tokens, reserved
        self.completion_tokens, self.finish_reason, self.ran = 0, None, False

    def complete(self, result):
        """Record a finished generation's real counts."""
        self.completion_tokens, self.finish_reason, self.ran = result.completion_tokens, result.finish_reason, True

    def fail(self, exc):
        """Record what a failed generation still spent (a deadline cut: what it computed)."""
        used = getattr(exc, "tokens_used", None)
        if used is not None:
            self.completion_tokens, self.finish_reason, self.ran = used - self.prompt_tokens, "timeout", True

    @property
    def used(self):
        return self.prompt_tokens + self.completion_tokens if self.ran else 0

    def counts(self):
        """What this generation used, as the usage row and log line record it (no prompt if it never ran)."""
        return {"prompt_tokens": self.prompt_tokens if self.ran else 0,
                "completion_tokens": self.completion_tokens, "finish_reason": self.finish_reason}


@contextmanager
def admit(token, prompt_tokens, max_new_tokens, deadline_s):
    """Hold a concurrency slot and reserve prompt + max_new_tokens of today's budget; settle on exit."""
    settings, counters = _settings(), current_app.extensions["vibethinker.counters"]
    user, need = token["user"], prompt_tokens + max_new_tokens
    ticket = Ticket(user, prompt_tokens, need)
    daily = token.get("daily_tokens") or settings.default_daily_tokens
    cap = token.get("max_concurrent") or settings.default_max_concurrent
    now = datetime.now(timezone.utc)
    budget_key, slot_key, member = f"budget:{user}:{now:%Y-%m-%d}", f"inflight:{user}", g.request_id
    reset_s = int((datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), timezone.utc)
                   - now).total_seconds()) + 1
    try:
        ok, total = _take(counters, budget_key, slot_key, member, need, daily, cap, deadline_s, user)
    except StorageUnavailable:
        if not settings.ratelimit_fail_open:
            raise
        log.warning("quota storage unreachable: serving %s without budget or concurrency limits", user)
        ok = None
    if ok is None:
        g.ticket = ticket
        yield ticket
        return
    left = max(daily - total, 0)
    g.token_headers = {"x-ratelimit-limit-tokens": daily, "x-ratelimit-remaining-tokens": left,
                       "x-ratelimit-reset-tokens": f"{reset_s}s"}
    if not ok:
        counters.free_slot(slot_key, member)
        spent = "is spent" if left == 0 else f"has {left} tokens left"
        raise APIError(429, f"daily token budget of {daily} {spent}; this request may use up to {need} "
                       "(prompt + max_new_tokens); it resets at 00:00 UTC", "daily_token_quota_exceeded",
                       "max_new_tokens", headers={"Retry-After": reset_s, "x-should-retry": "false"})
    g.ticket = ticket  # admitted: accounting writes its usage row, whatever happens next
    try:
        yield ticket
    except BaseException as exc:
        ticket.fail(exc)
        raise
    finally:
        _settle(counters, budget_key, slot_key, member, ticket, daily, total)


def _take(counters, budget_key, slot_key, member, need, daily, cap, deadline_s, user):
    """A concurrency slot, then the budget reservation: (reserved?, today's total)."""
    ok, held = counters.take_slot(slot_key, member, cap, int(deadline_s) + 60)
    if not ok:
        raise APIError(429, f"{user} already has {held} requests running; the limit is {cap} at a time",
                       "concurrency_limit_exceeded", headers={"Retry-After": 1})
    try:
        return counters.reserve(budget_key, need, daily, 2 * DAY_S)
    except StorageUnavailable:
        counters.free_slot(slot_key, member)
        raise


def _settle(counters, budget_key, slot_key, member, ticket, daily, total):
    try:
        total = counters.adjust(budget_key, ticket.used - ticket.reserved, 2 * DAY_S)
        counters.free_slot(slot_key, member)
    except StorageUnavailable:  # the slot expires on its own; the reservation stays counted
        log.warning("quota storage unreachable while settling %s", budget_key)
    g.token_headers["x-ratelimit-remaining-tokens"] = max(daily - total, 0)
