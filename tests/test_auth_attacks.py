"""The attack table: every forged, stale or misused token is refused, over real HTTP.

Tokens are crafted here with the server's own key where the attack needs a
valid signature. Expiry and not-before use an injected clock at issue time:
no test sleeps.
"""

import base64
import hashlib
import hmac
import json
import uuid
from datetime import datetime, timedelta, timezone

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from auth.keys import KeySet
from auth.store import Store
from auth.tokens import issue_token
from service.settings import Settings


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Forge:
    """Makes tokens against one running server's key folder and database."""

    def __init__(self, server):
        self.server = server
        self.keys = KeySet(server.env["VIBE_JWT_KEY_DIR"])
        self.store = Store(server.env["VIBE_DB_URL"], upgrade=False)
        self.settings = Settings()

    def issue(self, user, **kwargs):
        kwargs.setdefault("issuer", self.settings.jwt_issuer)
        kwargs.setdefault("audience", self.settings.jwt_audience)
        return issue_token(self.store, self.keys, user, **kwargs)[0]

    def claims(self, user="mallory", **changes):
        now = datetime.now(timezone.utc)
        claims = {"iss": self.settings.jwt_issuer, "aud": self.settings.jwt_audience, "sub": user,
                  "jti": str(uuid.uuid4()), "scope": "generate", "typ": "access",
                  "iat": now, "nbf": now, "exp": now + timedelta(hours=1)}
        claims.update(changes)
        return {k: v for k, v in claims.items() if v is not None}

    def sign(self, claims, key=None):
        kid, own = self.keys.signing_key()
        return jwt.encode(claims, key or own, algorithm="EdDSA", headers={"kid": kid})


@pytest.fixture(scope="module")
def forge(server):
    forge = Forge(server)
    for name in ("mallory", "victim", "sleeper"):
        server.cli("users", "add", name)
    return forge


def unsigned(forge):
    header = {"alg": "none", "typ": "JWT", "kid": forge.keys.signing_kid}
    claims = json.loads(json.dumps(forge.claims(), default=lambda d: int(d.timestamp())))
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}."


def hs256_with_public_key(forge):
    kid, private = forge.keys.signing_key()
    public_pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    claims = json.loads(json.dumps(forge.claims(), default=lambda d: int(d.timestamp())))
    body = b64(json.dumps(claims).encode())
    signature = hmac.new(public_pem, f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{b64(signature)}"


def tampered(forge):
    header, body, signature = forge.issue("mallory").split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims["sub"] = "victim"
    return f"{header}.{b64(json.dumps(claims).encode())}.{signature}"


def revoked(forge):
    token = forge.issue("mallory")
    forge.store.revoke_token(jwt.decode(token, options={"verify_signature": False})["jti"])
    return token


def disabled(forge):
    token = forge.issue("sleeper")
    forge.store.update_user("sleeper", active=False)
    return token


PAST = datetime.now(timezone.utc) - timedelta(days=40)
FUTURE = datetime.now(timezone.utc) + timedelta(days=1)
ATTACKS = [
    # (name, make token or None, path, extra request kwargs, status, code)
    ("no token", None, "/v1/predict", {}, 401, "missing_token"),
    ("garbage", lambda f: "not.a.jwt", "/v1/predict", {}, 401, "invalid_token"),
    ("alg none", unsigned, "/v1/predict", {}, 401, "invalid_token"),
    ("HS256 with the public key", hs256_with_public_key, "/v1/predict", {}, 401, "invalid_token"),
    ("payload tampered to another sub", tampered, "/v1/predict", {}, 401, "invalid_token"),
    ("signed by a different key", lambda f: f.sign(f.claims(), Ed25519PrivateKey.generate()), "/v1/predict",
     {}, 401, "invalid_token"),
    ("unknown kid", lambda f: jwt.encode(f.claims(), f.keys.signing_key()[1], algorithm="EdDSA",
                                         headers={"kid": "19700101T000000-000000"}), "/v1/predict", {}, 401,
     "invalid_token"),
    ("expired", lambda f: f.issue("mallory", ttl="1d", now=PAST), "/v1/predict", {}, 401, "token_expired"),
    ("nbf in the future", lambda f: f.issue("mallory", ttl="7d", now=FUTURE), "/v1/predict", {}, 401,
     "invalid_token"),
    ("wrong aud", lambda f: f.sign(f.claims(aud="someone-else")), "/v1/predict", {}, 401, "invalid_token"),
    ("wrong iss", lambda f: f.sign(f.claims(iss="evil")), "/v1/predict", {}, 401, "invalid_token"),
    ("missing jti", lambda f: f.sign(f.claims(jti=None)), "/v1/predict", {}, 401, "invalid_token"),
    ("missing exp", lambda f: f.sign(f.claims(exp=None)), "/v1/predict", {}, 401, "invalid_token"),
    ("missing scope", lambda f: f.sign(f.claims(scope=None)), "/v1/predict", {}, 401, "invalid_token"),
    ("wrong typ", lambda f: f.sign(f.claims(typ="refresh")), "/v1/predict", {}, 401, "invalid_token"),
    ("signed but jti never issued", lambda f: f.sign(f.claims()), "/v1/predict", {}, 401, "invalid_token"),
    ("revoked", revoked, "/v1/predict", {}, 401, "token_revoked"),
    ("disabled user", disabled, "/v1/predict", {}, 403, "account_disabled"),
    ("generate scope on /admin", lambda f: f.issue("mallory"), "/admin/users", {}, 403, "insufficient_scope"),
    ("generate scope on /admin/audit", lambda f: f.issue("mallory"), "/admin/audit", {}, 403, "insufficient_scope"),
]


@pytest.mark.parametrize("name,make,path,extra,status,code", ATTACKS, ids=[a[0] for a in ATTACKS])
def test_attack_is_refused(server, forge, name, make, path, extra, status, code):
    headers = {"Authorization": f"Bearer {make(forge)}"} if make else {}
    method = "GET" if path.startswith("/admin") else "POST"
    response = requests.request(method, server.url(path), json={"question": "hi", "max_new_tokens": 1},
                                headers=headers, timeout=30, **extra)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and set(error) == {"message", "type", "param", "code"}
    assert error["type"] == ("authentication_error" if status == 401 else "permission_error")
    assert response.headers["Content-Type"] == "application/json"


def test_token_in_the_query_string_is_refused(server, forge):
    token = forge.issue("mallory")
    response = requests.post(server.url(f"/v1/predict?access_token={token}"), json={"question": "hi"}, timeout=30)
    assert response.status_code == 401 and response.json()["error"]["code"] == "token_in_query"
    # even next to a good header: a token in a URL ends up in logs, so refuse it loudly
    response = requests.post(server.url(f"/v1/predict?token={token}"), json={"question": "hi"},
                             headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert response.status_code == 401


def test_a_good_token_passes(server, forge):
    token = forge.issue("mallory")
    response = requests.post(server.url("/v1/predict"), json={"question": "hi", "max_new_tokens": 2},
                             headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert response.status_code == 200, response.text


def test_health_needs_no_token(server):
    assert requests.get(server.url("/healthz"), timeout=5).status_code == 200
    assert requests.get(server.url("/readyz"), timeout=5).status_code == 200
