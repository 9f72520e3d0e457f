"""The request id: taken from nginx's X-Request-ID when sane, else generated; echoed back."""

import logging
import re
import uuid

from flask import g

HEADER = "X-Request-ID"
# What a client may choose: short, printable, no spaces (it ends up in logs).
VALID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def current():
    """The id of the request being served, or '-' outside a request."""
    record = g.get("record") if g else None
    return record.request_id if record is not None else "-"


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to every log record, so log lines can be joined to requests."""

    def filter(self, record):
        try:
            record.request_id = current()
        except RuntimeError:  # outside an app context
            record.request_id = "-"
        return True


def choose(headers):
    """nginx's X-Request-ID when it is sane, else a new one (it is only ever a log and lookup key)."""
    given = headers.get(HEADER, "")
    return given if VALID.fullmatch(given) else uuid.uuid4().hex


def _echo(response):
    response.headers[HEADER] = current()
    return response


def init_app(app):
    app.after_request(_echo)
