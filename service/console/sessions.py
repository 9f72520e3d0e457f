"""Server-side sessions for /admin/console/ only (Flask's `session`, stored as rows by auth.console).

Two cookies, both HttpOnly, Secure behind TLS:
- `console_login` (SameSite=Lax, Path=/admin/console/login/, minutes): the sign-in transaction (the link
  form's CSRF token, the OpenID Connect state, nonce and PKCE verifier). The provider's redirect back is a
  cross-site navigation, which never carries a Strict cookie.
- `console_session` (SameSite=Strict, Path=/admin/console/): a signed-in admin. Each sign-in gets a new id
  (no fixation); idle and absolute timeouts are checked here on every request, server-side.

Any other path gets no session at all (the API never sets a cookie), nor do the console's assets. No
signing key is involved: the cookie is a random id, the database keeps its SHA-256.
"""

import secrets
from flask import request
from flask.sessions import SessionInterface, SessionMixin
from werkzeug.datastructures import CallbackDict

from auth.console import plausible

PREFIX = "/admin/console/"
LOGIN_PREFIX = PREFIX + "login/"
STATIC_PREFIX = PREFIX + "static/"
SESSION_COOKIE, LOGIN_COOKIE = "console_session", "console_login"


class ConsoleSession(CallbackDict, SessionMixin):
    def __init__(self, data=None, sid=None, kind="auth", created=None, user_id=None):
        def on_update(s):
            s.modified = True

        super().__init__(data or {}, on_update)
        self.sid, self.kind, self.created, self.user_id, self.modified = sid, kind, created, user_id, False
        self.stale = False


class ConsoleSessions(SessionInterface):
    """Sessions in `access` (auth.console.ConsoleAccess), with their timeouts (timedeltas)."""

    def __init__(self, access, idle, lifetime, login, secure=False):
        self.access, self.idle, self.lifetime, self.login = access, idle, lifetime, login
        self.secure = secure  # the console's address is https: Secure even if a proxy hop were misconfigured

    def open_session(self, app, request):
        if not (request.path + "/").startswith(PREFIX) or request.path.startswith(STATIC_PREFIX):
            return None  # a null session: nothing outside the console's pages reads or sets one
        kind = "login" if request.path.startswith(LOGIN_PREFIX) else "auth"
        sid = request.cookies.get(LOGIN_COOKIE if kind == "login" else SESSION_COOKIE, "")
        now = self.access.now()
        record = self.access.load(sid)
        if record is not None:
            fresh = record["kind"] == kind and (
                now - record["created_at"] < self.login if kind == "login"
                else now - record["created_at"] < self.lifetime and now - record["seen_at"] < self.idle)
            if fresh:
                return ConsoleSession(record["data"], sid, kind, record["created_at"], record["user_id"])
            self.access.delete(sid)
        session = ConsoleSession(kind=kind, created=now)  # nothing is stored until something is written
        session.stale = bool(sid)  # a cookie naming no live session: it goes
        return session

    def save_session(self, app, session, response):
        if session is None:  # opening it failed (the database): nothing to save
            return
        login = session.kind == "login"
        if not session:  # emptied (signed out, sign-in done) or never used
            if session.sid:
                self.access.delete(session.sid)
            if session.sid or session.stale:
                self._cookie(response, session.kind, None)
            return
        if session.sid is None:  # a sign-in begun (a signed-in session starts only in sign_in)
            if not login:
                return
            session.sid = secrets.token_urlsafe(32)
            self.access.create(session.sid, "login", None, dict(session), session.created)
        elif login and not session.modified:
            return
        # a signed-in session is written on every request: that moves its idle clock; one deleted meanwhile
        # (signed out elsewhere, its admin disabled) stays deleted, and its cookie goes
        elif not self.access.update(session.sid, dict(session)):
            self._cookie(response, session.kind, None)
            return
        self._cookie(response, session.kind, session.sid)

    def sign_in(self, session, response, user):
        """After a successful sign-in: the sign-in transaction ends, and a NEW signed-in session starts."""
        session.clear()
        previous = request.cookies.get(SESSION_COOKIE)
        if plausible(previous):  # this browser's earlier session ends here
            self.access.delete(previous)
        now = self.access.now()
        self.access.purge(now - max(self.idle, self.login))  # abandoned sessions: none of them could open
        sid = secrets.token_urlsafe(32)
        self.access.create(sid, "auth", user["id"], {"csrf": secrets.token_urlsafe(32)}, now)
        self._cookie(response, "auth", sid)

    def _cookie(self, response, kind, sid):
        login = kind == "login"
        name, path = (LOGIN_COOKIE, LOGIN_PREFIX) if login else (SESSION_COOKIE, PREFIX)
        options = dict(path=path, secure=self.secure or request.is_secure, httponly=True,
                       samesite="Lax" if login else "Strict")
        if sid is None:
            response.delete_cookie(name, **options)
        else:
            age = self.login if login else self.lifetime
            response.set_cookie(name, sid, max_age=int(age.total_seconds()), **options)
