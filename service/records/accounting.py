"""The request record, and after every request: HTTP metrics, the usage row, one JSON log line.

Each request gets one `RequestRecord` (its id, start, refusal code, budget
lease and usage); the modules that serve the request write to it through
`current()` rather than through loose names on flask.g. A generation's usage
is settled from its result (`Usage.of`), whatever became of the request.

`finish` writes the usage row and the log line: after the response for plain
requests, when the stream ends for streams (499: the client left). The row is
written before the response leaves, so a crash after it cannot lose it. The
log line has who, what route, status, latency, tokens, finish reason and
refusal reason; never a token or prompt text.
"""

import logging
import time
from dataclasses import dataclass, field

from flask import g, request

from service.records import metrics, requestid
from service.state import state

log = logging.getLogger("vibethinker.requests")


@dataclass(frozen=True)
class Usage:
    """What a generation used, as its usage row and log line record it."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    cached: bool = False  # answered from the response cache: nothing computed, no budget spent

    @classmethod
    def of(cls, result):
        """From a GenerationResult; None (it never ran or the engine failed) used nothing."""
        if result is None:
            return cls()
        return cls(result.prompt_tokens, result.completion_tokens, result.finish_reason)

    @property
    def total(self):
        return self.prompt_tokens + self.completion_tokens

    def fields(self):
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "finish_reason": self.finish_reason, "cached": self.cached}


@dataclass
class RequestRecord:
    """One request, as accounting will write it down."""

    request_id: str
    started: float
    route: str = "unmatched"
    error_code: str | None = None  # the refusal's code, from service.errors' response
    lease: object = None  # the budget lease (service.admission.budget), once admitted
    usage: Usage | None = None  # set once an admitted generation settled: then a usage row is written
    streamed: bool = False  # the stream writes its own row when it ends
    model: str | None = None  # the served model that answers (its name from the settings)
    cache_key: object = None  # service.api.cache.Key, when the request can be cached
    cache: str | None = None  # "hit" or "miss" once the cache was asked: the x-cache header
    documents: list = field(default_factory=list)  # DocumentCost of each document read (service.api.attachments)
    hint: str | None = None  # the English hint (service.inputs.language): the x-vibethinker-hint header
    reading_since: float | None = None  # documents' time runs from here (a batch line's start), else `started`

    @property
    def latency(self):
        return time.monotonic() - self.started

    def document_costs(self):
        """The usage row's document fields: PDF pages and images read, and the time reading took."""
        return {"document_pages": sum(d.pages for d in self.documents if d.kind == "pdf"),
                "document_images": sum(d.images for d in self.documents),
                "document_ms": int(sum(d.seconds for d in self.documents) * 1000)}


@dataclass(frozen=True)
class DocumentCost:
    """A document read for a request, as its record keeps it (never its text)."""

    kind: str  # "pdf" or "image"
    pages: int
    images: int  # read by OCR
    seconds: float
    size: int  # bytes


def current():
    """The record of the request being served."""
    return g.record


def _open():
    g.record = RequestRecord(requestid.choose(request.headers), time.monotonic(),
                             request.url_rule.rule if request.url_rule else "unmatched")


def _account(response):
    record = current()
    status = response.status_code
    record.error_code = getattr(response, "error_code", None)
    metrics.HTTP_REQUESTS.labels(record.route, metrics.method_label(request.method), str(status)).inc()
    metrics.REQUEST_DURATION.labels(record.route).observe(record.latency)
    reason = metrics.refusal_reason(status, record.error_code)
    if reason:
        metrics.REFUSALS.labels(reason).inc()
    if record.cache is not None and status < 400:
        response.headers["x-cache"] = record.cache
    if record.hint is not None and status < 400:
        response.headers["x-vibethinker-hint"] = record.hint
    if not record.streamed:
        finish(record, status, "request")
    return response


def finish(record, status, message="stream ended"):
    """The usage row (for an admitted generation) and the log line of a request or a stream."""
    latency = record.latency
    auth = g.get("auth")
    if record.usage is not None:
        _write_usage(record, auth["user"], status, latency)
    fields = {"method": request.method, "route": record.route, "status": status,
              "latency_ms": round(latency * 1000, 1), "user": auth["user"] if auth else None,
              "client_ip": request.remote_addr}
    if record.model is not None:
        fields["model"] = record.model
    if record.cache is not None:
        fields["cache"] = record.cache
    if record.usage is not None:
        fields.update(record.usage.fields())
    if record.documents:
        fields.update(documents=len(record.documents), **record.document_costs())
    if record.error_code:
        fields.update(error_code=record.error_code, refusal=metrics.refusal_reason(status, record.error_code))
    log.info(message, extra={"fields": fields})


def _write_usage(record, user, status, latency):
    try:
        state().usage_log.write(user=user, route=record.route, status=status, latency_ms=int(latency * 1000),
                                request_id=record.request_id, model=record.model, **record.usage.fields(),
                                **record.document_costs())
    except Exception:  # the answer is computed; say loudly that its record is missing
        log.exception("usage row not written", extra={"fields": {"user": user, "route": record.route}})


def init_app(app):
    app.before_request(_open)
    app.after_request(_account)
