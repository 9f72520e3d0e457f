"""One CSRF token per (server-side) session, checked on every unsafe request to the console.

The browser's fetch metadata goes first: a cross-site or same-site (another subdomain) form post is refused
before any token is read. Then the form's `csrf_token` must equal the session's, compared in constant time.
"""

import hmac
import secrets

from flask import request, session

UNSAFE = {"POST", "PUT", "PATCH", "DELETE"}


class CsrfRefused(Exception):
    pass


def csrf_token():
    """This session's token (made on first use); every form carries it in a hidden field."""
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(32)
    return session["csrf"]


def check_csrf():
    if request.method not in UNSAFE:
        return
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        raise CsrfRefused(f"a form sent from another site ({site[:20]}) is refused")
    sent, expected = request.form.get("csrf_token", ""), session.get("csrf")
    if not expected or not hmac.compare_digest(sent.encode(), expected.encode()):
        raise CsrfRefused("the form's CSRF token is missing or stale: reload the page and try again")
