"""vibethinker-admin as an admin runs it: outputs, --json, and one-line errors."""

import json

import pytest

from tests.support.servers import admin_cli, state_env

pytestmark = pytest.mark.slow  # real restarts, many CLI calls or long runs: not in make test-quick


@pytest.fixture
def env(tmp_path):
    env = state_env(tmp_path)
    admin_cli(env, "keys", "generate")
    return env


def test_tokens_issue_prints_the_token_alone_on_the_last_line(env):
    admin_cli(env, "users", "add", "alice")
    lines = admin_cli(env, "tokens", "issue", "alice", "--ttl", "12h", "--label", "nb").stdout.splitlines()
    assert len(lines[-1].split(".")) == 3 and " " not in lines[-1]
    meta_line, token = admin_cli(env, "--json", "tokens", "issue", "alice").stdout.splitlines()
    meta = json.loads(meta_line)
    assert meta["user"] == "alice" and meta["scope"] == "generate" and "token" not in meta
    assert len(token.split(".")) == 3


def test_json_listings(env):
    admin_cli(env, "users", "add", "bob", "--rate-limit", "5/minute", "--daily-tokens", "100")
    admin_cli(env, "users", "set", "bob", "--max-concurrent", "2", "--daily-tokens", "none")
    [bob] = json.loads(admin_cli(env, "--json", "users", "list").stdout)
    assert (bob["rate_limit"], bob["daily_tokens"], bob["max_concurrent"]) == ("5/minute", None, 2)
    admin_cli(env, "tokens", "issue", "bob")
    [token] = json.loads(admin_cli(env, "--json", "tokens", "list").stdout)
    assert token["user"] == "bob" and "token" not in token
    actions = [e["action"] for e in json.loads(admin_cli(env, "--json", "audit").stdout)]
    assert actions == ["token.issue", "user.update", "user.add", "key.generate"]


def test_tokens_rotate_prints_the_successor_last_and_lists_both(env):
    admin_cli(env, "users", "add", "erin")
    old = json.loads(admin_cli(env, "--json", "tokens", "issue", "erin", "--label", "ci").stdout.splitlines()[0])
    lines = admin_cli(env, "tokens", "rotate", old["jti"], "--grace", "24h").stdout.splitlines()
    assert len(lines[-1].split(".")) == 3 and "works until" in lines[0] and old["jti"] in lines[0]
    listed = {t["jti"]: t for t in json.loads(admin_cli(env, "--json", "tokens", "list").stdout)}
    [new] = set(listed) - {old["jti"]}
    assert (listed[old["jti"]]["status"], listed[old["jti"]]["replaced_by"]) == ("grace", new)
    assert (listed[new]["replaces"], listed[new]["label"]) == (old["jti"], "ci")
    again = admin_cli(env, "tokens", "rotate", old["jti"], "--grace", "1h", check=False)
    assert again.returncode == 1 and "rotated already" in again.stderr and again.stderr.count("\n") == 1


@pytest.mark.parametrize("args,fragment", [
    (["users", "add", "carol", "--rate-limit", "often"], "rate_limit 'often'"),
    (["users", "disable", "nobody"], "no such user: 'nobody'"),
    (["tokens", "issue", "nobody"], "no such user: 'nobody'"),
    (["tokens", "issue", "dave", "--ttl", "3 days"], "bad duration '3 days'"),
    (["tokens", "issue", "dave", "--ttl", "0d"], "bad duration '0d'"),
    (["tokens", "issue", "dave", "--scope", "admin"], "not an admin"),
    (["tokens", "revoke", "no-such-jti"], "no such token"),
    (["users", "add", "dave"], "already exists"),
    (["users", "set", "dave"], "nothing to change"),
    (["keys", "generate"], "already holds keys"),
    (["keys", "retire", "nope"], "no key with kid 'nope'"),
])
def test_errors_are_one_line_and_non_zero(env, args, fragment):
    admin_cli(env, "users", "add", "dave")
    proc = admin_cli(env, *args, check=False)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and fragment in proc.stderr and "Traceback" not in proc.stderr


def test_the_only_key_cannot_be_retired_and_keys_are_private(env):
    from pathlib import Path

    [kid] = admin_cli(env, "keys", "list").stdout.split()[:1]
    assert "only key" in admin_cli(env, "keys", "retire", kid, check=False).stderr
    key_dir = Path(env["VIBE_JWT_KEY_DIR"])
    assert oct(key_dir.stat().st_mode & 0o777) == "0o700"
    assert {oct(p.stat().st_mode & 0o777) for p in key_dir.iterdir()} == {"0o600"}


def test_bad_settings_are_one_line(env):
    proc = admin_cli({**env, "VIBE_DB_URL": ""}, "users", "list", check=False)
    assert proc.returncode == 1 and "VIBE_DB_URL" in proc.stderr and proc.stderr.count("\n") == 1


@pytest.mark.parametrize("args,status,fragment", [
    (["users", "add"], 2, "the following arguments are required: name"),
    (["tokens", "issue", "x", "--bogus"], 2, "unrecognized arguments: --bogus"),
    (["nothing"], 2, "invalid choice: 'nothing'"),
])
def test_usage_errors_are_one_line(env, args, status, fragment):
    proc = admin_cli(env, *args, check=False)
    assert proc.returncode == status and proc.stderr.count("\n") == 1 and fragment in proc.stderr
    assert proc.stderr.startswith("vibethinker-admin") and "--help" in proc.stderr


@pytest.mark.parametrize("setting,fragment", [
    ({"VIBE_DB_URL": "postgresql+psycopg://nobody@127.0.0.1:9/none"}, "database error (OperationalError)"),
    ({"VIBE_DB_URL": "sqlite:////proc/vibethinker/db.sqlite"}, "/proc/vibethinker"),
    ({"VIBE_JWT_KEY_DIR": "/proc/vibethinker-keys"}, "/proc/vibethinker-keys"),
])
def test_database_and_os_errors_are_one_line(env, setting, fragment):
    args = ("keys", "rotate") if "VIBE_JWT_KEY_DIR" in setting else ("users", "list")
    proc = admin_cli({**env, **setting}, *args, check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert fragment in proc.stderr and "Traceback" not in proc.stderr
