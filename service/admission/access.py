"""Which routes need a token, and which scope: all need one except those marked `@public`.

Authentication is one `before_request` hook (auth.guard) that asks `is_public`
about the matched endpoint and `scope_for` about the path, so routes carry no
auth code.
"""

from flask import current_app, g, request


def public(view):
    """Mark a view as reachable without a token (health checks only)."""
    view.vibethinker_public = True
    return view


def is_public():
    """True when the current request matched a view marked `@public`."""
    view = current_app.view_functions.get(request.endpoint) if request.endpoint else None
    return bool(getattr(view, "vibethinker_public", False))


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
