"""Issue, revoke, disable, rotate and retire, against real gunicorn and the real CLI; state survives restarts."""

import jwt
import pytest

pytestmark = pytest.mark.slow  # real restarts, many CLI calls or long runs: not in make test-quick


@pytest.fixture(scope="module")
def life(start_server):
    """A server of its own: these tests restart it and retire keys."""
    return start_server()


def issue(server, user, *args):
    out = server.cli("tokens", "issue", user, *args).stdout.strip().splitlines()
    return out[-1]


def status(server, token):
    return server.get("/v1/me", token=token).status_code


def jti(token):
    return jwt.decode(token, options={"verify_signature": False})["jti"]


def test_revocation_holds_on_the_next_request_and_after_restart(life):
    life.cli("users", "add", "team-a")
    by_http, by_cli, kept = issue(life, "team-a"), issue(life, "team-a"), issue(life, "team-a")
    assert {status(life, t) for t in (by_http, by_cli, kept)} == {200}

    assert life.request("DELETE", f"/admin/tokens/{jti(by_http)}").status_code == 200
    assert status(life, by_http) == 401
    life.cli("tokens", "revoke", jti(by_cli))
    refused = life.get("/v1/me", token=by_cli)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "token_revoked"
    assert status(life, kept) == 200

    life.restart()
    assert (status(life, by_http), status(life, by_cli), status(life, kept)) == (401, 401, 200)


def test_disable_refuses_every_token_and_enable_restores_them(life):
    life.cli("users", "add", "team-b")
    first, second = issue(life, "team-b"), issue(life, "team-b")
    life.cli("tokens", "revoke", jti(second))
    life.cli("users", "disable", "team-b")
    refused = life.get("/v1/me", token=first)
    assert refused.status_code == 403 and "disabled" in refused.json()["error"]["message"]
    life.cli("users", "enable", "team-b")
    assert status(life, first) == 200
    assert status(life, second) == 401  # individually revoked stays revoked


def test_revoke_all(life):
    life.cli("users", "add", "team-c")
    tokens = [issue(life, "team-c") for _ in range(3)]
    assert "revoked 3" in life.cli("tokens", "revoke-all", "team-c").stdout
    assert {status(life, t) for t in tokens} == {401}
    assert status(life, issue(life, "team-c")) == 200  # new tokens work again


def test_rotation_keeps_old_tokens_until_their_key_is_retired(life):
    life.cli("users", "add", "team-d")
    old = issue(life, "team-d")
    old_kid = jwt.get_unverified_header(old)["kid"]
    life.cli("keys", "rotate")
    new = issue(life, "team-d")
    new_kid = jwt.get_unverified_header(new)["kid"]
    assert new_kid != old_kid and new_kid == life.cli("keys", "list").stdout.split()[-2]
    assert (status(life, old), status(life, new)) == (200, 200)  # the running server saw the new key
    life.cli("keys", "retire", old_kid)
    assert (status(life, old), status(life, new)) == (401, 200)
    assert "retired" in life.get("/v1/me", token=old).json()["error"]["message"]


def test_token_text_is_never_stored_or_logged(life):
    life.cli("users", "add", "team-e")
    token = issue(life, "team-e", "--label", "secret-check")
    life.get("/v1/me", token=token)
    db_path = life.env["VIBE_DB_URL"].removeprefix("sqlite:///")
    signature = token.split(".")[2]
    for path in (db_path, db_path + "-wal", str(life.log_path)):
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            continue
        assert signature.encode() not in data, path
    listed = life.cli("--json", "tokens", "list", "--user", "team-e").stdout
    assert signature not in listed and jti(token) in listed
