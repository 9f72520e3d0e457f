"""Which routes need a token: all of them, except those marked `@public`.

Authentication is one `before_request` hook (added with the token store) that
asks `is_public` about the matched endpoint, so routes carry no auth code.
"""

from flask import current_app, request


def public(view):
    """Mark a view as reachable without a token (health checks only)."""
    view.vibethinker_public = True
    return view


def is_public():
    """True when the current request matched a view marked `@public`."""
    view = current_app.view_functions.get(request.endpoint) if request.endpoint else None
    return bool(getattr(view, "vibethinker_public", False))
