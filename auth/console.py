"""Who may use the admins' console: one-time sign-in links and server-side sessions.

A link and a session cookie are random secrets; the database keeps only their SHA-256, so a copy of it (a
backup) holds nothing that signs anyone in. A link is bound to one admin, lasts minutes and works once (the
row is marked used in the same statement that checks it, so two workers cannot both take it). A session is
a row: signing out, its timeouts, and disabling, demoting or `tokens revoke-all` of its admin delete it
(auth.store); and it counts only while its user is an active admin, read from the database on every request,
so those end their sessions at their next request on every worker and server. A request never writes back a
row that was deleted while it ran.
"""

import hashlib
import json
import secrets

import sqlalchemy as sa

from auth.errors import StoreError
from auth.schema import console_links, console_sessions, users
from auth.store import aware

LINK_BYTES = 32


def digest(secret):
    """What the database keeps of a link or a session id."""
    return hashlib.sha256(secret.encode()).hexdigest()


class ConsoleAccess:
    """Links and sessions over the store's database (and its clock)."""

    def __init__(self, store):
        self.store = store
        self.engine = store.engine

    def now(self):
        return self.store.clock()

    # --- one-time links ---
    def issue_link(self, name, ttl, actor="system", source="cli"):
        """A new link secret for admin `name`, valid for `ttl` (a timedelta), once; StoreError when `name` is not an
        active admin. Audited (never the secret)."""
        user = self.store.get_user(name)
        _require_admin(user)
        secret, now = secrets.token_urlsafe(LINK_BYTES), self.now()
        with self.engine.begin() as conn:
            conn.execute(console_links.delete().where(console_links.c.expires_at < now))
            conn.execute(console_links.insert().values(key=digest(secret), user_id=user["id"], created_at=now,
                                                       expires_at=now + ttl))
            self.store._audit(conn, actor, "console.link", name, {"expires_in_s": int(ttl.total_seconds())},
                              source)
        return secret

    def redeem_link(self, secret, source):
        """The admin a link signs in, marking it used; StoreError 403 when it is unknown, used, expired, or
        its user is no longer an active admin (one message: a caller learns nothing of which)."""
        if not plausible(secret):
            raise link_refused()
        now = self.now()
        with self.engine.begin() as conn:
            taken = conn.execute(console_links.update().where(*_live(secret, now)).values(used_at=now)).rowcount
            user_id = conn.execute(sa.select(console_links.c.user_id)
                                   .where(console_links.c.key == digest(secret))).scalar()
        if taken != 1:
            raise link_refused()
        user = self.active_admin(user_id)
        if user is None:
            raise link_refused()
        self.signed_in(user, "link", source)
        return user

    def signed_in(self, user, method, source):
        """Audit a sign-in (by link or by the organisation's provider)."""
        self.store.record_event("console.sign_in", user["name"], {"method": method}, actor=user["name"],
                                source=source)

    # --- sessions ---
    def load(self, secret):
        """A session's record {kind, user_id, data, created_at, seen_at}, or None."""
        if not plausible(secret):
            return None
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(console_sessions)
                               .where(console_sessions.c.key == digest(secret))).mappings().first()
        if row is None:
            return None
        return {"kind": row["kind"], "user_id": row["user_id"], "data": json.loads(row["data"]),
                "created_at": aware(row["created_at"]), "seen_at": aware(row["seen_at"])}

    def create(self, secret, kind, user_id, data, created_at):
        """Store a new session."""
        with self.engine.begin() as conn:
            conn.execute(console_sessions.insert().values(key=digest(secret), kind=kind, user_id=user_id,
                                                          data=json.dumps(data), created_at=created_at,
                                                          seen_at=self.now()))

    def update(self, secret, data):
        """Write an open session's data and restart its idle clock; False when it is gone (signed out, its
        admin's sessions ended while this request ran): it is never written back."""
        with self.engine.begin() as conn:
            return conn.execute(console_sessions.update().where(console_sessions.c.key == digest(secret))
                                .values(data=json.dumps(data), seen_at=self.now())).rowcount == 1

    def delete(self, secret):
        with self.engine.begin() as conn:
            conn.execute(console_sessions.delete().where(console_sessions.c.key == digest(secret)))

    def purge(self, older_than):
        """Delete sessions not seen since `older_than` (a datetime); how many."""
        with self.engine.begin() as conn:
            return conn.execute(console_sessions.delete().where(console_sessions.c.seen_at < older_than)).rowcount

    def sessions_of(self, name, seen_since):
        """How many sessions a user holds that were used since `seen_since`."""
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(console_sessions).join(users).where(
                users.c.name == name, console_sessions.c.seen_at >= seen_since)).scalar()

    def link_usable(self, secret):
        """Whether a link would sign in now (unused, unexpired), without using it."""
        if not plausible(secret):
            return False
        with self.engine.connect() as conn:
            return conn.execute(sa.select(console_links.c.key).where(*_live(secret, self.now()))).first() is not None

    def active_admin(self, user_id):
        """The user `user_id` when it is an active admin now, else None."""
        with self.engine.connect() as conn:
            name = conn.execute(sa.select(users.c.name).where(users.c.id == user_id)).scalar()
        if name is None:
            return None
        user = self.store.get_user(name)
        return user if user["active"] and user["admin"] else None


def _require_admin(user):
    if not user["admin"]:
        raise StoreError(400, f"user {user['name']!r} is not an admin; the console is for admins only",
                         "not_admin", "name")
    if not user["active"]:
        raise StoreError(400, f"user {user['name']!r} is disabled", "account_disabled", "name")


def plausible(secret):
    """Whether `secret` could be a link or a session id at all (else no query is made for it)."""
    return isinstance(secret, str) and 20 <= len(secret) <= 100


def _live(secret, now):
    """The conditions of a link that would sign in at `now`: this one, unused, unexpired."""
    return (console_links.c.key == digest(secret), console_links.c.used_at.is_(None),
            console_links.c.expires_at > now)


def link_refused():
    """The one refusal of a link, whatever is wrong with it."""
    return StoreError(403, "this sign-in link is unknown, used or expired: ask for a new one "
                      "(vibethinker-admin console-link NAME)", "link_refused")
