"""Backup and restore of the database: users, tokens, revocations, usage, audit and batch jobs.

SQLite is copied through its online backup API (sqlite3's `Connection.backup`):
a consistent snapshot taken page by page while the service keeps writing,
never a torn file copy. PostgreSQL goes through `pg_dump --format=custom` and
`pg_restore`, their connection details in the environment (PGPASSWORD never
appears in a process's arguments). A backup is written to a temporary file
beside its target, checked, made private (0600) and renamed into place, so a
failed or interrupted backup never leaves a half file under the name.

Restore never brings a revoked token back: revocations the damaged or newer
database still holds (those made after the backup was taken) are read first
and applied again to what was restored, and the access epoch is replaced, so
every worker drops the tokens it had cached. The restored schema is then
migrated to this version's head (a backup from an earlier version restores).
Restore while the service is stopped: it replaces the whole database.

A backup holds transcripts (auth.transcripts) only as their ciphertext: the
key folder is never copied into it, so reading them after a restore needs the
transcripts' key file, kept apart from the backups.
"""

import os
import shutil
import sqlite3
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from auth.errors import StoreError
from auth.schema import connect, revision, tokens
from auth.store import Store

SQLITE = "sqlite:///"


def backup(db_url, target):
    """Write a backup of the database at `db_url` to the file `target`: {"kind", "path", "bytes", "seconds"}."""
    target = Path(target)
    started = time.monotonic()
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(handle)
    try:
        if db_url.startswith(SQLITE):
            kind = "sqlite"
            _sqlite_backup(_sqlite_path(db_url), Path(temp))
        else:
            kind = "postgresql"
            _pg("pg_dump", db_url, "--format=custom", "--no-owner", "--no-privileges", f"--file={temp}")
        os.chmod(temp, 0o600)
        os.replace(temp, target)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
    return {"kind": kind, "path": str(target), "bytes": target.stat().st_size,
            "seconds": round(time.monotonic() - started, 3)}


def backup_into(db_url, folder, keep):
    """A timestamped backup in `folder` (vibethinker-YYYYmmddTHHMMSSZ.<kind>), then all but the newest `keep`
    of them deleted: the nightly timer's job. The result of `backup`, with "removed"."""
    folder = Path(folder)
    kind = "sqlite" if db_url.startswith(SQLITE) else "pgdump"
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    result = backup(db_url, folder / f"vibethinker-{stamp}.{kind}")
    kept = sorted(folder.glob(f"vibethinker-*.{kind}"), reverse=True)
    removed = []
    for old in kept[keep:]:
        old.unlink()
        removed.append(old.name)
    return {**result, "removed": removed}


def restore(db_url, source, publish=None):
    """Replace the database at `db_url` with the backup `source`; revocations made since are kept (the new
    access epoch goes to `publish`, as the store's changes do).
    {"kind", "revocations_kept", "schema"}; StoreError when the backup is not one."""
    source = Path(source)
    if not source.is_file():
        raise StoreError(404, f"no backup file at {source}", "not_found")
    later = _revocations(db_url)  # before anything is replaced; nothing when the database is unreadable
    if db_url.startswith(SQLITE):
        kind = "sqlite"
        _check_sqlite_backup(source)
        _sqlite_restore(source, _sqlite_path(db_url))
    else:
        kind = "postgresql"
        _pg("pg_restore", db_url, "--clean", "--if-exists", "--no-owner", "--no-privileges", "--single-transaction",
            "--exit-on-error", str(source))
    store = Store(db_url, publish=publish)  # migrated to this version's head on open
    try:
        kept = store.revoke_again(later)
        schema = revision(store.engine)
    finally:
        store.close()
    return {"kind": kind, "revocations_kept": kept, "schema": schema}


# --- SQLite ---

def _sqlite_path(db_url):
    return Path(db_url.removeprefix(SQLITE))


def _sqlite_backup(path, target):
    if not path.is_file():
        raise StoreError(404, f"no database at {path}", "not_found")
    source = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    copy = sqlite3.connect(target)
    try:
        source.execute("PRAGMA busy_timeout=5000")
        source.backup(copy)  # in steps of the whole file; a writer in between restarts it (SQLite's rules)
        copy.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
    finally:
        copy.close()
        source.close()
    _check_sqlite_backup(target)


def _check_sqlite_backup(path):
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            ok = conn.execute("PRAGMA integrity_check").fetchone()[0]
            has_schema = conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'alembic_version'").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise StoreError(422, f"{path} is not a readable SQLite backup ({exc})", "invalid_backup") from None
    if ok != "ok" or not has_schema:
        raise StoreError(422, f"{path} is not a VibeThinker database backup (integrity: {ok}; schema: "
                         f"{'yes' if has_schema else 'none'})", "invalid_backup")


def _sqlite_restore(source, path):
    """The live file, its WAL and shared-memory files moved aside (a damaged database is kept for a look),
    then the backup copied in its place through the backup API."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for suffix in ("", "-wal", "-shm"):
        live = Path(f"{path}{suffix}")
        if live.exists():
            shutil.move(live, f"{path}.before-restore-{stamp}{suffix}")
    backup_conn, live_conn = sqlite3.connect(f"file:{source}?mode=ro", uri=True), sqlite3.connect(path)
    try:
        backup_conn.backup(live_conn)
    finally:
        live_conn.close()
        backup_conn.close()
    os.chmod(path, 0o600)


# --- PostgreSQL ---

# The URL's libpq parameters that pg_dump and pg_restore take from the environment: TLS above all (a
# cluster's "?sslmode=verify-full&sslrootcert=...", which the service's own connections honour too).
PG_QUERY_ENV = {"host": "PGHOST", "sslmode": "PGSSLMODE", "sslrootcert": "PGSSLROOTCERT", "sslcert": "PGSSLCERT",
                "sslkey": "PGSSLKEY", "sslcrl": "PGSSLCRL", "connect_timeout": "PGCONNECT_TIMEOUT"}


def pg_environment(db_url):
    """libpq's environment for `db_url`: its database, user, password, host, port and TLS settings."""
    url = make_url(db_url)
    env = {variable: url.query.get(key) for key, variable in PG_QUERY_ENV.items()}
    env.update({"PGDATABASE": url.database, "PGUSER": url.username, "PGPASSWORD": url.password,
                "PGHOST": url.host or env["PGHOST"], "PGPORT": str(url.port or "")})
    return {key: value for key, value in env.items() if isinstance(value, str) and value != ""}


def _pg(tool, db_url, *args):
    """Run pg_dump or pg_restore against `db_url`, its connection details in the environment only."""
    binary = shutil.which(tool) or next(iter(sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{tool}"),
                                                    reverse=True)), None)
    if binary is None:
        raise StoreError(500, f"{tool} is not installed (Debian: postgresql-client)", "missing_tool")
    # The URL says it all: no PG* variable of the caller's environment (a PGSSLMODE=disable) overrides it.
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PG")}, **pg_environment(db_url)}
    url = make_url(db_url)
    dbname = ["--dbname", url.database] if tool == "pg_restore" else []
    result = subprocess.run([str(binary), *dbname, *args], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        raise StoreError(500, f"{tool} failed: {lines[-1] if lines else f'exit {result.returncode}'}",
                         "backup_failed")


# --- what a restore must not undo ---

def _revocations(db_url):
    """{jti: (revoked_at, revoked_by)} of the database now, or {} when it cannot be read (it is damaged)."""
    try:
        engine = connect(db_url)
        try:
            with engine.connect() as conn:
                rows = conn.execute(sa.select(tokens.c.jti, tokens.c.revoked_at, tokens.c.revoked_by)
                                    .where(tokens.c.revoked_at.is_not(None))).all()
        finally:
            engine.dispose()
    except (sa.exc.SQLAlchemyError, OSError):
        return {}
    return {row.jti: (row.revoked_at, row.revoked_by) for row in rows}
