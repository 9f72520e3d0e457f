"""Token rotation in process (Flask's test client, the real app, store and engine, tokens cached under Redis'
access epoch): a successor now, the old token until its grace ends, then refused everywhere; the clock is the
store's, moved by the test."""

import itertools
from datetime import datetime, timedelta

import pytest

from auth import backup
from auth.schema import tokens
from auth.store import utcnow
from auth.tokens import issue_token, rotate_token
from service.state import state
from tests.support.inprocess import StoreClock, make_app, moved_clock, stop_app, token_header

NAMES = itertools.count()


@pytest.fixture(scope="module")
def app(tiny_model, tmp_path_factory, redis_server):
    app = make_app(tiny_model, tmp_path_factory.mktemp("rotation"), ratelimit_storage_uri=redis_server.uri)
    state(app).store.add_user("root-r", is_admin=True)
    yield app
    stop_app(app)


@pytest.fixture
def clock(app):
    with moved_clock(app) as moved:
        yield moved


@pytest.fixture
def admin(app):
    headers = token_header(app, "root-r", "generate admin")
    client = app.test_client()
    return lambda method, path, body=None: client.open(path, method=method, json=body, headers=headers)


class Lookups:
    """Counts the store's token lookups (the real ones run): a request that makes none was served from the
    worker's token cache."""

    def __init__(self, store):
        self.count, self.store, self.real = 0, store, store.get_token
        store.get_token = self

    def __call__(self, jti):
        self.count += 1
        return self.real(jti)


def me(app, headers):
    return app.test_client().get("/v1/me", headers=headers)


def user_with_token(app, name, **issue):
    """A new user and one token of theirs: (its Authorization header, its jti)."""
    app_state = state(app)
    app_state.store.add_user(name)
    text, meta = issue_token(app_state.store, app_state.keys, name, issuer=app_state.settings.jwt_issuer,
                             audience=app_state.settings.jwt_audience, **issue)
    return {"Authorization": f"Bearer {text}"}, meta["jti"]


def test_a_rotated_token_works_during_its_grace_even_cached_and_is_refused_after_it(app, clock, admin):
    # Issued two days ago for ten: the successor lives ten days from now, as long as the old one was issued for.
    old, jti = user_with_token(app, "rot-a", ttl="10d", label="nightly", now=utcnow() - timedelta(days=2))
    assert me(app, old).status_code == 200
    rotated = admin("POST", f"/admin/tokens/{jti}/rotate", {"grace": "1h"})
    assert rotated.status_code == 201, rotated.get_json()
    meta = rotated.get_json()
    new = {"Authorization": f"Bearer {meta['token']}"}
    assert (meta["user"], meta["scope"], meta["label"], meta["replaces"]) == ("rot-a", "generate", "nightly", jti)
    assert abs((_at(meta["grace_ends_at"]) - utcnow() - timedelta(hours=1)).total_seconds()) < 5
    assert _at(meta["expires_at"]) - _at(meta["issued_at"]) == timedelta(days=10)
    assert me(app, new).get_json()["token"]["jti"] == meta["jti"]

    lookups = Lookups(state(app).store)
    try:
        assert me(app, old).status_code == 200  # checked again (the rotation moved the epoch), then cached...
        seen = lookups.count
        assert me(app, old).status_code == 200 and lookups.count == seen  # ...and this one is a cache hit
        listed = {t["jti"]: t for t in admin("GET", "/admin/tokens?user=rot-a").get_json()["data"]}
        assert (listed[jti]["status"], listed[jti]["replaced_by"], listed[jti]["revoked_at"]) == (
            "grace", meta["jti"], meta["grace_ends_at"])
        assert (listed[meta["jti"]]["status"], listed[meta["jti"]]["replaces"]) == ("active", jti)

        clock.offset += timedelta(hours=1, seconds=1)  # past the grace; no epoch moves: the cache must know
        refused = me(app, old)
        assert refused.status_code == 401 and refused.get_json()["error"]["code"] == "token_revoked"
        assert "rotated" in refused.get_json()["error"]["message"]
        assert me(app, new).status_code == 200
    finally:
        state(app).store.get_token = lookups.real
    assert [t["jti"] for t in admin("GET", "/admin/tokens?user=rot-a").get_json()["data"]] == [meta["jti"]]
    every = {t["jti"]: t["status"] for t in admin("GET", "/admin/tokens?user=rot-a&all=true").get_json()["data"]}
    assert every == {jti: "revoked", meta["jti"]: "active"}
    [event] = admin("GET", f"/admin/audit?action=token.rotate&target={jti}").get_json()["data"]
    assert (event["actor"], event["detail"]["successor"], event["detail"]["grace_ends_at"]) == (
        "root-r", meta["jti"], meta["grace_ends_at"])
    assert meta["token"] not in str(event)
    again = admin("POST", f"/admin/tokens/{jti}/rotate", {"grace": "1h"})
    assert again.status_code == 409 and again.get_json()["error"]["code"] == "token_rotated"


def _at(text):
    return datetime.fromisoformat(text)


def test_grace_zero_refuses_at_once_and_a_grace_never_outlives_the_token(app, admin):
    old, jti = user_with_token(app, "rot-b")
    assert me(app, old).status_code == 200  # cached
    assert admin("POST", f"/admin/tokens/{jti}/rotate", {"grace": "0"}).status_code == 201
    assert me(app, old).get_json()["error"]["code"] == "token_revoked"
    short, short_jti = user_with_token(app, "rot-c", ttl="2h")
    held = state(app).store.get_token(short_jti)["expires_at"]
    meta = admin("POST", f"/admin/tokens/{short_jti}/rotate", {"grace": "30d"}).get_json()
    assert _at(meta["grace_ends_at"]) == held  # its own expiry, not 30 days
    assert _at(meta["expires_at"]) - _at(meta["issued_at"]) == timedelta(hours=2)


def test_the_successors_lifetime_is_capped_by_the_servers_maximum(app):
    app_state = state(app)
    settings, store = app_state.settings, app_state.store
    _, jti = user_with_token(app, "rot-d", ttl="300d", max_ttl="365d")
    _, meta = rotate_token(store, app_state.keys, jti, grace="1h", max_ttl="90d", issuer=settings.jwt_issuer,
                           audience=settings.jwt_audience)
    assert _at(meta["expires_at"]) - _at(meta["issued_at"]) == timedelta(days=90)


@pytest.mark.parametrize("target,body,status,code,param", [
    ("live", {"grace": "forever"}, 400, "invalid_duration", "grace"),
    ("live", {"grace": "-1h"}, 400, "invalid_duration", "grace"),
    ("live", {"grace": "31d"}, 400, "grace_too_long", "grace"),
    ("live", {}, 400, "missing", "grace"),
    ("live", {"grace": 3600}, 400, "invalid_type", "grace"),
    ("unknown", {"grace": "1h"}, 404, "unknown_token", "jti"),
    ("revoked", {"grace": "1h"}, 409, "token_revoked", "jti"),
    ("expired", {"grace": "1h"}, 409, "token_expired", "jti"),
])
def test_bad_rotations_are_refused_in_the_one_error_shape(app, admin, target, body, status, code, param):
    store = state(app).store
    _, jti = user_with_token(app, f"rot-e-{next(NAMES)}")
    if target == "unknown":
        jti = "no-such-jti"
    elif target == "revoked":
        store.revoke_token(jti)
    elif target == "expired":
        with store.engine.begin() as conn:
            conn.execute(tokens.update().where(tokens.c.jti == jti).values(expires_at=utcnow() - timedelta(1)))
    answer = admin("POST", f"/admin/tokens/{jti}/rotate", body)
    assert answer.status_code == status, answer.get_json()
    error = answer.get_json()["error"]
    assert (error["code"], error["param"]) == (code, param)
    if target == "live":
        assert store.get_token(jti)["status"] == "active" and len(store.list_tokens(store.get_token(jti)["user"])) == 1


def test_revoking_during_the_grace_ends_it_at_once(app, admin):
    old, jti = user_with_token(app, "rot-f")
    admin("POST", f"/admin/tokens/{jti}/rotate", {"grace": "7d"})
    assert me(app, old).status_code == 200
    assert admin("DELETE", f"/admin/tokens/{jti}").get_json()["status"] == "revoked"
    assert me(app, old).status_code == 401


def test_the_spec_has_the_rotate_route(app):
    spec = app.test_client().get("/openapi.json").get_json()
    operation = spec["paths"]["/admin/tokens/{jti}/rotate"]["post"]
    assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/AdminTokenRotate")
    assert operation["responses"]["201"]["content"]["application/json"]["schema"]["$ref"].endswith("/RotatedToken")
    assert {"404", "409", "400"} <= set(operation["responses"])


def test_a_restore_keeps_a_scheduled_end_and_an_earlier_revocation_made_since(tmp_path):
    from auth import keys
    from auth.store import Store

    keys.generate(tmp_path / "keys")
    keyset, url, clock = keys.KeySet(tmp_path / "keys"), f"sqlite:///{tmp_path}/db.sqlite", StoreClock()
    store = Store(url, clock=clock)
    store.add_user("rot-g")
    jtis = [issue_token(store, keyset, "rot-g", issuer="i", audience="a")[1]["jti"] for _ in range(2)]
    before = backup.backup(url, tmp_path / "before.sqlite")["path"]
    ends = {jti: _at(rotate_token(store, keyset, jti, grace="1d", issuer="i", audience="a")[1]["grace_ends_at"])
            for jti in jtis}
    during = backup.backup(url, tmp_path / "during.sqlite")["path"]
    store.revoke_token(jtis[1])  # cut short after the second backup

    backup.restore(url, during)  # the grace as scheduled; the revocation made since, earlier, wins
    restored = Store(url, clock=clock)
    assert restored.get_token(jtis[0])["revoked_at"] == ends[jtis[0]]
    assert restored.get_token(jtis[0])["status"] == "grace" and restored.get_token(jtis[1])["status"] == "revoked"
    backup.restore(url, before)  # from before the rotation: the old tokens still end when they were to
    assert restored.get_token(jtis[0])["revoked_at"] == ends[jtis[0]]
    clock.offset = timedelta(days=1, seconds=1)
    assert {restored.get_token(jti)["status"] for jti in jtis} == {"revoked"}
    restored.close()
    store.close()
