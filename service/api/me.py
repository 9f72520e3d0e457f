"""GET /v1/me: who the token belongs to, its scope and expiry, the user's limits and today's use, their team's
(the limits its members share and their use today), and what they store (files, bytes, open batches, batches
created today) against their storage quotas."""

from datetime import datetime, timezone

from flask import Blueprint

from auth.store import STORAGE_QUOTAS
from auth.transcripts import transcripts_on
from service.api.access import caller
from service.batches import quotas
from service.state import state

bp = Blueprint("me", __name__)


@bp.get("/v1/me")
def me():
    token = caller()
    user = state().store.get_user(token["user"])
    return {"user": user["name"], "admin": user["admin"], "active": user["active"],
            "transcripts": transcripts_on(token),  # whether this user's generations are kept
            "token": {"jti": token["jti"], "scope": token["scope"].split(), "label": token["label"],
                      "issued_at": token["issued_at"].isoformat(), "expires_at": token["expires_at"].isoformat()},
            **standing(user)}


def standing(user):
    """A user's limits (as set, and as they apply), what they store, and today's use: /v1/me's and the
    console's."""
    store, settings = state().store, state().settings
    midnight = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    today = (store.usage_by_day(user["name"], since=midnight) or [None])[0]
    return {"limits": {"rate_limit": user["rate_limit"], "daily_tokens": user["daily_tokens"],
                       "max_concurrent": user["max_concurrent"], "system_prompts": user["system_prompts"],
                       "models": user["models"]},
            "effective_limits": {"rate_limit": user["rate_limit"] or settings.default_rate_limit,
                                 "daily_tokens": user["daily_tokens"] or settings.default_daily_tokens,
                                 "max_concurrent": user["max_concurrent"] or settings.default_max_concurrent},
            "storage": {"limits": {name: user[name] for name in STORAGE_QUOTAS},
                        "effective_limits": vars(quotas.StorageQuota.of(user, settings)),
                        "used": _stored(user["name"])},
            "today": _today(today), "team": _team(user, midnight)}


def _today(row):
    return {k: (row or {}).get(k, 0) for k in ("requests", "prompt_tokens", "completion_tokens", "total_tokens")}


def _team(user, midnight):
    """The user's team: the limits its members share (null: none of that kind) and their use today."""
    if not user["team"]:
        return None
    today = (state().store.usage_by_day(team=user["team"], since=midnight, by="team") or [None])[0]
    return {"name": user["team"], "limits": {"rate_limit": user["team_rate_limit"],
                                             "daily_tokens": user["team_daily_tokens"],
                                             "max_concurrent": user["team_max_concurrent"]},
            "today": _today(today)}


def _stored(name):
    """What the user stores and opened now."""
    with state().batches.engine.connect() as conn:
        return quotas.usage(conn, name)
