"""Backup and restore of the store, on SQLite and on PostgreSQL: consistent under writes, complete, private,
pruned, refusing what is no backup, and never bringing a revoked token back."""

import os
import stat
import threading
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from auth import backup
from auth.errors import StoreError
from auth.schema import audit, tokens, usage, users
from auth.store import Store


def usage_row(i):
    return {"user": "alice", "route": "/v1/predict", "status": 200, "prompt_tokens": i, "completion_tokens": 1,
            "latency_ms": 5, "finish_reason": "stop", "request_id": f"r{i}"}


def rows(url, table):
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return sorted(tuple(row) for row in conn.execute(sa.select(table)).all())
    finally:
        engine.dispose()


@pytest.fixture
def filled(db_url):
    store = fill(db_url)
    yield store, ["jti-alice", "jti-bob"]
    store.close()


def fill(db_url):
    store = Store(db_url)
    store.add_user("alice")
    store.add_user("bob", daily_tokens=500)
    for user in ("alice", "bob"):
        jti = f"jti-{user}"
        now = datetime.now(timezone.utc)
        store.record_token(jti, user, "generate", "laptop", "k1", now, now + timedelta(hours=1))
    store.revoke_token("jti-bob")
    store.record_usage([usage_row(i) for i in range(50)])
    return store


def test_a_backup_under_writes_is_consistent_and_a_restore_brings_everything_back(filled, db_url, tmp_path):
    store, _ = filled
    before = {table.name: rows(db_url, table) for table in (users, tokens, audit, usage)}
    stop, written = threading.Event(), [0]

    def write():
        i = 1000
        while not stop.is_set():
            store.record_usage([usage_row(i)])
            written[0] += 1
            i += 1
    writer = threading.Thread(target=write)
    writer.start()
    try:
        result = backup.backup(db_url, tmp_path / "backups" / "db.backup")
    finally:
        stop.set()
        writer.join()
    assert written[0] > 0 and result["bytes"] > 0
    assert stat.S_IMODE(os.stat(result["path"]).st_mode) == 0o600
    assert [p.name for p in (tmp_path / "backups").iterdir()] == ["db.backup"]  # no temporary file left
    after_backup = rows(db_url, usage)
    store.add_user("carol")  # after the backup: the restore rolls it back
    restored = backup.restore(db_url, result["path"])
    assert restored["revocations_kept"] == 0
    for table in (users, tokens, audit):
        assert rows(db_url, table) == before[table.name], table.name
    got = rows(db_url, usage)
    assert set(before["usage"]) <= set(got) <= set(after_backup)  # every row committed before it, none torn
    assert "carol" not in [row[1] for row in rows(db_url, users)]
    reopened = Store(db_url)
    assert reopened.get_user("alice")["name"] == "alice"
    reopened.close()


def test_a_restore_never_brings_a_revoked_token_back(filled, db_url, tmp_path):
    store, _ = filled
    saved = backup.backup(db_url, tmp_path / "db.backup")["path"]
    store.revoke_token("jti-alice")  # after the backup
    epoch = store.epoch()
    published = []
    result = backup.restore(db_url, saved, publish=published.append)
    assert result["revocations_kept"] == 1
    revoked = {row[0]: row[7] is not None for row in rows(db_url, tokens)}
    assert revoked == {"jti-alice": True, "jti-bob": True}
    fresh = Store(db_url)
    assert fresh.epoch() != epoch and published == [fresh.epoch()]  # workers drop what they cached
    fresh.close()


def test_a_damaged_sqlite_file_is_restored_and_kept_aside(tmp_path):
    url = f"sqlite:///{tmp_path}/db.sqlite"
    store = fill(url)
    saved = backup.backup(url, tmp_path / "db.backup")["path"]
    store.close()
    path = url.removeprefix("sqlite:///")
    with open(path, "r+b") as handle:
        handle.write(b"\x00garbage" * 512)
    backup.restore(url, saved)
    assert [row[1] for row in rows(url, users)] == ["alice", "bob"]
    assert any(name.startswith("db.sqlite.before-restore-") for name in os.listdir(os.path.dirname(path)))


@pytest.mark.parametrize("content", [b"", b"not a database at all", b"SQLite format 3\x00" + b"\x00" * 100])
def test_what_is_no_backup_is_refused_and_the_database_is_untouched(filled, db_url, tmp_path, content):
    bad = tmp_path / "bad.backup"
    bad.write_bytes(content)
    before = rows(db_url, users)
    with pytest.raises(StoreError) as refused:
        backup.restore(db_url, bad)
    assert refused.value.code in ("invalid_backup", "backup_failed")
    assert rows(db_url, users) == before
    with pytest.raises(StoreError) as missing:
        backup.restore(db_url, tmp_path / "nothing-here")
    assert missing.value.code == "not_found"


def test_nightly_backups_keep_the_newest(filled, db_url, tmp_path):
    names = [backup.backup_into(db_url, tmp_path / "nightly", keep=3) for _ in range(5)]
    left = sorted(p.name for p in (tmp_path / "nightly").iterdir())
    assert left == sorted(os.path.basename(r["path"]) for r in names[-3:])
    assert names[-1]["removed"] and len(left) == 3


def test_pg_dump_gets_the_urls_tls_settings_and_password_in_its_environment_only():
    env = backup.pg_environment("postgresql+psycopg://svc:p%40ss%2Fw@10.0.0.20:5432/vibethinker"
                                "?sslmode=verify-full&sslrootcert=/etc/vibethinker/cluster-ca.pem")
    assert env == {"PGDATABASE": "vibethinker", "PGUSER": "svc", "PGPASSWORD": "p@ss/w", "PGHOST": "10.0.0.20",
                   "PGPORT": "5432", "PGSSLMODE": "verify-full", "PGSSLROOTCERT": "/etc/vibethinker/cluster-ca.pem"}
    # A socket folder given as ?host=, no password, no TLS: only what the URL says.
    assert backup.pg_environment("postgresql+psycopg:///db?host=/run/postgresql") == {
        "PGDATABASE": "db", "PGHOST": "/run/postgresql"}
