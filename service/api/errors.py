"""Every error as a response in the one shape: refusals with the status and headers service.errors maps
them to, Werkzeug's HTTP exceptions (404, 405, 413, 415, ...), the auth layer's errors, and unexpected
exceptions. A 500 never shows exception text: it is logged with the request id.
"""

import logging

from flask import current_app, jsonify, request
from werkzeug.exceptions import HTTPException

from auth.errors import StoreError
from service import errors
from service.records import requestid

log = logging.getLogger("vibethinker.errors")

# Precise messages for the errors Werkzeug raises by itself.
HTTP_MESSAGES = {
    404: ("not_found", "no such route: {method} {path}"),
    405: ("method_not_allowed", "{method} is not allowed on {path}"),
    413: ("body_too_large", "request body is larger than {limit} bytes"),
}


def error_response(status, message, code, param=None, headers=None, extra=None):
    """Build the JSON error response in the one shape (`extra`: fields beside "error")."""
    response = jsonify({**errors.error_body(status, message, code, param), **(extra or {})})
    response.status_code = status
    response.error_code = code  # for accounting: the refusal reason of this request
    response.error_message = message  # for a transcript of a failed generation
    for name, value in (headers or {}).items():
        response.headers[name] = str(value)
    return response


def refusal_response(refusal):
    """The answer to a refusal: its status, the one shape, its headers."""
    return error_response(errors.status_of(refusal), refusal.message, refusal.code, refusal.param,
                          errors.headers_of(refusal), refusal.extra)


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


def _log_exception(exc_info):
    """Flask's log of an error raised outside a view (opening a session, say), by route, never by path: a
    path may hold a secret (a console sign-in link). The route may not be matched yet (a session is opened
    first): it is matched here."""
    rule = request.url_rule
    if rule is None:
        try:
            rule, _ = current_app.url_map.bind_to_environ(request.environ).match(return_rule=True)
        except HTTPException:
            rule = None
    log.error("unhandled exception in request %s on %s %s", requestid.current(), request.method,
              rule.rule if rule is not None else "(no route)", exc_info=exc_info)


def init_app(app):
    """Route every error the app can raise through the one shape."""
    app.log_exception = _log_exception
    app.register_error_handler(errors.Refusal, refusal_response)
    app.register_error_handler(StoreError, lambda e: error_response(e.status, e.message, e.code, e.param))
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)
