"""Reading a request's body: its bytes within the route's limit, decoded and validated, and what is left of it
drained after the answer."""

from flask import request
from werkzeug.exceptions import RequestEntityTooLarge

from service.inputs.schemas import check_unicode, load_object, parse
from service.state import state

DRAIN_CHUNK = 65536


def read(model, check_size=None):
    """This request's JSON body as `model`: a refusal (413, 415, 400) saying what is wrong. `check_size(bytes,
    data)` sees the decoded body before it is validated (a route's own 413 rule)."""
    raw = read_body()
    data = load_object(raw, request.is_json)
    if check_size is not None:  # before the walk over every value: a refused body costs its parse only
        check_size(len(raw), data)
    return parse(model, check_unicode(data))


def read_body():
    """The body's bytes; 413 past the route's body limit whether its length was declared or it came chunked
    (werkzeug refuses a declared length, but cuts a chunked body at the limit without a word)."""
    if request.content_length is not None:
        return request.get_data(cache=False)
    limit = request.max_content_length  # the route's own: larger where documents come
    raw = request.environ["wsgi.input"].read(limit + 1)
    if len(raw) > limit:
        raise RequestEntityTooLarge()
    return raw


def drain_unread_body(response):
    """After every request: read what is left of its body, up to the largest body nginx lets through.

    A request refused before its body was read (a bad token, a limit, a 413 on the declared length) leaves
    the body on the socket; gunicorn drains at most 64 KiB of it and then closes the connection, although
    its answer said keep-alive. nginx would send its next request down that connection and answer it 502:
    one client's 8 MB document with an expired token would fail another's request."""
    length = request.content_length
    settings = state().settings
    if length and length <= max(settings.document_body_bytes, settings.max_upload_bytes):
        stream = request.environ.get("wsgi.input")
        try:
            while stream is not None and stream.read(DRAIN_CHUNK):
                pass
        except Exception:  # noqa: BLE001 - the client went away or sent less: gunicorn closes, as before
            pass
    return response
