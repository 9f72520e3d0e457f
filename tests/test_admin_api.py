"""The admin HTTP API over real gunicorn: users, tokens, audit; /v1/me."""

import pytest


@pytest.fixture(scope="module")
def admin(server):
    return server


def test_users_create_list_patch(admin):
    created = admin.post("/admin/users", {"name": "api-team", "rate_limit": "10/minute", "daily_tokens": 5000})
    assert created.status_code == 201, created.text
    assert created.json()["name"] == "api-team" and created.json()["daily_tokens"] == 5000
    duplicate = admin.post("/admin/users", {"name": "api-team"})
    assert duplicate.status_code == 409 and duplicate.json()["error"]["code"] == "user_exists"
    names = [u["name"] for u in admin.get("/admin/users").json()["data"]]
    assert "api-team" in names and "root" in names
    patched = admin.request("PATCH", "/admin/users/api-team", {"max_concurrent": 2, "daily_tokens": None})
    assert patched.status_code == 200
    assert (patched.json()["max_concurrent"], patched.json()["daily_tokens"]) == (2, None)


@pytest.mark.parametrize("method,path,body,status,code,param", [
    ("POST", "/admin/users", {"name": "Bad Name"}, 400, "invalid_name", "name"),
    ("POST", "/admin/users", {"name": "x", "rate_limit": "lots"}, 400, "invalid_rate_limit", "rate_limit"),
    ("POST", "/admin/users", {"name": "x", "daily_tokens": 0}, 400, "out_of_range", "daily_tokens"),
    ("POST", "/admin/users", {"nam": "x"}, 400, "unknown_field", "nam"),
    ("POST", "/admin/users", {"name": "x", "system_prompts": "one"}, 400, "invalid_type", "system_prompts"),
    ("PATCH", "/admin/users/nobody", {"active": False}, 404, "unknown_user", "name"),
    ("PATCH", "/admin/users/root", {}, 400, "empty", None),
    ("PATCH", "/admin/users/root", {"active": "no"}, 400, "invalid_type", "active"),
    ("POST", "/admin/tokens", {"user": "nobody"}, 404, "unknown_user", "name"),
    ("POST", "/admin/tokens", {"user": "root", "ttl": "forever"}, 400, "invalid_duration", "ttl"),
    ("POST", "/admin/tokens", {"user": "root", "ttl": "9999d"}, 400, "ttl_too_long", "ttl"),
    ("POST", "/admin/tokens", {"user": "root", "scope": "everything"}, 400, "invalid_scope", "scope"),
    ("DELETE", "/admin/tokens/not-a-jti", None, 404, "unknown_token", "jti"),
    ("GET", "/admin/audit?since=yesterday", None, 400, "invalid_value", "since"),
    ("GET", "/admin/audit?limit=0", None, 400, "out_of_range", "limit"),
])
def test_admin_errors(admin, method, path, body, status, code, param):
    response = admin.request(method, path, body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code and response.json()["error"]["param"] == param


def test_tokens_issue_list_revoke_and_audit(admin):
    admin.post("/admin/users", {"name": "api-tokens"})
    issued = admin.post("/admin/tokens", {"user": "api-tokens", "ttl": "2h", "label": "ci"})
    assert issued.status_code == 201
    token, jti = issued.json()["token"], issued.json()["jti"]
    me = admin.get("/v1/me", token=token).json()
    assert me["user"] == "api-tokens" and me["token"]["scope"] == ["generate"] and me["token"]["label"] == "ci"
    listed = admin.get("/admin/tokens?user=api-tokens").json()["data"]
    assert [t["jti"] for t in listed] == [jti] and "token" not in listed[0]
    assert admin.request("DELETE", f"/admin/tokens/{jti}").json()["revoked_by"] == "root"
    assert admin.get("/v1/me", token=token).status_code == 401
    assert admin.get("/admin/tokens?user=api-tokens").json()["data"] == []
    assert admin.get("/admin/tokens?user=api-tokens&all=true").json()["data"][0]["revoked_at"]
    events = admin.get("/admin/audit?target=api-tokens").json()["data"]
    assert [e["action"] for e in events] == ["token.revoke", "token.issue", "user.add"]
    assert {e["actor"] for e in events} == {"root"} and {e["source"] for e in events} == {"127.0.0.1"}


def test_me_shows_limits_and_expiry(admin):
    admin.cli("users", "add", "me-team", "--rate-limit", "60/minute;2000/day", "--max-concurrent", "3")
    token = admin.cli("tokens", "issue", "me-team", "--ttl", "1d").stdout.strip().splitlines()[-1]
    me = admin.get("/v1/me", token=token).json()
    assert me["limits"] == {"rate_limit": "60/minute;2000/day", "daily_tokens": None, "max_concurrent": 3,
                            "system_prompts": None, "models": None}
    assert me["admin"] is False and me["token"]["expires_at"] > me["token"]["issued_at"]


def test_admin_scope_token_cannot_generate(admin):
    admin.cli("users", "add", "only-admin", "--admin")
    token = admin.cli("tokens", "issue", "only-admin", "--scope", "admin").stdout.strip().splitlines()[-1]
    assert admin.get("/admin/users", token=token).status_code == 200
    refused = admin.post("/predict", {"question": "hi"}, token=token)
    assert refused.status_code == 403 and refused.json()["success"] is False
