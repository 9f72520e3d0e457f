"""What a user may store and open: files, bytes, open batches, batches created a day.

Each quota is the user's own (auth.store's users row, set by `vibethinker-admin
users set` or PATCH /admin/users) or the server's default (service.settings).
A quota that is full refuses the upload or the create with LimitReached (429)
naming the quota in `param`; nothing is stored. Each is checked early (before
an upload is spooled or a file's lines are prepared) and again in the
transaction that stores the file or the batch, after `hold` has locked the
user's row: concurrent uploads or creates of one user pass one at a time,
so none of them passes a quota that only the others filled.
"""

from dataclasses import dataclass
from datetime import datetime, timezone

import sqlalchemy as sa

from auth.errors import StoreError
from auth.schema import users
from service.admission.budget import DAY_S
from service.batches.tables import batch_lines, batches, files
from service.errors import LimitReached

OPEN = ("validating", "in_progress", "finalizing", "cancelling")


@dataclass(frozen=True)
class StorageQuota:
    """One user's storage quotas, defaults applied."""

    max_files: int
    max_stored_bytes: int
    max_open_batches: int
    daily_batches: int

    @classmethod
    def of(cls, fields, settings):
        """The quotas of a user row or token record (`fields`), the settings' defaults where unset."""
        defaults = {"max_files": settings.default_max_files, "max_stored_bytes": settings.default_max_stored_bytes,
                    "max_open_batches": settings.max_open_batches, "daily_batches": settings.default_daily_batches}
        return cls(**{name: fields.get(name) or value for name, value in defaults.items()})


def hold(conn, user):
    """Lock `user`'s row for the rest of `conn`'s transaction (a row lock in PostgreSQL, the write lock in
    SQLite): the quota checks and inserts of one user's concurrent requests run one after the other."""
    conn.execute(users.update().where(users.c.name == user).values(name=users.c.name))


def usage(conn, user):
    """What `user` stores and opened (on connection `conn`): files, stored_bytes, open_batches,
    batches_today."""
    midnight = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    count, size = conn.execute(sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(files.c.bytes), 0))
                               .where(files.c.user == user)).one()
    opened = conn.execute(sa.select(sa.func.count()).select_from(batches).where(
        batches.c.user == user, batches.c.status.in_(OPEN))).scalar_one()
    today = conn.execute(sa.select(sa.func.count()).select_from(batches).where(
        batches.c.user == user, batches.c.created_at >= midnight)).scalar_one()
    return {"files": count, "stored_bytes": int(size), "open_batches": opened, "batches_today": today}


def check_files(conn, user, quota, adding):
    """LimitReached unless `user` may store one more file of `adding` bytes. Expired files not yet purged
    count until they are: the purge runs every minute."""
    used = usage(conn, user)
    if used["files"] + 1 > quota.max_files:
        raise LimitReached(f"{user} stores {used['files']} files, their max_files quota of {quota.max_files}; "
                           "delete some (DELETE /v1/files/{id}) or wait for them to expire",
                           "file_quota_exceeded", "max_files")
    if used["stored_bytes"] + adding > quota.max_stored_bytes:
        raise LimitReached(f"{user} stores {used['stored_bytes']} bytes; {adding} more would pass their "
                           f"max_stored_bytes quota of {quota.max_stored_bytes}; delete some files",
                           "storage_quota_exceeded", "max_stored_bytes")


def check_batches(conn, user, quota):
    """LimitReached unless `user` may create one more batch now (open ones, and today's)."""
    used = usage(conn, user)
    if used["open_batches"] >= quota.max_open_batches:
        raise LimitReached(f"{user} already has {quota.max_open_batches} batches open, their max_open_batches "
                           "quota; wait for one to end", "too_many_batches", "max_open_batches", retry_after=60)
    if used["batches_today"] >= quota.daily_batches:
        seconds = DAY_S - int(datetime.now(timezone.utc).timestamp()) % DAY_S
        raise LimitReached(f"{user} created {used['batches_today']} batches today, their daily_batches quota; "
                           "it resets at midnight UTC", "daily_batch_quota_exceeded", "daily_batches",
                           retry_after=seconds)


def release_user(conn, user):
    """Before `user` is removed (auth.store.remove_user's `release`, in its transaction): StoreError 409 while
    they store files or have batches open (removing them would orphan those), else their finished batches and
    lines are deleted. {"batches": how many}."""
    used = usage(conn, user)
    if used["files"] or used["open_batches"]:
        raise StoreError(409, f"{user} still stores {used['files']} file(s) and has {used['open_batches']} batch(es) "
                         "open: cancel their batches (POST /v1/batches/{id}/cancel) and delete their files (DELETE "
                         "/v1/files/{id}), then remove them", "user_has_data", "name")
    ended = sa.select(batches.c.id).where(batches.c.user == user).scalar_subquery()
    conn.execute(batch_lines.delete().where(batch_lines.c.batch_id.in_(ended)))
    return {"batches": conn.execute(batches.delete().where(batches.c.user == user)).rowcount}
