"""What the service refuses, as typed errors, and the one error shape they are shown in.

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}

Everything below the HTTP edge (inputs, admission, serving, batches) raises
a `Refusal` of the kind that says why: a bad request, a body too large, a
limit reached, a model not ready, a deadline passed. Each carries its
precise message, machine-readable code and the parameter at fault; none
knows its HTTP status. This module's HTTP mapping gives each kind its
status and headers in one table (`STATUS`, `headers_of`), for the HTTP
layer's responses (service.api.errors) and a batch's error file. The batch
runner decides by kind too (a spent budget fails a line; a full queue puts
it back), never by a string code. Nothing here imports anything of the
service, nor Flask.
"""


class Refusal(Exception):
    """A request the service will not answer as asked, for a reason its client should see."""

    def __init__(self, message, code, param=None, retry_after=None, extra=None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param
        self.retry_after = retry_after  # seconds a client should wait before asking again, when it may
        self.extra = dict(extra or {})  # fields beside "error" (/readyz: each model's state)


class BadRequest(Refusal):
    """A field, parameter or body that is not what the contract says."""


class PromptTooLong(BadRequest):
    """The prompt, or the prompt and the answer asked for, does not fit; `param` names the field to change."""


class Forbidden(Refusal):
    """A caller without the right to this (a disabled account, a model or system prompt not allowed)."""


class NotFound(Refusal):
    """No such thing here, or none this caller may see."""


class Conflict(Refusal):
    """A thing in a state that does not allow this (a batch that already ended)."""


class TooLarge(Refusal):
    """A body, file or document over its size limit."""


class UnsupportedMedia(Refusal):
    """A body or document of a type the service does not read."""


class Unprocessable(Refusal):
    """Well-formed but refused: the content policy, or a document that cannot be read."""


class LimitReached(Refusal):
    """A per-caller limit is full for now (concurrency, open batches): retry after `retry_after`."""


class NoSlot(LimitReached):
    """Every concurrency slot of the caller is taken."""


class OverBudget(LimitReached):
    """The caller's daily token budget cannot hold this request; it resets at midnight UTC (`lease`: the
    refused reservation, for the budget's figures)."""

    def __init__(self, message, code, param=None, retry_after=None, lease=None):
        super().__init__(message, code, param, retry_after)
        self.lease = lease


class RateLimited(LimitReached):
    """The caller's request rate limit is reached; `final` when it is a daily one (no point retrying)."""

    def __init__(self, message, code, param=None, retry_after=None, final=False):
        super().__init__(message, code, param, retry_after)
        self.final = final


class Unimplemented(Refusal):
    """Something this server cannot do at all (OCR without its libraries)."""


class Unavailable(Refusal):
    """The service cannot take this now (a model loading, a queue full, a store unreachable): retry later."""


class DeadlineExceeded(Refusal):
    """The request's time ran out before its answer (or its document) was ready."""


class ClientGone(Refusal):
    """The client closed its connection before the answer was ready."""


# Each kind of refusal's status; a kind not named takes its nearest parent's.
STATUS = {
    BadRequest: 400, Forbidden: 403, NotFound: 404, Conflict: 409, TooLarge: 413,
    UnsupportedMedia: 415, Unprocessable: 422, LimitReached: 429,
    ClientGone: 499, Unimplemented: 501, Unavailable: 503, DeadlineExceeded: 504,
}
# OpenAI-style error types by status, so clients map them to their exception classes.
TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 405: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
    415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error", 499: "client_closed",
    500: "server_error", 501: "server_error", 503: "overloaded_error", 504: "timeout_error",
}


def error_body(status, message, code, param=None):
    """The one error shape, as a dict."""
    return {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def body_of(refusal):
    """A refusal in the one error shape."""
    return error_body(status_of(refusal), refusal.message, refusal.code, refusal.param)


def status_of(refusal):
    """The HTTP status of a refusal, by its kind."""
    return next(STATUS[kind] for kind in type(refusal).__mro__ if kind in STATUS)


def headers_of(refusal):
    """The headers a refusal's answer carries: when to retry, and a spent budget's figures."""
    headers = {} if refusal.retry_after is None else {"Retry-After": refusal.retry_after}
    if isinstance(refusal, OverBudget) or getattr(refusal, "final", False):
        headers["x-should-retry"] = "false"  # a daily limit: retrying today cannot succeed
    if isinstance(refusal, OverBudget) and refusal.lease is not None:
        headers.update(token_headers(refusal.lease))
    return headers


def token_headers(lease):
    """x-ratelimit-*-tokens of a budget lease (none when the storage was down and it holds nothing)."""
    if lease is None or not lease.held:
        return {}
    return {"x-ratelimit-limit-tokens": lease.daily,
            "x-ratelimit-remaining-tokens": max(lease.daily - lease.total, 0),
            "x-ratelimit-reset-tokens": f"{lease.reset_s}s"}
