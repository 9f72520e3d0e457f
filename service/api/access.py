"""Which routes need a token, and which scope: all need one except those marked `@public`.

Authentication is one `before_request` hook (auth.guard) that asks
`needs_token` about the request and `scope_for` about the path, so routes
carry no auth code.
"""

from flask import current_app, g, request
from werkzeug.exceptions import MethodNotAllowed


def public(view):
    """Mark a view as reachable without a token (health checks only)."""
    view.vibethinker_public = True
    return view


def is_public():
    """True when the current request's path is a view marked `@public` (whatever the method)."""
    endpoint = request.endpoint
    refused = request.routing_exception
    if endpoint is None and isinstance(refused, MethodNotAllowed) and refused.valid_methods:
        endpoint, _ = current_app.url_map.bind_to_environ(request.environ).match(method=refused.valid_methods[0])
    view = current_app.view_functions.get(endpoint) if endpoint else None
    return bool(getattr(view, "vibethinker_public", False))


def needs_token():
    """Every request needs a token, except to a public view, or to no route at all outside /admin (a 404
    says nothing there); so OPTIONS and a wrong method on a protected route, or any path under /admin,
    tell nothing to a caller without one."""
    if is_public() or is_console(request.path):
        return False
    unrouted = request.url_rule is None and not isinstance(request.routing_exception, MethodNotAllowed)
    return not unrouted or scope_for(request.path) == "admin"


def is_console(path):
    """The admins' console signs its admins in with its own sessions (service.console), not bearer tokens."""
    return path == "/admin/console" or path.startswith("/admin/console/")


def scope_for(path):
    """The scope a path needs: admin routes need `admin`, /v1/me any token, the rest `generate`."""
    if path == "/admin" or path.startswith("/admin/"):
        return "admin"
    if path == "/v1/me":
        return None
    return "generate"


def caller():
    """The authenticated token record of this request (user, jti, scope, expiry)."""
    return g.auth
