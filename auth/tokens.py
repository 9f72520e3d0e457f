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
MAX_GRACE = timedelta(days=30)  # a rotated token never outlives its rotation by more, whatever the settings


def parse_duration(text, param="ttl"):
    """'30d', '12h', '90m', '3600s', '2w' -> timedelta; StoreError 400 (naming `param`) otherwise."""
    match = re.fullmatch(r"(\d{1,7})([smhdw])", text.strip()) if isinstance(text, str) else None
    if not match or int(match.group(1)) == 0:
        raise StoreError(400, f"bad duration {text!r}: use a positive number and a unit s, m, h, d or w "
                         "(e.g. 30d)", "invalid_duration", param)
    return timedelta(seconds=int(match.group(1)) * UNITS[match.group(2)])


def parse_grace(text):
    """A rotation's grace: '24h' -> timedelta, '0' (with a unit or not) -> none; StoreError 400 past MAX_GRACE."""
    if isinstance(text, str) and re.fullmatch(r"0+[smhdw]?", text.strip()):
        return timedelta(0)
    try:
        grace = parse_duration(text, "grace")
    except StoreError:
        raise StoreError(400, f"bad grace {text!r}: use 0 (none) or a number and a unit s, m, h, d or w (e.g. "
                         "24h)", "invalid_duration", "grace") from None
    if grace > MAX_GRACE:
        raise StoreError(400, f"grace {text} is longer than the maximum {MAX_GRACE.days}d", "grace_too_long", "grace")
    return grace


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
    _check_holder(store, user_name, scope)
    check_text("label", label, limit=200)
    now = (now or store.clock()).replace(microsecond=0)
    text, meta = _sign(keyset, user_name, scope, label, now, now + lifetime, issuer, audience)
    store.record_token(meta["jti"], user_name, scope, label, meta["kid"], now, meta["expires_at"], actor=actor,
                       source=source)
    return text, _shown(meta, user_name)


def rotate_token(store, keyset, jti, *, grace, max_ttl="365d", issuer, audience, actor="system", source="cli"):
    """Issue a successor to token `jti` (its user, scope and label; its original lifetime, at most `max_ttl`)
    and end `jti` when the grace ends: at once for 0, and never after `jti`'s own expiry.
    (the successor's text, its metadata with `replaces` and `grace_ends_at`)."""
    grace = parse_grace(grace)
    old = store.rotatable(jti)
    _check_holder(store, old["user"], old["scope"])
    now = store.clock().replace(microsecond=0)
    lifetime = min(old["expires_at"] - old["issued_at"], parse_duration(max_ttl))
    ends = min(now + grace, old["expires_at"])
    text, meta = _sign(keyset, old["user"], old["scope"], old["label"], now, now + lifetime, issuer, audience)
    store.rotate_token(jti, meta, ends, actor=actor, source=source)
    return text, {**_shown(meta, old["user"]), "replaces": jti, "grace_ends_at": ends.isoformat()}


def _check_holder(store, user_name, scope):
    """StoreError 400 unless `user_name` may hold a new token of `scope` now."""
    user = store.get_user(user_name)
    if not user["active"]:
        raise StoreError(400, f"user {user_name!r} is disabled; enable it first", "user_disabled", "user")
    if "admin" in scope.split() and not user["admin"]:
        raise StoreError(400, f"user {user_name!r} is not an admin; it cannot hold an admin token",
                         "not_admin", "scope")


def _sign(keyset, user_name, scope, label, now, expires, issuer, audience):
    """A new token's text and its row's metadata (jti, scope, label, kid, issued_at, expires_at)."""
    jti = str(uuid.uuid4())
    kid, private_key = keyset.signing_key()
    claims = {"iss": issuer, "aud": audience, "sub": user_name, "jti": jti, "scope": scope, "typ": TOKEN_TYPE,
              "iat": now, "nbf": now, "exp": expires}
    text = jwt.encode(claims, private_key, algorithm=ALGORITHM, headers={"kid": kid})
    return text, {"jti": jti, "scope": scope, "label": label, "kid": kid, "issued_at": now, "expires_at": expires}


def _shown(meta, user_name):
    """A new token's metadata as commands and routes show it (times in ISO 8601)."""
    return {"jti": meta["jti"], "user": user_name, "scope": meta["scope"], "label": meta["label"],
            "kid": meta["kid"], "issued_at": meta["issued_at"].isoformat(),
            "expires_at": meta["expires_at"].isoformat()}
