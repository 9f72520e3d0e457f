"""After every request: HTTP metrics, the usage row of a generation, and one JSON log line.

The usage row is written before the response leaves (a crash after it cannot
lose it). The log line has who, what route, status, latency, tokens, finish
reason and refusal reason; never a token or prompt text.
"""

import logging
import time

from flask import current_app, g, request

from service import metrics

log = logging.getLogger("vibethinker.access")


def _start():
    g.started = time.monotonic()


def _account(response):
    latency = time.monotonic() - g.get("started", time.monotonic())
    route = request.url_rule.rule if request.url_rule else "unmatched"
    metrics.HTTP_REQUESTS.labels(route, request.method, str(response.status_code)).inc()
    metrics.REQUEST_DURATION.labels(route).observe(latency)
    code = g.get("error_code")
    reason = metrics.refusal_reason(response.status_code, code)
    if reason:
        metrics.REFUSALS.labels(reason).inc()
    ticket = g.get("ticket")
    if ticket is not None:
        _record_usage(ticket, route, response.status_code, latency)
    auth = g.get("auth")
    fields = {"method": request.method, "route": route, "status": response.status_code,
              "latency_ms": round(latency * 1000, 1), "user": auth["user"] if auth else None,
              "client_ip": request.remote_addr}
    if ticket is not None:
        fields.update(ticket.counts())
    if code:
        fields.update(error_code=code, refusal=reason)
    log.info("request", extra={"fields": fields})
    return response


def _record_usage(ticket, route, status, latency):
    try:
        current_app.extensions["vibethinker.store"].record_usage(
            user=ticket.user, route=route, status=status, latency_ms=int(latency * 1000),
            request_id=g.get("request_id", "-"), **ticket.counts())
    except Exception:  # the answer is computed; say loudly that its record is missing
        log.exception("usage row not written", extra={"fields": {"user": ticket.user, "route": route}})


def record_stream(ticket, route, status, started):
    """A stream's usage row and log line, written when the stream ends (499: the client left)."""
    latency = time.monotonic() - started
    _record_usage(ticket, route, status, latency)
    log.info("stream ended", extra={"fields": {
        "route": route, "status": status, "latency_ms": round(latency * 1000, 1), "user": ticket.user,
        **ticket.counts()}})


def init_app(app):
    app.before_request(_start)
    app.after_request(_account)
