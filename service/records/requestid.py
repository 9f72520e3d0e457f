"""The request id: taken from nginx's X-Request-ID when sane, else generated; on every log line of its request.

The HTTP edge binds each request's id (`bind`) in the thread serving it; log
records carry it (`RequestIdFilter`), and so can code with no request at
hand. Outside a request it is "-".
"""

import contextvars
import logging
import re
import uuid

HEADER = "X-Request-ID"
# What a client may choose: short, printable, no spaces (it ends up in logs).
VALID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_current = contextvars.ContextVar("request_id", default="-")


def current():
    """The id of the request being served, or '-' outside a request."""
    return _current.get()


def bind(request_id):
    """Make `request_id` the current one, in this thread's context."""
    _current.set(request_id)


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to every log record, so log lines can be joined to requests."""

    def filter(self, record):
        record.request_id = current()
        return True


def choose(headers):
    """nginx's X-Request-ID when it is sane, else a new one (it is only ever a log and lookup key)."""
    given = headers.get(HEADER, "")
    return given if VALID.fullmatch(given) else uuid.uuid4().hex
