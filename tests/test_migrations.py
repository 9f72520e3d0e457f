"""An upgrade never loses users, tokens or revocations."""

from datetime import datetime, timedelta, timezone

import sqlalchemy as sa

from auth.store import Store, connect, migrate


def test_upgrade_from_the_first_schema_keeps_the_data(tmp_path):
    url = f"sqlite:///{tmp_path}/old.db"
    engine = connect(url)
    migrate(engine, "0001")
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO users (id, name, is_admin, active, created_at) "
                             "VALUES (1, 'old-team', 0, 1, :now), (2, 'old-admin', 1, 0, :now)"), {"now": now})
        conn.execute(sa.text("INSERT INTO tokens (jti, user_id, scope, label, kid, issued_at, expires_at, revoked_at, "
                             "revoked_by) VALUES ('j-live', 1, 'generate', 'l', 'k', :now, :exp, NULL, NULL), "
                             "('j-dead', 1, 'generate', 'l', 'k', :now, :exp, :now, 'root')"),
                     {"now": now, "exp": now + timedelta(days=3650)})
    engine.dispose()

    store = Store(url)  # upgrades to head on open
    users = {u["name"]: u for u in store.list_users()}
    assert users["old-team"]["active"] and not users["old-admin"]["active"] and users["old-admin"]["admin"]
    assert users["old-team"]["rate_limit"] is None
    assert store.get_token("j-dead")["revoked_at"] == now and store.get_token("j-dead")["revoked_by"] == "root"
    assert store.get_token("j-live")["revoked_at"] is None
    store.update_user("old-team", daily_tokens=10)  # the new columns work
    assert store.list_audit()[0]["action"] == "user.update"
    with store.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() == "0002"
        assert conn.execute(sa.text("PRAGMA journal_mode")).scalar() == "wal"


def test_opening_twice_is_harmless(tmp_path):
    url = f"sqlite:///{tmp_path}/db.sqlite"
    Store(url).add_user("a")
    assert [u["name"] for u in Store(url).list_users()] == ["a"]
