"""Sign-in through the organisation's OpenID Connect provider (authlib's Flask client).

The authorization code flow with PKCE (S256), state and nonce, all kept in the sign-in session
(service.console.sessions). The ID token's signature, issuer, audience (this client), nonce and times are
checked; authlib checks the audience only when told to, so it is told. A configured claim (email by
default, and then only a verified one) names the admin through `console_oidc_admins`: signing in creates no
user, and a name that is not an active admin is refused.
"""

import requests
from authlib.integrations.base_client import OAuthError
from authlib.integrations.flask_client import OAuth
from joserfc.errors import ClaimError, JoseError

from auth.errors import StoreError

CALLBACK = "/admin/console/login/oidc/callback"
LEEWAY_S = 30


class Refused(Exception):
    """A refused sign-in: `message` for the page, `reason` for the audit trail, `who` when a claim named one."""

    def __init__(self, message, reason, who=None):
        super().__init__(message)
        self.message, self.reason, self.who = message, reason, who


class Oidc:
    Refused = Refused

    def __init__(self, app, settings, base_url):
        self.issuer = settings.console_oidc_issuer.rstrip("/")
        self.claim, self.admins = settings.console_oidc_claim, dict(settings.console_oidc_admins)
        if self.claim == "email":  # an address's case is not the person's: compared without it
            self.admins = {address.casefold(): name for address, name in self.admins.items()}
        self.redirect_uri = base_url + CALLBACK
        self.oauth = OAuth(app)
        self.client = self.oauth.register(
            "organisation", client_id=settings.console_oidc_client_id,
            client_secret=settings.console_oidc_client_secret,
            server_metadata_url=self.issuer + "/.well-known/openid-configuration",
            client_kwargs={"scope": f"openid {'email' if self.claim.startswith('email') else 'profile'}",
                           "code_challenge_method": "S256", "default_timeout": 10})

    def start(self):
        """The redirect to the provider (a new state, nonce and PKCE verifier in the sign-in session)."""
        try:
            return self.client.authorize_redirect(self.redirect_uri)
        except (requests.RequestException, ValueError, KeyError, RuntimeError) as exc:  # no or bad metadata
            raise Refused("the organisation's sign-in provider does not answer; try again later",
                          f"provider unreachable: {type(exc).__name__}") from None

    def finish(self, access):
        """The admin the provider's answer names (an active admin user); Refused otherwise."""
        client = self.client
        try:
            issuer = client.load_server_metadata()["issuer"]
            if issuer.rstrip("/") != self.issuer:
                raise Refused("the provider's metadata names another issuer", "issuer mismatch")
            # a new dict each time (authlib pops from it); given, it replaces authlib's default, so iss too
            options = {"iss": {"essential": True, "value": issuer},
                       "aud": {"essential": True, "value": client.client_id}, "sub": {"essential": True}}
            token = client.authorize_access_token(claims_options=options, leeway=LEEWAY_S)
        except (OAuthError, JoseError, requests.RequestException, KeyError, ValueError, RuntimeError,
                TypeError) as exc:
            raise Refused("the sign-in was refused: the provider's answer did not check out (start again)",
                          _reason(exc)) from None
        claims = token.get("userinfo")
        if not claims:  # no ID token, or no nonce in the state: nothing was checked
            raise Refused("the sign-in was refused: the provider sent no ID token", "no id_token")
        value = claims.get(self.claim)
        if not isinstance(value, str) or not value:
            raise Refused(f"the provider's answer has no {self.claim} claim", f"no {self.claim} claim")
        if self.claim == "email" and claims.get("email_verified") is not True:
            raise Refused("the provider has not verified this e-mail address", "email not verified", value[:200])
        name = self.admins.get(value.casefold() if self.claim == "email" else value)
        user = None
        if name is not None:
            try:
                user = access.active_admin(access.store.get_user(name)["id"])
            except StoreError:  # mapped to a user who is no more: refused below, as unmapped
                user = None
        if user is None:
            raise Refused(f"{value[:200]} is not an admin of this service", "not an admin", value[:200])
        return user


# OAuth 2.0's error codes (RFC 6749 4.1.2.1, 5.2): the only text from a callback's query or a provider's answer
# that reaches the audit trail; anything else is "other".
OAUTH_ERRORS = {"invalid_request", "unauthorized_client", "access_denied", "unsupported_response_type",
                "invalid_scope", "server_error", "temporarily_unavailable", "invalid_client", "invalid_grant",
                "unsupported_grant_type", "mismatching_state", "interaction_required", "login_required",
                "consent_required"}


def _reason(exc):
    """Why a sign-in was refused, for the audit trail: the exception's kind, and the claim a check refused or
    the error code when it is a known one; never text from the request or the token."""
    if isinstance(exc, ClaimError):  # which claim failed, as named in our own checks
        return f"{type(exc).__name__}: {exc.claim}"
    code = getattr(exc, "error", None)
    return f"{type(exc).__name__}: {code if code in OAUTH_ERRORS else 'other'}"
