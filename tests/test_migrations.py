"""An upgrade never loses users, tokens or revocations, on SQLite and on PostgreSQL."""

from datetime import datetime, timedelta, timezone

import sqlalchemy as sa

from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from auth.schema import MIGRATIONS, connect, metadata, migrate
from service.batches import tables  # noqa: F401 - its tables join the metadata compared
from auth.store import Store


def _head():
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return ScriptDirectory.from_config(config).get_current_head()


def test_the_store_tables_are_the_migrated_schema(db_url):
    """auth/store.py's tables and what the migrations build agree, column by column (Alembic's compare)."""
    engine = connect(db_url)
    migrate(engine)
    with engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
    engine.dispose()
    assert differences == []


def test_every_store_change_to_access_replaces_the_epoch(tmp_path):
    published = []
    store = Store(f"sqlite:///{tmp_path}/db.sqlite", publish=published.append)
    first = store.epoch()
    store.add_user("a")  # a new user changes no one's access
    assert store.epoch() == first and published == []
    expires = datetime.now(timezone.utc) + timedelta(days=1)
    store.record_token("j1", "a", "generate", "", "kid", datetime.now(timezone.utc), expires)
    assert store.epoch() == first
    for change in (lambda: store.update_user("a", active=False), lambda: store.update_user("a", daily_tokens=5),
                   lambda: store.revoke_token("j1"), lambda: store.revoke_all("a"),
                   lambda: store.record_event("key.retire", "kid", {}, changes_access=True),
                   lambda: store.add_team("t") and store.set_members("t", add=["a"]),
                   lambda: store.update_team("t", daily_tokens=5), lambda: store.remove_team("t")):
        before = store.epoch()
        change()
        assert store.epoch() != before and published[-1] == store.epoch()
    assert len(set(published)) == 8
    store.close()


def test_upgrade_from_the_first_schema_keeps_the_data(db_url):
    engine = connect(db_url)
    migrate(engine, "0001")
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    with engine.begin() as conn:
        meta = sa.MetaData()
        users, tokens = (sa.Table(name, meta, autoload_with=conn) for name in ("users", "tokens"))
        assert "rate_limit" not in users.c  # really the first schema
        conn.execute(users.insert(), [
            {"id": 1, "name": "old-team", "is_admin": False, "active": True, "created_at": now},
            {"id": 2, "name": "old-admin", "is_admin": True, "active": False, "created_at": now}])
        token = {"user_id": 1, "scope": "generate", "label": "l", "kid": "k", "issued_at": now,
                 "expires_at": now + timedelta(days=3650)}
        conn.execute(tokens.insert(), [{**token, "jti": "j-live", "revoked_at": None, "revoked_by": None},
                                       {**token, "jti": "j-dead", "revoked_at": now, "revoked_by": "root"}])
    engine.dispose()

    store = Store(db_url)  # upgrades to head on open
    users = {u["name"]: u for u in store.list_users()}
    assert users["old-team"]["active"] and not users["old-admin"]["active"] and users["old-admin"]["admin"]
    assert users["old-team"]["rate_limit"] is None and users["old-team"]["system_prompts"] is None
    assert store.get_token("j-dead")["revoked_at"] == now and store.get_token("j-dead")["revoked_by"] == "root"
    assert store.get_token("j-live")["revoked_at"] is None
    store.update_user("old-team", daily_tokens=10)  # the new columns work
    assert store.list_audit()[0]["action"] == "user.update"
    with store.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() == _head()
    store.close()


def test_sqlite_runs_in_wal_mode(tmp_path):
    store = Store(f"sqlite:///{tmp_path}/db.sqlite")
    with store.engine.connect() as conn:
        assert conn.execute(sa.text("PRAGMA journal_mode")).scalar() == "wal"
    store.close()


def test_store_round_trip(db_url):
    store = Store(db_url)
    store.add_user("a", rate_limit="5/minute")
    again = Store(db_url)  # opening twice is harmless
    assert [u["name"] for u in again.list_users()] == ["a"]
    again.close()
    expires = datetime.now(timezone.utc) + timedelta(days=1)
    store.record_token("j1", "a", "generate", "", "kid", datetime.now(timezone.utc), expires)
    assert [t["jti"] for t in store.list_tokens("a")] == ["j1"]
    assert store.revoke_all("a") == 1 and store.get_token("j1")["revoked_at"] is not None
    assert store.list_tokens("a") == [] and store.ping()
    store.close()


def test_cli_db_upgrade_says_whether_it_moved_the_schema(tmp_path):
    import json

    from tests.support.servers import admin_cli, state_env

    env = state_env(tmp_path)
    first = json.loads(admin_cli(env, "--json", "db", "upgrade").stdout)
    again = json.loads(admin_cli(env, "--json", "db", "upgrade").stdout)
    assert first["upgraded"] is True and first["from"] is None and first["to"]
    assert again == {"upgraded": False, "from": first["to"], "to": first["to"]}
    assert "up to date" in admin_cli(env, "db", "upgrade").stdout
