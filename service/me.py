"""GET /v1/me: who the token belongs to, its scope and expiry, and the user's limits."""

from flask import Blueprint, current_app

from service.access import caller

bp = Blueprint("me", __name__)


@bp.get("/v1/me")
def me():
    token = caller()
    user = current_app.extensions["vibethinker.store"].get_user(token["user"])
    return {"user": user["name"], "admin": user["admin"], "active": user["active"],
            "token": {"jti": token["jti"], "scope": token["scope"].split(), "label": token["label"],
                      "issued_at": token["issued_at"].isoformat(), "expires_at": token["expires_at"].isoformat()},
            "limits": {"rate_limit": user["rate_limit"], "daily_tokens": user["daily_tokens"],
                       "max_concurrent": user["max_concurrent"], "system_prompts": user["system_prompts"]}}
