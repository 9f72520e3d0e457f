"""Cached tokens, revoked at once: two servers share one database, key folder and Redis, and cache tokens.

Every change to who may do what (revocation, disable, demotion, key retirement)
holds on the very next request on both servers, whether it was made through
one server's admin API or through the CLI; with Redis down, every request is
checked against the database.
"""

from pathlib import Path

import jwt
import pytest
import requests

from tests.support.databases import Redis
from tests.support.servers import Server, free_port

pytestmark = pytest.mark.slow  # two servers, restarts of Redis and many CLI calls


class Twin(Server):
    """A second server on the first one's database, keys and Redis (no provisioning of its own)."""

    def __init__(self, first):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = first.log_path.with_name(f"gunicorn-{self.port}.log")
        self.env = {**first.env, "VIBE_BIND": f"127.0.0.1:{self.port}"}
        self.token, self.proc = first.token, None


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    with Redis(tmp_path_factory.mktemp("redis-cache")).start() as server:
        yield server


@pytest.fixture(scope="module")
def pair(start_server, redis):
    first = start_server(VIBE_RATELIMIT_STORAGE_URI=redis.uri)
    second = Twin(first).start()
    yield first, second
    second.stop()


def issue(server, user, *args):
    return server.cli("tokens", "issue", user, *args).stdout.strip().splitlines()[-1]


def statuses(pair, token, path="/v1/me", times=2):
    """The status of `path` with `token` on each server, asked `times` times (the later ones are cache hits)."""
    return {server.get(path, token=token).status_code for server in pair for _ in range(times)}


def test_revocation_by_either_route_holds_on_both_servers_at_the_next_request(pair):
    first, second = pair
    first.cli("users", "add", "cached-a")
    by_http, by_cli, kept = (issue(first, "cached-a") for _ in range(3))
    assert statuses(pair, by_http) == statuses(pair, by_cli) == statuses(pair, kept) == {200}  # all cached

    jti = jwt.decode(by_http, options={"verify_signature": False})["jti"]
    assert first.request("DELETE", f"/admin/tokens/{jti}").status_code == 200
    assert second.get("/v1/me", token=by_http).json()["error"]["code"] == "token_revoked"
    second.cli("tokens", "revoke", jwt.decode(by_cli, options={"verify_signature": False})["jti"])
    assert statuses(pair, by_http) == statuses(pair, by_cli) == {401}
    assert statuses(pair, kept) == {200}


def test_disable_and_enable_reach_both_servers(pair):
    first, _ = pair
    first.cli("users", "add", "cached-b")
    token = issue(first, "cached-b")
    assert statuses(pair, token) == {200}
    first.cli("users", "disable", "cached-b")
    assert statuses(pair, token) == {403}
    first.cli("users", "enable", "cached-b")
    assert statuses(pair, token) == {200}


def test_demotion_ends_admin_power_at_the_next_request(pair):
    first, second = pair
    first.cli("users", "add", "cached-c", "--admin")
    token = issue(first, "cached-c", "--scope", "generate,admin")
    assert statuses(pair, token, "/admin/users") == {200}
    assert second.request("PATCH", "/admin/users/cached-c", {"admin": False}).status_code == 200
    refused = first.get("/admin/users", token=token)
    assert refused.status_code == 403 and "no longer an admin" in refused.json()["error"]["message"]
    assert statuses(pair, token, "/admin/users") == {403}
    assert statuses(pair, token) == {200}  # what it may still do, it still does


def retire_by_cli(server, kid):
    server.cli("keys", "retire", kid)


def remove_by_hand(server, kid):
    """A key file deleted without the CLI: no epoch moves, only the key folder changes."""
    (Path(server.env["VIBE_JWT_KEY_DIR"]) / f"{kid}.pem").unlink()


@pytest.mark.parametrize("retire", [retire_by_cli, remove_by_hand])
def test_a_retired_key_ends_its_cached_tokens_on_both_servers(pair, retire):
    first, _ = pair
    user = f"cached-{retire.__name__.replace('_', '-')}"
    first.cli("users", "add", user)
    old = issue(first, user)
    first.cli("keys", "rotate")
    new = issue(first, user)
    assert statuses(pair, old) == statuses(pair, new) == {200}
    retire(first, jwt.get_unverified_header(old)["kid"])
    assert statuses(pair, old) == {401} and statuses(pair, new) == {200}


def test_with_redis_down_every_request_is_checked_against_the_database(pair, redis):
    first, _ = pair
    first.cli("users", "add", "cached-e")
    token, other = issue(first, "cached-e"), issue(first, "cached-e")
    assert statuses(pair, token) == statuses(pair, other) == {200}
    redis.stop()
    try:
        revoked = first.cli("tokens", "revoke", jwt.decode(token, options={"verify_signature": False})["jti"])
        assert "did not answer" in revoked.stderr  # stored; the CLI says the mirror missed it
        assert statuses(pair, token) == {401} and statuses(pair, other) == {200}
    finally:
        redis.start()  # an empty Redis: the epoch's mirror is gone, the workers take the database's
    assert statuses(pair, token) == {401} and statuses(pair, other) == {200}
    first.cli("tokens", "revoke-all", "cached-e")
    assert statuses(pair, other) == {401}
    assert requests.get(first.url("/readyz"), timeout=10).status_code == 200
