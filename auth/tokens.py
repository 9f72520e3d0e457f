"""Issuing tokens: EdDSA-signed JWTs whose jti is recorded before the text is shown.

Verification lives in auth.guard (through flask-jwt-extended); issuing is a
plain function with an injectable clock, so expiry can be tested without
sleeping and the admin CLI needs no Flask app.
"""

import re
import uuid
from datetime import timedelta

import jwt

from auth.checks import check_text
from auth.errors import StoreError
from auth.keys import ALGORITHM

SCOPES = ("generate", "admin")
TOKEN_TYPE = "access"
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text):
    """'30d', '12h', '90m', '3600s', '2w' -> timedelta; StoreError 400 otherwise."""
    match = re.fullmatch(r"(\d{1,7})([smhdw])", text.strip()) if isinstance(text, str) else None
    if not match or int(match.group(1)) == 0:
        raise StoreError(400, f"bad duration {text!r}: use a positive number and a unit s, m, h, d or w "
                         "(e.g. 30d)", "invalid_duration", "ttl")
    return timedelta(seconds=int(match.group(1)) * UNITS[match.group(2)])


def parse_scope(scope):
    """'generate', 'admin', 'generate,admin' or 'generate admin' -> normalised scope string."""
    parts = [p for p in re.split(r"[,\s]+", scope or "") if p]
    unknown = [p for p in parts if p not in SCOPES]
    if not parts or unknown:
        raise StoreError(400, f"bad scope {scope!r}: choose from {', '.join(SCOPES)}", "invalid_scope", "scope")
    return " ".join(s for s in SCOPES if s in parts)


def issue_token(store, keyset, user_name, *, scope="generate", ttl="30d", max_ttl="365d", label="",
                issuer, audience, actor="system", source="cli", now=None):
    """Sign a token for a user, record its jti, and return (token text, metadata)."""
    scope = parse_scope(scope)
    lifetime = parse_duration(ttl)
    if lifetime > parse_duration(max_ttl):
        raise StoreError(400, f"ttl {ttl} is longer than the maximum {max_ttl}", "ttl_too_long", "ttl")
    user = store.get_user(user_name)
    if not user["active"]:
        raise StoreError(400, f"user {user_name!r} is disabled; enable it first", "user_disabled", "user")
    if "admin" in scope.split() and not user["admin"]:
        raise StoreError(400, f"user {user_name!r} is not an admin; it cannot hold an admin token",
                         "not_admin", "scope")
    check_text("label", label, limit=200)
    now = (now or store.clock()).replace(microsecond=0)
    expires = now + lifetime
    jti = str(uuid.uuid4())
    kid, private_key = keyset.signing_key()
    claims = {"iss": issuer, "aud": audience, "sub": user_name, "jti": jti, "scope": scope, "typ": TOKEN_TYPE,
              "iat": now, "nbf": now, "exp": expires}
    text = jwt.encode(claims, private_key, algorithm=ALGORITHM, headers={"kid": kid})
    store.record_token(jti, user_name, scope, label, kid, now, expires, actor=actor, source=source)
    return text, {"jti": jti, "user": user_name, "scope": scope, "label": label, "kid": kid,
                  "issued_at": now.isoformat(), "expires_at": expires.isoformat()}
