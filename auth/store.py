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
from auth.schema import (audit, auth_epoch, aware, connect, console_links, console_sessions, migrate, teams, tokens,
                         transcripts, usage, users)
from auth.teams import TEAM_COLUMNS, TEAM_FIELDS, TeamStore  # noqa: F401 - TEAM_FIELDS: the store's names

STORAGE_QUOTAS = ("max_files", "max_stored_bytes", "max_open_batches", "daily_batches")
QUOTA_FIELDS = ("rate_limit", "daily_tokens", "max_concurrent", "system_prompts", "models", *STORAGE_QUOTAS)
LIST_FIELDS = ("system_prompts", "models")  # allow-lists, stored as JSON text; NULL allows any


def utcnow():
    return datetime.now(timezone.utc)


class Store(TeamStore):
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
        unrevoked or revoked later (it was revoked, or its rotation's grace cut short, after the backup; a
        grace end still ahead is kept as it stands), end every console session and sign-in link the backup
        held (a link used since would work again), and replace the access epoch. How many were revoked."""
        with self.engine.begin() as conn:
            conn.execute(console_sessions.delete())
            conn.execute(console_links.delete())
            kept = sum(conn.execute(tokens.update().where(tokens.c.jti == jti, _unrevoked_at(at))
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
            row = conn.execute(_users_query().where(users.c.name == name)).mappings().first()
        if row is None:
            raise StoreError(404, f"no such user: {name!r}", "unknown_user", "name")
        return _user(row)

    def list_users(self, team=None):
        """Every user, or the members of `team`."""
        query = _users_query().order_by(users.c.name)
        if team is not None:
            query = query.where(users.c.team_id == self.get_team(team)["id"])
        with self.engine.connect() as conn:
            return [_user(r) for r in conn.execute(query).mappings()]

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
        """Tokens (those still working unless `include_inactive`), oldest first, each with its status."""
        now = self.clock()
        query = sa.select(tokens, users.c.name.label("user")).join(users).order_by(tokens.c.issued_at)
        if user_name is not None:
            query = query.where(users.c.id == self.get_user(user_name)["id"])
        if not include_inactive:
            query = query.where(_unrevoked_at(now), tokens.c.expires_at > now)
        with self.engine.connect() as conn:
            return [_token(r, now) for r in conn.execute(query).mappings()]

    def get_token(self, jti):
        """Token metadata with its user's name and state, or None if never issued."""
        query = (sa.select(tokens, users.c.name.label("user"), users.c.active.label("user_active"),
                           users.c.is_admin.label("user_admin"), users.c.rate_limit, users.c.daily_tokens,
                           users.c.max_concurrent, users.c.system_prompts, users.c.models,
                           users.c.transcripts, *(users.c[name] for name in STORAGE_QUOTAS), *TEAM_COLUMNS)
                 .select_from(tokens.join(users).outerjoin(teams, users.c.team_id == teams.c.id))
                 .where(tokens.c.jti == jti))
        with self.engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        return _token(row, self.clock()) if row else None

    def revoke_token(self, jti, actor="system", source="cli"):
        """Revoke one token now (one in a rotation's grace too); StoreError 404 if never issued. Revoking twice
        is harmless."""
        token = self.get_token(jti)
        if token is None:
            raise StoreError(404, f"no such token: {jti!r}", "unknown_token", "jti")
        now = self.clock()
        with self.engine.begin() as conn:
            conn.execute(tokens.update().where(tokens.c.jti == jti, _unrevoked_at(now))
                         .values(revoked_at=now, revoked_by=actor))
            self._audit(conn, actor, "token.revoke", token["user"], {"jti": jti}, source)
            epoch = self._changed_access(conn)
        self.publish(epoch)
        return self.get_token(jti)

    def revoke_all(self, user_name, actor="system", source="cli"):
        """Revoke every live token of a user, and end their console sessions; the number of tokens revoked."""
        user, now = self.get_user(user_name), self.clock()
        with self.engine.begin() as conn:
            count = conn.execute(tokens.update().where(tokens.c.user_id == user["id"], _unrevoked_at(now))
                                 .values(revoked_at=now, revoked_by=actor)).rowcount
            _end_console(conn, user["id"])
            self._audit(conn, actor, "token.revoke_all", user_name, {"count": count}, source)
            epoch = self._changed_access(conn)
        self.publish(epoch)
        return count

    def rotatable(self, jti):
        """The token `jti` if it may be rotated now; StoreError 404 if never issued, 409 if it is revoked,
        expired, or rotated already (its successor is the one to rotate)."""
        token = self.get_token(jti)
        if token is None:
            raise StoreError(404, f"no such token: {jti!r}", "unknown_token", "jti")
        if token["replaced_by"] is not None:
            raise StoreError(409, f"token {jti!r} was rotated already: its successor is {token['replaced_by']!r}",
                             "token_rotated", "jti")
        if token["revoked_at"] is not None:
            raise StoreError(409, f"token {jti!r} is revoked", "token_revoked", "jti")
        if token["expires_at"] <= self.clock():
            raise StoreError(409, f"token {jti!r} has expired", "token_expired", "jti")
        return token

    def rotate_token(self, jti, successor, ends_at, actor="system", source="cli"):
        """Record `successor` (the metadata of a token issued to replace `jti`: jti, scope, label, kid,
        issued_at, expires_at) and schedule `jti`'s revocation at `ends_at`, in one transaction; StoreError as
        `rotatable`, 409 also when another rotation or a revocation got there first."""
        old = self.rotatable(jti)
        user = self.get_user(old["user"])
        with self.engine.begin() as conn:
            taken = conn.execute(tokens.update().where(tokens.c.jti == jti, tokens.c.revoked_at.is_(None),
                                                       tokens.c.replaced_by.is_(None))
                                 .values(revoked_at=ends_at, revoked_by=actor, replaced_by=successor["jti"]))
            if taken.rowcount != 1:
                raise StoreError(409, f"token {jti!r} was revoked or rotated meanwhile", "token_rotated", "jti")
            conn.execute(tokens.insert().values(user_id=user["id"], replaces=jti, **successor))
            self._audit(conn, actor, "token.rotate", jti,
                        {"user": old["user"], "successor": successor["jti"], "grace_ends_at": ends_at.isoformat(),
                         "expires_at": successor["expires_at"].isoformat()}, source)
            epoch = self._changed_access(conn)  # cached copies of the old token learn their end
        self.publish(epoch)
        return self.get_token(jti)

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

    def usage_by_day(self, user=None, since=None, team=None, by="user"):
        """Daily totals per user (UTC days), or per team with `by="team"` (each row in the team it counted against
        then), newest first; `user` and `team` filter. Tokens are those computed: an answer from the response
        cache counts as a request (and in `cached`), not in the tokens."""
        day = sa.func.date(usage.c.at).label("day")
        who = usage.c[by]
        computed = lambda column: sa.func.sum(sa.case((usage.c.cached, 0), else_=column))  # noqa: E731
        query = (sa.select(day, who.label("who"), sa.func.count().label("requests"),
                           sa.func.sum(sa.case((usage.c.status < 400, 1), else_=0)).label("succeeded"),
                           sa.func.sum(sa.case((usage.c.cached, 1), else_=0)).label("cached"),
                           computed(usage.c.prompt_tokens).label("prompt_tokens"),
                           computed(usage.c.completion_tokens).label("completion_tokens"),
                           computed(usage.c.forced_tokens).label("forced_tokens"),
                           computed(usage.c.cached_tokens).label("cached_tokens"))
                 .group_by(day, who).order_by(day.desc(), who))
        for column, value in ((usage.c.user, user), (usage.c.team, team)):
            if value is not None:
                query = query.where(column == value)
        if by == "team":
            query = query.where(usage.c.team.is_not(None))
        if since is not None:
            query = query.where(usage.c.at >= aware(since))
        with self.engine.connect() as conn:
            return [{"day": str(r.day), by: r.who, "requests": r.requests, "succeeded": int(r.succeeded),
                     "cached": int(r.cached), "prompt_tokens": int(r.prompt_tokens),
                     "completion_tokens": int(r.completion_tokens),
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


def _unrevoked_at(moment):
    """Tokens not revoked at `moment`: never, or only later (a rotation's grace still running then)."""
    return sa.or_(tokens.c.revoked_at.is_(None), tokens.c.revoked_at > moment)


def token_status(token, now):
    """active, grace (rotated: works until its revoked_at), revoked or expired."""
    if token["revoked_at"] is not None:
        return "revoked" if token["revoked_at"] <= now else "grace"
    return "expired" if token["expires_at"] <= now else "active"


def _end_console(conn, user_id):
    """The admins' console: the user's sessions end and their unused sign-in links stop working."""
    conn.execute(console_sessions.delete().where(console_sessions.c.user_id == user_id))
    conn.execute(console_links.delete().where(console_links.c.user_id == user_id))


def _users_query():
    return sa.select(users, *TEAM_COLUMNS).select_from(users.outerjoin(teams, users.c.team_id == teams.c.id))


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
            **{column.name: row[column.name] for column in TEAM_COLUMNS},
            "transcripts": bool(row["transcripts"]), "created_at": aware(row["created_at"]).isoformat()}


def _token(row, now):
    token = {"jti": row["jti"], "user": row["user"], "scope": row["scope"], "label": row["label"],
             "kid": row["kid"], "issued_at": aware(row["issued_at"]), "expires_at": aware(row["expires_at"]),
             "revoked_at": aware(row["revoked_at"]), "revoked_by": row["revoked_by"], "replaces": row["replaces"],
             "replaced_by": row["replaced_by"]}
    token["status"] = token_status(token, now)
    for extra in ("user_active", "user_admin", "transcripts", *QUOTA_FIELDS, *(column.name for column in TEAM_COLUMNS)):
        if extra in row:
            token[extra] = _list(row[extra]) if extra in LIST_FIELDS else row[extra]
    return token
