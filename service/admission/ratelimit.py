"""Request rate limits (flask-limiter) and the failed-authentication limit, with their headers.

- Request rate: keyed by the token's user (never the IP), with the user's own
  limit from the store or the default from settings; storage in Redis so every
  worker shares it and it survives restarts. A member of a team with a rate
  limit also counts against the team's, keyed by the team's name: a request
  needs room in both.
- Failed authentication: limited per client IP (the real one, through
  ProxyFix); past the limit a bad or missing token gets 429 instead of 401.
- Storage down: 503 (fail closed) by default, or serve unlimited (fail open).

Responses carry OpenAI-style headers: x-ratelimit-{limit,remaining,reset}-
requests here, the -tokens ones from the request's budget lease
(service.admission.budget), retry-after on every 429/503, and
x-should-retry: false when a daily limit is spent.
"""

import logging
import time

from flask import g, has_request_context, request
from flask_limiter import Limiter
from flask_limiter.errors import RateLimitExceeded
from limits import parse_many

from service.admission import ratestore
from service.admission.budget import DAY_S
from service.admission.counters import StorageUnavailable
from service.admission.rates import LIVE_SCOPE, TEAM_SCOPE, team_key, user_key
from service.api.errors import error_response, refusal_response
from service.errors import RateLimited, Unavailable
from service.state import state

log = logging.getLogger("vibethinker.ratelimit")


def init_app(app, settings, limited_blueprints, polls=frozenset()):
    """Bind the limiter (after the auth hook, so it sees the user): `limited_blueprints` count against the
    user's request rate limit, except their endpoints named in `polls` (retrieves, lists), which count
    against the generous polling limit instead."""
    uri = settings.ratelimit_storage_uri
    limiter = Limiter(key_func=_user_key, storage_uri=uri if uri.startswith("memory://") else ratestore.SCHEME + uri,
                      strategy="moving-window",
                      headers_enabled=False, swallow_errors=settings.ratelimit_fail_open,
                      storage_options={"socket_timeout": 2, "socket_connect_timeout": 2})
    for bp in limited_blueprints:
        limiter.shared_limit(_user_limit, scope=LIVE_SCOPE, key_func=_user_key,
                             exempt_when=lambda: request.endpoint in polls)(bp)
        limiter.shared_limit(_team_limit, scope=TEAM_SCOPE, key_func=_team_key,
                             exempt_when=lambda: request.endpoint in polls or not g.auth.get("team_rate_limit"))(bp)
        if any(endpoint.startswith(f"{bp.name}.") for endpoint in polls):
            limiter.shared_limit(lambda: state().settings.poll_rate_limit, scope="poll", key_func=_user_key,
                                 exempt_when=lambda: request.endpoint not in polls)(bp)
    limiter.init_app(app)
    if settings.ratelimit_storage_uri.startswith("memory://"):
        log.warning("rate limits, token budgets and concurrency use memory://: per process and lost on "
                    "restart; set VIBE_RATELIMIT_STORAGE_URI to Redis in production")
    state(app).limiter = limiter
    if isinstance(limiter.storage, ratestore.FoldedRedisStorage):
        limiter.storage.request = _scratch
    limiter.vibethinker_live = frozenset(bp.name for bp in limited_blueprints), frozenset(polls)
    app.teardown_request(_give_back)
    app.register_error_handler(RateLimitExceeded, _rate_limited)
    app.register_error_handler(StorageUnavailable, _storage_down)
    try:
        import redis

        app.register_error_handler(redis.exceptions.RedisError, _storage_down)
    except ImportError:  # memory:// only
        pass
    app.after_request(_headers)


def _user_key():
    return user_key(g.auth["user"])


def _user_limit():
    return _limit_of(g.auth)


def _team_key():
    return team_key(g.auth["team"]) if g.auth.get("team") else _user_key()


def _team_limit():  # flask-limiter reads it even when exempt (no team, or no team rate limit)
    return g.auth.get("team_rate_limit") or _limit_of(g.auth)


def _limit_of(token):
    return token.get("rate_limit") or state().settings.default_rate_limit


def prefetch(token):
    """The guard's read of the access epoch for a token it holds cached, with the hits flask-limiter will make
    for that token's request rate limit on this request folded into the same trip (service.admission.ratestore).
    """
    limiter, timings = state().limiter, g.record.timings  # the request's (service.api.accounting)
    if not isinstance(limiter.storage, ratestore.FoldedRedisStorage):
        return state().counters.get_epoch()
    windows = _windows(limiter, token)
    timings.lap("auth")
    try:
        return limiter.storage.prefetch(windows)
    finally:
        timings.lap("limits")  # the rate limit's trip, whatever else it brings


def _windows(limiter, token):
    """The windows flask-limiter hits for `token`'s request here, in its order, as (key, limit, expiry, amount):
    none off the limited routes, or on a polling route (its own limit, not prefetched)."""
    blueprints, polls = limiter.vibethinker_live
    if request.blueprint not in blueprints or request.endpoint in polls or request.routing_exception is not None:
        return []
    levels = [(user_key(token["user"]), LIVE_SCOPE, _limit_of(token))]
    if token.get("team") and token.get("team_rate_limit"):
        levels.append((team_key(token["team"]), TEAM_SCOPE, token["team_rate_limit"]))
    found = []  # (item, key, scope): the user's, then the team's, as the limits are registered
    for key, scope, limit in levels:
        try:
            found += [(item, key, scope) for item in parse_many(limit)]
        except ValueError:  # a stored limit limits cannot read: flask-limiter says so itself (a 500), as before
            break
    # flask-limiter hits them smallest window first (a stable sort of its registration order): so do we.
    return [(item.key_for(key, scope), item.amount, item.get_expiry(), 1)
            for item, key, scope in sorted(found, key=lambda window: window[0])]


def _scratch():
    """This request's scratch of the rate limit's storage (ratestore.scratch), made on first use."""
    if not has_request_context():
        return None
    if "rate_scratch" not in g:
        g.rate_scratch = ratestore.scratch()
    return g.rate_scratch


def _give_back(_exc):
    """Prefetched hits flask-limiter did not make (a refusal before it, a limit changed meanwhile): undone."""
    if "rate_scratch" in g and g.rate_scratch["prefetched"]:
        try:
            state().limiter.storage.give_back()
        except Exception:  # noqa: BLE001 - the storage went away: the entries expire with their window
            log.warning("prefetched rate-limit hits not given back: storage unreachable")


def _rate_limited(exc):
    window = exc.limit.limit
    per_day = window.get_expiry() >= DAY_S
    retry = _request_reset_s() or 1
    whose = f"team {g.auth['team']} (of {g.auth['user']})" if exc.limit.scope == TEAM_SCOPE else g.auth["user"]
    return refusal_response(RateLimited(f"rate limit of {window} reached for {whose}; retry in {retry} s",
                                        "rate_limit_exceeded", retry_after=retry, final=per_day))


def _storage_down(exc):
    log.error("rate-limit storage unreachable: %s", type(exc).__name__)
    return refusal_response(Unavailable("rate-limit storage is unreachable, so requests are refused until it is "
                                        "back", "ratelimit_storage_unavailable", retry_after=5))


def _request_reset_s():
    current = state().limiter.current_limit
    return max(0, int(current.reset_at - time.time())) if current else None


def _headers(response):
    """x-ratelimit-*-requests from flask-limiter's window (the -tokens ones are the request record's:
    service.api.accounting)."""
    try:
        current = state().limiter.current_limit if g.get("auth") else None
        if current is not None:
            response.headers["x-ratelimit-limit-requests"] = str(current.limit.amount)
            response.headers["x-ratelimit-remaining-requests"] = str(current.remaining)
            response.headers["x-ratelimit-reset-requests"] = f"{max(0, int(current.reset_at - time.time()))}s"
    except Exception:  # the storage went away between check and response: headers are best effort
        log.warning("rate-limit headers skipped: storage unreachable")
    return response


def record_auth_failure(status, message, code):
    """The auth layer's refusal, counted per client IP: past the limit, 429 instead of 401."""
    if status == 401:
        ip = request.remote_addr or "-"
        strategy, items = state().limiter.limiter, parse_many(state().settings.anonymous_rate_limit)
        try:
            spent = [item for item in items if not strategy.hit(item, "auth-failures", ip)]
            if spent:  # the limit the client ran into, as x-ratelimit-* headers say for any 429
                reset_at, _ = strategy.get_window_stats(spent[0], "auth-failures", ip)
                retry = max(1, int(reset_at - time.time()))
                return error_response(429, f"too many unauthenticated requests from {ip}; slow down",
                                      "too_many_auth_failures", headers={
                                          "Retry-After": retry, "x-ratelimit-limit-requests": spent[0].amount,
                                          "x-ratelimit-remaining-requests": 0,
                                          "x-ratelimit-reset-requests": f"{retry}s"})
        except Exception:  # storage down: the request is refused anyway
            log.warning("auth-failure counter unreachable")
    return error_response(status, message, code)
