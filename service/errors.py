"""The one error shape, for every 4xx and 5xx whatever raised it.

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}

Routes and lower layers raise `APIError`; Werkzeug's HTTP exceptions (404,
405, 413, 415, ...) and unexpected exceptions are turned into the same shape
here. A 500 never shows exception text: it is logged with the request id.
"""

import logging

from flask import jsonify, request
from werkzeug.exceptions import HTTPException

from service.records import requestid

log = logging.getLogger("vibethinker.errors")

# OpenAI-style error types by status, so clients map them to their exception classes.
TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
    415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error", 499: "client_closed",
    500: "server_error", 501: "server_error", 503: "overloaded_error", 504: "timeout_error",
}
# Precise messages for the errors Werkzeug raises by itself.
HTTP_MESSAGES = {
    404: ("not_found", "no such route: {method} {path}"),
    405: ("method_not_allowed", "{method} is not allowed on {path}"),
    413: ("body_too_large", "request body is larger than {limit} bytes"),
}


class APIError(Exception):
    """An error a client should see, with its status and machine-readable code."""

    def __init__(self, status, message, code, param=None, headers=None, extra=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})  # fields beside "error" (/readyz: each model's state)


def error_body(status, message, code, param=None):
    """The one error shape, as a dict."""
    return {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status, message, code, param=None, headers=None, extra=None):
    """Build the JSON error response in the one shape (`extra`: fields beside "error")."""
    response = jsonify({**error_body(status, message, code, param), **(extra or {})})
    response.status_code = status
    response.error_code = code  # for accounting: the refusal reason of this request
    for name, value in (headers or {}).items():
        response.headers[name] = str(value)
    return response


def _api_error(exc):
    return error_response(exc.status, exc.message, exc.code, exc.param, exc.headers, exc.extra)


def _http_error(exc):
    code, template = HTTP_MESSAGES.get(exc.code, (_snake(exc.name), exc.description or exc.name))
    message = template.format(method=request.method, path=request.path, limit=request.max_content_length)
    headers = {}
    if exc.code == 405 and exc.valid_methods:
        headers["Allow"] = ", ".join(exc.valid_methods)
    return error_response(exc.code, message, code, headers=headers)


def _unexpected(exc):
    log.error("unhandled exception in request %s", requestid.current(), exc_info=exc)
    return error_response(500, f"internal error; quote request id {requestid.current()} "
                          "when reporting it", "internal_error")


def _snake(name):
    return name.lower().replace(" ", "_").replace("'", "")


def init_app(app):
    """Route every error the app can raise through the one shape."""
    app.register_error_handler(APIError, _api_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)
