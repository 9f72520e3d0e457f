"""Every request is authenticated here, in one before_request hook.

flask-jwt-extended decodes the bearer token from the Authorization header only
(no query strings, no cookies) with the algorithm pinned to EdDSA, the key
picked by `kid`, and `iss`/`aud`/`exp`/`nbf` checked. Then this hook checks
what the library does not: every required claim is present, the jti was
recorded at issue and is not revoked (a rotated token: not past its grace), the user exists and is active, and the
token's scope allows the route and the user still holds the rights it names.

With a `cache` (auth.cache), a token this worker verified before skips the
decode and the query while the access epoch is unchanged; every change that
could refuse it replaces the epoch, so revocation still holds from the very
next request in every worker. The route's scope and the user's rights are
checked on every request, cached or not.
"""

from flask import g, request
from flask_jwt_extended import JWTManager, decode_token, get_jwt, verify_jwt_in_request
from flask_jwt_extended.exceptions import NoAuthorizationError

from auth.errors import AuthError
from auth.keys import ALGORITHM
from auth.tokens import TOKEN_TYPE

REQUIRED_CLAIMS = ("iss", "aud", "exp", "iat", "nbf", "jti", "sub", "scope", "typ")
QUERY_TOKEN_NAMES = ("token", "access_token", "jwt", "api_key", "apikey")


def init_app(app, *, store, keyset, issuer, audience, needs_token, scope_for, respond, cache=None, fold=None):
    """Require a valid token on every request for which `needs_token()` is true.

    `scope_for(path)` names the scope a route needs (None: any valid token); `respond(status, message, code)`
    builds the app's error response (the auth layer knows nothing of its shape). With a `cache`, `fold(token)`
    may read the access epoch for a cached token record in a trip the request makes anyway (its rate limit).
    """
    app.config.update(JWT_ALGORITHM=ALGORITHM, JWT_DECODE_ALGORITHMS=[ALGORITHM], JWT_TOKEN_LOCATION=["headers"],
                      JWT_DECODE_ISSUER=issuer, JWT_DECODE_AUDIENCE=audience, JWT_DECODE_LEEWAY=0,
                      JWT_IDENTITY_CLAIM="sub", JWT_ERROR_MESSAGE_KEY="message")
    jwt = JWTManager(app)

    @jwt.decode_key_loader
    def _key(header, _claims):
        key = keyset.public_key(header.get("kid", ""))
        if key is None:  # unknown or retired kid: refuse before any signature check
            raise AuthError(401, "token was signed by an unknown or retired key", "invalid_token")
        return key

    unauthorized = lambda code, message: respond(401, message, code)  # noqa: E731
    jwt.unauthorized_loader(lambda reason: unauthorized("missing_token", f"no bearer token: {reason}"))
    jwt.invalid_token_loader(lambda reason: unauthorized("invalid_token", f"invalid token: {reason}"))
    jwt.expired_token_loader(lambda _h, _c: unauthorized("token_expired", "token has expired"))
    app.register_error_handler(AuthError, lambda exc: respond(exc.status, exc.message, exc.code))

    @app.before_request
    def _authenticate():
        if not needs_token():
            return None  # public views, and unknown routes (the 404 handler)
        if any(name in request.args for name in QUERY_TOKEN_NAMES):
            raise AuthError(401, "tokens in the query string are refused; use the Authorization header",
                            "token_in_query")
        scope = scope_for(request.path)
        g.auth = check_access(_token(store, keyset, cache, fold, scope), scope)
        return None


def _token(store, keyset, cache, fold=None, scope=None):
    """The bearer token's record: from this worker's cache, or decoded and checked against the store. The
    epoch is read by `fold` for a held token that this route would take as it stands (a refusal folds
    nothing in)."""
    header = request.headers.get("Authorization", "")
    held = cache.get(header) if cache is not None and header and fold is not None else None
    if held is not None and not _passes(held[1], scope):
        held = None
    epoch = cache.begin(held and (lambda: fold(held[1]))) if cache is not None and header else None
    hit = cache.get(header, epoch) if epoch is not None else None
    # A key deleted from the folder by hand (not by `keys retire`) moves no epoch: ask the folder too.
    if hit is not None and keyset.holds(hit[1]["kid"]):
        return hit[1]
    claims = _claims()
    token = check_token(store, claims)
    if epoch is not None:
        cache.put(header, claims, token, epoch)
    return token


def _claims():
    """The bearer token's verified claims (flask-jwt-extended's checks, errors and loaders)."""
    if request.method != "OPTIONS":
        verify_jwt_in_request()
        return get_jwt()
    # verify_jwt_in_request lets every OPTIONS request through untouched: decode this one by hand.
    scheme, _, text = request.headers.get("Authorization", "").partition(" ")
    if scheme != "Bearer" or not text:
        raise NoAuthorizationError("Missing 'Bearer' type in 'Authorization' header")
    return decode_token(text)


def check_token(store, claims):
    """A decoded token's record, if it was issued here and is not revoked; AuthError otherwise."""
    missing = [name for name in REQUIRED_CLAIMS if claims.get(name) in (None, "")]
    if missing:
        raise AuthError(401, f"invalid token: missing claim {missing[0]}", "invalid_token")
    if claims["typ"] != TOKEN_TYPE:
        raise AuthError(401, f"invalid token: typ must be {TOKEN_TYPE}", "invalid_token")
    token = store.get_token(str(claims["jti"]))
    if token is None or token["user"] != claims["sub"]:
        raise AuthError(401, "token was not issued by this service", "invalid_token")
    if token["revoked_at"] is not None and token["revoked_at"] <= store.clock():  # later: a rotation's grace
        raise AuthError(401, "token was rotated and its grace period has ended: use its successor"
                        if token["replaced_by"] else "token has been revoked", "token_revoked")
    return token


def _passes(token, needed_scope):
    try:
        check_access(token, needed_scope)
    except AuthError:
        return False
    return True


def check_access(token, needed_scope):
    """The token, if its user is active and it may use a route needing `needed_scope`; AuthError otherwise."""
    if not token["user_active"]:
        raise AuthError(403, f"account {token['user']!r} is disabled", "account_disabled")
    if needed_scope is not None and needed_scope not in token["scope"].split():
        raise AuthError(403, f"token lacks the {needed_scope!r} scope this route needs", "insufficient_scope")
    if needed_scope == "admin" and not token["user_admin"]:  # a scope follows the user's current rights
        raise AuthError(403, f"user {token['user']!r} is no longer an admin; admin tokens stop working",
                        "insufficient_scope")
    return token
