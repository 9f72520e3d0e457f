"""Structured logs: one JSON object per line on stderr (journald under systemd).

Every line carries the request id. Fields are passed with `extra={"fields":
{...}}`; never a token, a key, or prompt text (a prompt hash is fine).
"""

import json
import logging
import sys
import time
import traceback

from service.records.requestid import RequestIdFilter


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON, with its stack trace when it has one."""

    def format(self, record):
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                + f".{int(record.msecs):03d}Z",
                "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage(),
                "request_id": getattr(record, "request_id", "-")}
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exception"] = "".join(traceback.format_exception(*record.exc_info))
        return json.dumps(line, default=str, ensure_ascii=False)


def json_handler():
    """A stderr handler that writes JSON lines with request ids."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    return handler


def configure(level):
    """Send the service's loggers to stderr as JSON lines (once per process)."""
    root = logging.getLogger("vibethinker")
    if root.handlers:
        return
    root.addHandler(json_handler())
    root.setLevel(level.upper())
    root.propagate = False


# Gunicorn's own lines in the same JSON shape (gunicorn_conf's logconfig_dict).
GUNICORN_LOGCONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": "service.records.logs.JsonFormatter"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
    "root": {"level": "WARNING", "handlers": ["stderr"]},
    "loggers": {"gunicorn.error": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
                "gunicorn.access": {"handlers": ["stderr"], "level": "INFO", "propagate": False}},
}
