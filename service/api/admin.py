"""The admin HTTP API (scope `admin`): users, teams, tokens, the audit trail and transcripts.

Routes are thin: parse, call auth.store / auth.tokens, return. Every change is
audited with the calling admin as actor and the client address as source.
"""

from datetime import datetime

from flask import Blueprint, request

from auth.store import QUOTA_FIELDS, TEAM_COLUMNS, TEAM_FIELDS
from auth.tokens import issue_token, rotate_token as issue_successor
from service.api.access import caller
from service.api.body import read
from service.batches.quotas import release_user
from service.errors import BadRequest, Conflict, NotFound, Unavailable
from service.inputs.schemas import (AdminTeamCreate, AdminTeamMembers, AdminTeamPatch, AdminTokenRequest,
                                   AdminTokenRotate, AdminUserCreate, AdminUserPatch, CachePurge, query_int)
from service.serving import cache
from service.state import state

bp = Blueprint("admin", __name__, url_prefix="/admin")


def _store():
    return state().store


def _who():
    return {"actor": caller()["user"], "source": request.remote_addr or "-"}


def _body(model):
    return read(model)


@bp.post("/users")
def add_user():
    body = _body(AdminUserCreate)
    user = _store().add_user(body.name, body.admin, **{name: getattr(body, name) for name in QUOTA_FIELDS},
                             **_who())
    return user, 201


@bp.get("/users")
def list_users():
    return {"object": "list", "data": _store().list_users()}


@bp.patch("/users/<name>")
def update_user(name):
    changes = _body(AdminUserPatch).model_dump(exclude_unset=True)
    if "admin" in changes:
        changes["is_admin"] = changes.pop("admin")
    if not changes:
        raise BadRequest("nothing to change: give active, admin, transcripts or a quota field", "empty", None)
    return _store().update_user(name, **changes, **_who())


@bp.delete("/users/<name>")
def remove_user(name):
    """Delete a user, their tokens, console sessions and transcripts (409 while they store files or have
    batches open); usage rows and the audit trail stay."""
    if name == caller()["user"]:
        raise Conflict("an admin cannot remove themselves: ask another admin", "cannot_remove_self", "name")
    gone = _store().remove_user(name, release=release_user, **_who())
    return {"name": name, "removed": True, "batches": 0, **gone}


@bp.get("/transcripts")
def list_transcripts():
    """Transcripts' metadata, newest first (?user=NAME&team=NAME&since=DATE&limit=N); their content is not shown
    here."""
    args = request.args
    limit = query_int(args.get("limit", "100"), "limit", 1, 1000)
    rows = state().transcripts.list(args.get("user"), _date(args.get("since")), limit=limit, team=args.get("team"))
    return {"object": "list", "data": rows}


@bp.get("/transcripts/<transcript_id>")
def read_transcript(transcript_id):
    """One transcript, decrypted; audited (transcript.read)."""
    return state().transcripts.read(transcript_id, **_who())


@bp.post("/teams")
def add_team():
    body = _body(AdminTeamCreate)
    team = _store().add_team(body.name, body.members, transcripts=body.transcripts,
                             **{name: getattr(body, name) for name in TEAM_FIELDS}, **_who())
    return team, 201


@bp.get("/teams")
def list_teams():
    return {"object": "list", "data": _store().list_teams()}


@bp.get("/teams/<name>")
def get_team(name):
    return _store().get_team(name)


@bp.patch("/teams/<name>")
def update_team(name):
    changes = _body(AdminTeamPatch).model_dump(exclude_unset=True)
    if not changes:
        raise BadRequest("nothing to change: give rate_limit, daily_tokens, max_concurrent or transcripts", "empty",
                         None)
    return _store().update_team(name, **changes, **_who())


@bp.post("/teams/<name>/members")
def team_members(name):
    body = _body(AdminTeamMembers)
    if not body.add and not body.remove:
        raise BadRequest("nothing to change: give add or remove (lists of user names)", "empty", None)
    return _store().set_members(name, add=body.add, remove=body.remove, **_who())


@bp.delete("/teams/<name>")
def remove_team(name):
    return _store().remove_team(name, **_who())


@bp.post("/tokens")
def add_token():
    body = _body(AdminTokenRequest)
    settings = state().settings
    text, meta = issue_token(_store(), state().keys, body.user, scope=body.scope,
                             ttl=body.ttl or settings.token_ttl, max_ttl=settings.token_max_ttl, label=body.label,
                             issuer=settings.jwt_issuer, audience=settings.jwt_audience, **_who())
    return {**meta, "token": text}, 201


@bp.get("/tokens")
def list_tokens():
    every = request.args.get("all", "false")
    if every not in ("true", "false"):
        raise BadRequest(f"all must be true or false, not {every[:40]!r}", "invalid_value", "all")
    tokens = _store().list_tokens(request.args.get("user"), include_inactive=every == "true")
    return {"object": "list", "data": [_public(t) for t in tokens]}


@bp.delete("/tokens/<jti>")
def revoke_token(jti):
    return _public(_store().revoke_token(jti, **_who()))


@bp.post("/tokens/<jti>/rotate")
def rotate_token(jti):
    """A successor to token `jti` (its text shown once); `jti` keeps working until the grace ends."""
    body = _body(AdminTokenRotate)
    settings = state().settings
    text, meta = issue_successor(_store(), state().keys, jti, grace=body.grace, max_ttl=settings.token_max_ttl,
                                 issuer=settings.jwt_issuer, audience=settings.jwt_audience, **_who())
    return {**meta, "token": text}, 201


@bp.get("/usage")
def usage_by_day():
    """Daily totals per user, or per team with by=team (?user=NAME&team=NAME&since=YYYY-MM-DD&by=user|team)."""
    args = request.args
    by = args.get("by", "user")
    if by not in ("user", "team"):
        raise BadRequest(f"by must be user or team, not {by[:40]!r}", "invalid_value", "by")
    rows = _store().usage_by_day(args.get("user"), _date(args.get("since")), team=args.get("team"), by=by)
    return {"object": "list", "data": rows}


@bp.post("/cache/purge")
def purge_cache():
    """Drop cached answers: all, or one user's ({"user"}), or one model's ({"model"}); audited."""
    body = _body(CachePurge)
    app = state()
    if body.user is not None:
        _store().get_user(body.user)  # an unknown user is a 404, not "0 purged"
    model = None
    if body.model is not None:
        served = app.models.get(body.model)
        if served is None:
            raise NotFound(f"model {body.model[:128]!r} is not served here", "model_not_found", "model")
        model = served.name
    if app.cache is None:
        return {"purged": 0, "cache": "off"}
    try:
        count = cache.purge(app.cache, _store(), body.user, model, **_who())
    except cache.CacheUnavailable as exc:
        raise Unavailable(str(exc), "cache_unavailable", retry_after=5) from None
    return {"purged": count, "cache": app.settings.cache}


@bp.get("/audit")
def list_audit():
    args = request.args
    since = _date(args.get("since"))
    limit = query_int(args.get("limit", "100"), "limit", 1, 1000)
    return {"object": "list", "data": _store().list_audit(actor=args.get("actor"), action=args.get("action"),
                                                          target=args.get("target"), since=since, limit=limit)}


def _public(token):
    """Token metadata as JSON: never the token text, which is not stored anyway."""
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in token.items()
            if k not in ("user_active", "user_admin", "transcripts", *QUOTA_FIELDS,
                         *(column.name for column in TEAM_COLUMNS))}


def _date(text):
    if text is None:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise BadRequest(f"since must be a date or time in ISO 8601 (YYYY-MM-DD), not {text!r}",
                         "invalid_value", "since") from None
