"""The request record, and after every request: HTTP metrics, headers, the usage row, one JSON log line.

Each request gets one `RequestRecord` (its id, start, route, refusal code).
A generation route writes the record's `job` once, when it has made it: the
service.serving.job.Job that serving fills in (model, documents, lease,
cache, usage), from which the response's x-cache, hint and token headers,
the usage row and the log line are taken here.

`finish` writes the usage row and the log line: after the response for plain
requests, when the stream ends for streams (499: the client left). The row is
written before the response leaves, so a crash after it cannot lose it. The
log line has who, what route, status, latency, tokens, finish reason,
refusal reason and a generation's phases (service.records.timing); never a
token or prompt text. A generation route's response carries its phases in
`Server-Timing` where the `server_timing` setting shows them.
"""

import logging
import time
from dataclasses import dataclass

from flask import g, request

from service.errors import token_headers
from service.records import metrics, requestid, timing
from service.records.accounting import write_usage
from service.serving import pipeline, transcript
from service.serving.caller import Caller
from service.serving.job import Job
from service.state import state

log = logging.getLogger("vibethinker.requests")
GENERATION_ROUTES = frozenset({"/v1/chat/completions", "/predict", "/v1/predict"})


@dataclass
class RequestRecord:
    """One request, as accounting will write it down."""

    request_id: str
    started: float
    route: str = "unmatched"
    error_code: str | None = None  # the refusal's code, from service.api.errors' response
    error_message: str | None = None  # ... and its message (a transcript of a failed generation keeps both)
    streamed: bool = False  # the stream writes its own row when it ends
    job: object = None  # the service.serving.job.Job of a generation, set once by its route
    timings: timing.Timings = None  # its phases, from the moment the edge read it

    def __post_init__(self):
        if self.timings is None:
            self.timings = timing.Timings(self.started)

    @property
    def latency(self):
        return time.monotonic() - self.started


def current():
    """The record of the request being served."""
    return g.record


def begin():
    """A generation Job for this request's caller, made the request's `job`: the record reads its model, usage
    and headers from it."""
    record = current()
    record.job = Job(Caller.of_token(g.auth), started=record.started, live=True, timings=record.timings)
    return record.job


def lap(phase):
    """A before_request hook giving the time since the last mark to `phase` (auth, limits: the hooks before)."""
    def hook():
        current().timings.lap(phase)
    hook.__name__ = f"lap_{phase}"
    return hook


def _open():
    g.record = RequestRecord(requestid.choose(request.headers),
                             request.environ.get(timing.EDGE_KEY) or time.monotonic(),
                             request.url_rule.rule if request.url_rule else "unmatched")
    requestid.bind(g.record.request_id)


def _account(response):
    record, job = current(), current().job
    status = response.status_code
    record.error_code = getattr(response, "error_code", None)
    record.error_message = getattr(response, "error_message", None)
    metrics.HTTP_REQUESTS.labels(record.route, metrics.method_label(request.method), str(status)).inc()
    metrics.REQUEST_DURATION.labels(record.route).observe(record.latency)
    reason = metrics.refusal_reason(status, record.error_code)
    if reason:
        metrics.REFUSALS.labels(reason).inc()
    if job is not None:
        if job.cache is not None and status < 400:
            response.headers["x-cache"] = job.cache
        if job.hint is not None and status < 400:
            response.headers["x-vibethinker-hint"] = job.hint
        for name, value in token_headers(job.lease).items():
            response.headers.setdefault(name, str(value))
    response.headers[requestid.HEADER] = record.request_id
    # a stream's head leaves now, before its first token: its usage chunk and log line have the whole
    total = record.timings.total() if record.streamed else finish(record, status, "request")
    if record.route in GENERATION_ROUTES and shows_timing():
        response.headers["Server-Timing"] = record.timings.header(total)
    return response


def shows_timing():
    """Whether this request's caller sees its phases (service.records.timing.shown)."""
    auth = g.get("auth")
    return timing.shown(state().settings.server_timing, auth["scope"].split() if auth else ())


def finish(record, status, message="stream ended"):
    """The usage row (for an admitted generation) and the log line of a request or a stream; the request's
    total seconds, from the edge."""
    requestid.bind(record.request_id)  # a stream ends after its request's teardown unbound it
    # since the last mark: the answer shaped, or the work of a refusal made before the prompt was ready
    record.timings.lap("template" if record.job is not None and not record.job.ids else "record")
    latency, job, auth = record.latency, record.job, g.get("auth")
    if job is not None:
        pipeline.let_go(state(), job)  # refused after admission (a document, the policy) or a cache hit
    if job is not None and job.recorded:
        write_usage(state().usage_log, job, record.route, status, latency, record.request_id)
    record.timings.lap("record")
    total = record.timings.total()
    fields = {"method": request.method, "route": record.route, "status": status,
              "latency_ms": round(latency * 1000, 1), "user": auth["user"] if auth else None,
              "client_ip": request.remote_addr}
    if job is not None:
        fields.update(_job_fields(job), phases=record.timings.milliseconds(total))
        timing.observe(metrics.PHASES, record.route, record.timings, total)
    if record.error_code:
        fields.update(error_code=record.error_code, refusal=metrics.refusal_reason(status, record.error_code))
    log.info(message, extra={"fields": fields})
    if job is not None and job.recorded:  # after the log line: handed to its writer, never waited for
        error = (record.error_code or "error", record.error_message or "") if status >= 400 else None
        transcript.keep(state(), job, record.route, status, record.request_id, error)
    return total


def _job_fields(job):
    """What a log line says of a generation: its model, the cache, its usage, its documents (never text)."""
    fields = {}
    if job.model is not None:
        fields["model"] = job.model
    if job.cache is not None:
        fields["cache"] = job.cache
    if job.usage is not None:
        fields.update(job.usage.fields())
    if job.documents:
        fields.update(documents=len(job.documents), **job.document_costs())
    return fields


def init_app(app):
    app.before_request(_open)
    app.after_request(_account)
    app.teardown_request(lambda _exc: requestid.bind("-"))  # a thread's next log line is no request's
