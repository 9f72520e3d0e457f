"""The state that must survive anything: users, issued tokens, usage, and the audit trail.

Its tables live in auth.schema, created and upgraded by Alembic migrations,
so an upgrade never loses a user, a token or a revocation. Token text is
never stored: only its jti and metadata.
"""

import json
import uuid
from datetime import datetime, timezone

import sqlalchemy as sa

from auth.checks import check_name, check_quotas
from auth.errors import StoreError
from auth.schema import (
    audit, auth_epoch, connect, console_links, console_sessions, migrate, tokens, transcripts, usage, users)

STORAGE_QUOTAS = ("max_files", "max_stored_bytes", "max_open_batches", "daily_batches")
QUOTA_FIELDS = ("rate_limit", "daily_tokens", "max_concurrent", "system_prompts", "models", *STORAGE_QUOTAS)
LIST_FIELDS = ("system_prompts", "models")  # allow-lists, stored as JSON text; NULL allows any


def utcnow():
    return datetime.now(timezone.utc)


def aware(value):
    """SQLite returns naive datetimes; every time in the store is UTC."""
    return value if value is None or value.tzinfo else value.replace(tzinfo=timezone.utc)


class Store:
    """Users, tokens and audit events over one SQLAlchemy engine.

    `publish(epoch)` is called after every commit that replaced the access epoch (the service mirrors it
    in Redis there); it must not raise.
    """

    def __init__(self, url, clock=utcnow, upgrade=True, publish=None):
        self.engine = connect(url)
        self.clock = clock
        self.publish = publish or (lambda epoch: None)
        if upgrade:
            migrate(self.engine)

    # --- the access epoch ---
    def epoch(self):
        """The current access epoch."""
        with self.engine.connect() as conn:
            return conn.execute(sa.select(auth_epoch.c.value).where(auth_epoch.c.id == 1)).scalar_one()

    def _changed_access(self, conn):
        """Replace the epoch inside the caller's transaction; the new value, to publish after the commit."""
        value = uuid.uuid4().hex
        conn.execute(auth_epoch.update().where(auth_epoch.c.id == 1).values(value=value))
        return value

    def revoke_again(self, revocations):
        """After a restore: revoke each token of {jti: (revoked_at, revoked_by)} that the restored rows hold
        unrevoked (it was revoked after the backup), end every console session and sign-in link the backup
        held (a link used since would work again), and replace the access epoch. How many were revoked."""
        with self.engine.begin() as conn:
            conn.execute(console_sessions.delete())
            conn.execute(console_links.delete())
            kept = sum(conn.execute(tokens.update().where(tokens.c.jti == jti, tokens.c.revoked_at.is_(None))
                                    .values(revoked_at=at, revoked_by=by)).rowcount
                       for jti, (at, by) in revocations.items())
            epoch = self._changed_access(conn)
        self.publish(epoch)
        return kept

    def close(self):
        """Close the pooled connections."""
        self.engine.dispose()

    # --- users ---
    def add_user(self, name, is_admin=False, actor="system", source="cli", **quotas):
        """Create a user; StoreError 409 if the name is taken."""
        check_name(name)
        check_quotas(quotas)
        row = dict(name=name, is_admin=bool(is_admin), active=True, created_at=self.clock(),
                   **_encode({k: quotas.get(k) for k in QUOTA_FIELDS}))
        with self.engine.begin() as conn:
            if conn.execute(sa.select(users.c.id).where(users.c.name == name)).first():
                raise StoreError(409, f"user {name!r} already exists", "user_exists", "name")
            conn.execute(users.insert().values(**row))
            self._audit(conn, actor, "user.add", name, {"admin": bool(is_admin), **_given(quotas)}, source)
        return self.get_user(name)

    def get_user(self, name):
        """The user as a dict; StoreError 404 if unknown."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(users).where(users.c.name == name)).mappings().first()
        if row is None:
            raise StoreError(404, f"no such user: {name!r}", "unknown_user", "name")
        return _user(row)

    def list_users(self):
        with self.engine.connect() as conn:
            return [_user(r) for r in conn.execute(sa.select(users).order_by(users.c.name)).mappings()]

    def update_user(self, name, actor="system", source="cli", **changes):
        """Change active/is_admin/quota fields; None in a quota field clears it."""
        allowed = {"active", "is_admin", "transcripts", *QUOTA_FIELDS}
        unknown = set(changes) - allowed
        if unknown:
            raise StoreError(400, f"cannot change {sorted(unknown)[0]}", "unknown_field", sorted(unknown)[0])
        check_quotas(changes)
        if "transcripts" in changes and not isinstance(changes["transcripts"], bool):
            raise StoreError(400, "transcripts must be true or false", "invalid_value", "transcripts")
        user = self.get_user(name)
        with self.engine.begin() as conn:
            conn.execute(users.update().where(users.c.id == user["id"]).values(**_encode(changes)))
            action = {(True,): "user.enable", (False,): "user.disable"}.get(
                (changes["active"],) if set(changes) == {"active"} else None, "user.update")
            if changes.get("active") is False or changes.get("is_admin") is False:
                _end_console(conn, user["id"])  # enabled or promoted again later, they sign in again
            self._audit(conn, actor, action, name, changes, source)
            epoch = self._changed_access(conn)
        self.publish(epoch)
        return self.get_user(name)

    def remove_user(self, name, actor="system", source="cli", release=None):
        """Delete a user with their tokens (refused from the next request: the epoch is replaced), console
        sessions and links, and transcripts, in one transaction; usage rows and the audit trail stay (they are
        keyed by name). `release(conn, name)` runs first in the same transaction: it raises StoreError to refuse
        (what the user still stores) and deletes what else belongs to them. What was deleted, by kind."""
        user = self.get_user(name)
        with self.engine.begin() as conn:
            released = release(conn, name) if release is not None else {}
            _end_console(conn, user["id"])
            gone = {"tokens": conn.execute(tokens.delete().where(tokens.c.user_id == user["id"])).rowcount,
                    "transcripts": conn.execute(transcripts.delete()
                                                .where(transcripts.c.user_id == user["id"])).rowcount,
                    **(released or {})}
            conn.execute(users.delete().where(users.c.id == user["id"]))
            self._audit(conn, actor, "user.remove", name, gone, source)
            epoch = self._changed_access(conn)
        self.publish(epoch)
        return gone

    # --- tokens ---
    def record_token(self, jti, user_name, scope, label, kid, issued_at, expires_at, actor="system", source="cli"):
        """Record an issued token's metadata (never its text)."""
        user = self.get_user(user_name)
        with self.engine.begin() as conn:
            conn.execute(tokens.insert().values(jti=jti, user_id=user["id"], scope=scope, label=label, kid=kid,
                                                issued_at=issued_at, expires_at=expires_at))
            self._audit(conn, actor, "token.issue", user_name,
                        {"jti": jti, "scope": scope, "label": label, "expires_at": expires_at.isoformat()}, source)

    def list_tokens(self, user_name=None, include_inactive=False):
        query = sa.select(tokens, users.c.name.label("user")).join(users).order_by(tokens.c.issued_at)
        if user_name is not None:
            query = query.where(users.c.id == self.get_user(user_name)["id"])
        if not include_inactive:
            query = query.where(tokens.c.revoked_at.is_(None), tokens.c.expires_at > self.clock())
        with self.engine.connect() as conn:
            return [_token(r) for r in conn.execute(query).mappings()]

    def get_token(self, jti):
        """Token metadata with its user's name and state, or None if never issued."""
        query = (sa.select(tokens, users.c.name.label("user"), users.c.active.label("user_active"),
                           users.c.is_admin.label("user_admin"), users.c.rate_limit, users.c.daily_tokens,
                           users.c.max_concurrent, users.c.system_prompts, users.c.models,
                           users.c.transcripts, *(users.c[name] for name in STORAGE_QUOTAS))
                 .join(users).where(tokens.c.jti == jti))
        with self.engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        return _token(row) if row else None

    def revoke_token(self, jti, actor="system", source="cli"):
        """Revoke one token; StoreError 404 if never issued. Revoking twice is harmless."""
        token = self.get_token(jti)
        if token is None:
            raise StoreError(404, f"no such token: {jti!r}", "unknown_token", "jti")
        with self.engine.begin() as conn:
            conn.execute(tokens.update().where(tokens.c.jti == jti, tokens.c.revoked_at.is_(None))
                         .values(revoked_at=self.clock(), revoked_by=actor))
            self._audit(conn, actor, "token.revoke", token["user"], {"jti": jti}, source)
            epoch = self._changed_access(conn)
        self.publish(epoch)
        return self.get_token(jti)

    def revoke_all(self, user_name, actor="system", source="cli"):
        """Revoke every live token of a user, and end their console sessions; the number of tokens revoked."""
        user = self.get_user(user_name)
        with self.engine.begin() as conn:
            count = conn.execute(tokens.update().where(tokens.c.user_id == user["id"], tokens.c.revoked_at.is_(None))
                                 .values(revoked_at=self.clock(), revoked_by=actor)).rowcount
            _end_console(conn, user["id"])
            self._audit(conn, actor, "token.revoke_all", user_name, {"count": count}, source)
            epoch = self._changed_access(conn)
        self.publish(epoch)
        return count

    # --- audit ---
    def list_audit(self, actor=None, action=None, target=None, since=None, limit=100):
        query = sa.select(audit).order_by(audit.c.id.desc()).limit(limit)
        for column, value in ((audit.c.actor, actor), (audit.c.action, action), (audit.c.target, target)):
            if value is not None:
                query = query.where(column == value)
        if since is not None:
            query = query.where(audit.c.at >= aware(since))
        with self.engine.connect() as conn:
            return [{**dict(r), "at": aware(r["at"]).isoformat(), "detail": json.loads(r["detail"])}
                    for r in conn.execute(query).mappings()]

    # --- usage ---
    def record_usage(self, rows):
        """Usage rows (user, route, status, prompt_tokens, completion_tokens, latency_ms, finish_reason,
        request_id, and optionally model and cached) in one transaction: the service's group commit."""
        at = self.clock()
        with self.engine.begin() as conn:
            conn.execute(usage.insert(), [{"at": at, **row} for row in rows])

    def usage_by_day(self, user=None, since=None):
        """Daily totals per user (UTC days), newest first. Tokens are those computed: an answer from the
        response cache counts as a request (and in `cached`), not in the tokens."""
        day = sa.func.date(usage.c.at).label("day")
        computed = lambda column: sa.func.sum(sa.case((usage.c.cached, 0), else_=column))  # noqa: E731
        query = (sa.select(day, usage.c.user, sa.func.count().label("requests"),
                           sa.func.sum(sa.case((usage.c.status < 400, 1), else_=0)).label("succeeded"),
                           sa.func.sum(sa.case((usage.c.cached, 1), else_=0)).label("cached"),
                           computed(usage.c.prompt_tokens).label("prompt_tokens"),
                           computed(usage.c.completion_tokens).label("completion_tokens"),
                           computed(usage.c.forced_tokens).label("forced_tokens"),
                           computed(usage.c.cached_tokens).label("cached_tokens"))
                 .group_by(day, usage.c.user).order_by(day.desc(), usage.c.user))
        if user is not None:
            query = query.where(usage.c.user == user)
        if since is not None:
            query = query.where(usage.c.at >= aware(since))
        with self.engine.connect() as conn:
            return [{"day": str(r.day), "user": r.user, "requests": r.requests, "succeeded": int(r.succeeded),
                     "cached": int(r.cached), "prompt_tokens": int(r.prompt_tokens), "completion_tokens": int(r.completion_tokens),
                     "total_tokens": int(r.prompt_tokens + r.completion_tokens),
                     "forced_tokens": int(r.forced_tokens), "cached_tokens": int(r.cached_tokens)}
                    for r in conn.execute(query)]

    def usage_rows(self, user=None, limit=100):
        query = sa.select(usage).order_by(usage.c.id.desc()).limit(limit)
        if user is not None:
            query = query.where(usage.c.user == user)
        with self.engine.connect() as conn:
            return [{**dict(r), "at": aware(r["at"]).isoformat()} for r in conn.execute(query).mappings()]

    def record_event(self, action, target, detail, actor="system", source="cli", changes_access=False):
        """Audit an action outside the database (a key rotation, say); `changes_access`: a key retirement."""
        with self.engine.begin() as conn:
            self._audit(conn, actor, action, target, detail, source)
            epoch = self._changed_access(conn) if changes_access else None
        if epoch is not None:
            self.publish(epoch)

    def _audit(self, conn, actor, action, target, detail, source):
        conn.execute(audit.insert().values(at=self.clock(), actor=actor, action=action, target=target,
                                           detail=json.dumps(detail, default=str, sort_keys=True), source=source))

    def ping(self):
        """True when the database answers."""
        with self.engine.connect() as conn:
            return conn.execute(sa.text("SELECT 1")).scalar() == 1


def _end_console(conn, user_id):
    """The admins' console: the user's sessions end and their unused sign-in links stop working."""
    conn.execute(console_sessions.delete().where(console_sessions.c.user_id == user_id))
    conn.execute(console_links.delete().where(console_links.c.user_id == user_id))


def _encode(fields):
    """Store the allow-lists as JSON text."""
    return {k: json.dumps(v) if k in LIST_FIELDS and v is not None else v for k, v in fields.items()}


def _list(text):
    return None if text is None else json.loads(text)


def _given(quotas):
    return {k: v for k, v in quotas.items() if v is not None}


def _user(row):
    return {"id": row["id"], "name": row["name"], "admin": row["is_admin"], "active": row["active"],
            "rate_limit": row["rate_limit"], "daily_tokens": row["daily_tokens"],
            "max_concurrent": row["max_concurrent"], "system_prompts": _list(row["system_prompts"]),
            "models": _list(row["models"]), **{name: row[name] for name in STORAGE_QUOTAS},
            "transcripts": bool(row["transcripts"]), "created_at": aware(row["created_at"]).isoformat()}


def _token(row):
    token = {"jti": row["jti"], "user": row["user"], "scope": row["scope"], "label": row["label"],
             "kid": row["kid"], "issued_at": aware(row["issued_at"]), "expires_at": aware(row["expires_at"]),
             "revoked_at": aware(row["revoked_at"]), "revoked_by": row["revoked_by"]}
    for extra in ("user_active", "user_admin", "transcripts", *QUOTA_FIELDS):
        if extra in row:
            token[extra] = _list(row[extra]) if extra in LIST_FIELDS else row[extra]
    return token
