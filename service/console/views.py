"""The admins' console at /admin/console/: server-rendered pages over the admin API's own functions.

Routes are thin: a form becomes the admin API's request model (service.inputs.schemas), then auth.store,
auth.tokens or the batch records do the work, audited under the signed-in admin's name. Every page needs a
signed-in admin (service.console.sessions); every form a CSRF token (service.console.csrf).
"""

import hashlib
import json
import re
from datetime import datetime, timezone

from flask import Blueprint, Response, flash, g, redirect, render_template, request, session, url_for

from auth.checks import QUOTA_MAX, check_name
from auth.console import link_refused
from auth.errors import StoreError
from auth.store import LIST_FIELDS, QUOTA_FIELDS, TEAM_FIELDS
from auth.tokens import issue_token, rotate_token
from service import errors
from service.api import health, models as model_cards
from service.api.access import is_console
from service.api.me import standing
from service.batches.quotas import release_user
from service.console import figures
from service.console.charts import bar_chart, line_chart
from service.console.csrf import CsrfRefused, check_csrf, csrf_token
from service.console.parts import parts
from service.errors import BadRequest, Conflict, NotFound
from service.inputs.schemas import (AdminTeamCreate, AdminTeamMembers, AdminTeamPatch, AdminTokenRequest,
                                   AdminTokenRotate, AdminUserCreate, AdminUserPatch, check_unicode, parse, query_int)
from service.state import state

bp = Blueprint("console", __name__, url_prefix="/admin/console", template_folder="templates",
               static_folder="static", static_url_path="/static")
PUBLIC = {"console.static", "console.login", "console.link_confirm", "console.link_use", "console.oidc_start",
          "console.oidc_callback"}
INT_QUOTAS = tuple(QUOTA_MAX)  # the integer quotas
PROMPT_SEPARATOR = "---"  # a line of its own between system prompts (a prompt may span lines)
AUDIT_ACTIONS = ("user.add", "user.update", "user.enable", "user.disable", "user.remove", "team.add", "team.update",
                 "team.members", "team.remove", "token.issue", "token.revoke", "token.rotate", "token.revoke_all",
                 "console.link", "console.sign_in", "console.sign_out", "console.refused", "batch.cancel",
                 "cache.purge", "key.generate", "key.rotate", "key.retire", "key.transcripts", "db.restore",
                 "transcript.read", "transcript.export")


class NotSignedIn(Exception):
    pass


def _who():
    return {"actor": g.console_admin["name"], "source": request.remote_addr or "-"}


@bp.before_request
def _signed_in_admin():
    """A signed-in, still active admin for every page but the sign-in ones (first: a form sent after the
    session ended gets the sign-in page, not a CSRF refusal); then the CSRF check on every form."""
    if request.endpoint not in PUBLIC:
        user = parts().access.active_admin(session.user_id) if session.user_id is not None else None
        if user is None:
            session.clear()  # a stale session (timed out, its admin disabled or demoted) is deleted
            raise NotSignedIn()
        g.console_admin = user
    check_csrf()


def console_headers(response):
    """On every answer under /admin/console/ (the app's after-request hook: errors outside the pages too):
    a strict policy, no inline script or style anywhere, nothing framed, forms only to the console."""
    if not is_console(request.path):
        return response
    response.headers["Content-Security-Policy"] = (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Cross-Origin-Opener-Policy"] = "same-origin"
    if request.endpoint == "console.static":
        response.headers["Cache-Control"] = "public, max-age=86400"
    else:
        response.headers["Cache-Control"] = "no-store"
    return response


@bp.context_processor
def _globals():
    return {"csrf_token": csrf_token}


@bp.app_template_filter("timestamp")
def _timestamp(value):
    return "" if value is None else datetime.fromtimestamp(value, timezone.utc).isoformat(timespec="seconds")


@bp.errorhandler(NotSignedIn)
def _not_signed_in(_exc):
    return render_template("login.html", oidc=parts().oidc is not None, refused=None), 401


@bp.errorhandler(CsrfRefused)
def _csrf_refused(exc):
    return _error_page(403, str(exc), "csrf_refused")


@bp.errorhandler(StoreError)
def _store_error(exc):
    return _error_page(exc.status, exc.message, exc.code)


@bp.errorhandler(errors.Refusal)
def _refusal(exc):
    return _error_page(errors.status_of(exc), exc.message, exc.code)


def _error_page(status, message, code):
    response = Response(render_template("error.html", status=status, message=message, code=code), status)
    response.error_code = code  # for accounting, as the JSON errors carry it
    return response


# --- sign-in and out ---
@bp.get("/login/")
def login():
    return render_template("login.html", oidc=parts().oidc is not None, refused=None)


@bp.get("/login/link/<secret>")
def link_confirm(secret):
    """A page with one button: a link scanner or a prefetch that GETs the link does not use it up. A link that
    would not sign in is refused here already (and stores nothing)."""
    if not parts().access.link_usable(secret):
        raise link_refused()
    return render_template("link.html", secret=secret)


@bp.post("/login/link/<secret>")
def link_use(secret):
    access = parts().access
    user = access.redeem_link(secret, request.remote_addr or "-")
    response = redirect(url_for("console.overview"), 303)
    parts().sessions.sign_in(session, response, user)
    return response


def _provider():
    """The organisation's provider; a 404 page where none is configured."""
    if parts().oidc is None:
        raise NotFound("sign-in with the organisation's provider is not configured here", "oidc_not_configured")
    return parts().oidc


@bp.get("/login/oidc/start")
def oidc_start():
    oidc = _provider()
    try:
        return oidc.start()
    except oidc.Refused as exc:  # the provider does not answer, or its metadata is unusable
        return render_template("login.html", oidc=True, refused=exc.message), 503


@bp.get("/login/oidc/callback")
def oidc_callback():
    oidc, access = _provider(), parts().access
    source = request.remote_addr or "-"
    begun = any(key.startswith("_state_") for key in session)  # a sign-in begun here: a stray one is not audited
    try:
        user = oidc.finish(access)
    except oidc.Refused as exc:
        session.clear()
        if begun:
            state().store.record_event("console.refused", exc.who or "-", {"method": "oidc", "reason": exc.reason},
                                      actor="-", source=source)
        return render_template("login.html", oidc=True, refused=exc.message), 403
    access.signed_in(user, "oidc", source)
    # 200 and a refresh, not a redirect: the way back from the provider started on another site, and a
    # SameSite=Strict cookie set along a redirect chain begun there is not sent on the chain's next request.
    response = Response(render_template("signed_in.html"))
    parts().sessions.sign_in(session, response, user)
    return response


@bp.post("/logout")
def logout():
    state().store.record_event("console.sign_out", g.console_admin["name"], {}, **_who())
    session.clear()
    return redirect(url_for("console.login"), 303)


# --- overview, models, health ---
@bp.get("/")
def overview():
    app = state()
    today = datetime.now(timezone.utc).date()
    rows = app.store.usage_by_day(since=datetime.combine(today, datetime.min.time(), timezone.utc))
    totals = {field: sum(row[field] for row in rows) for field in ("requests", "total_tokens", "cached")}
    return render_template("overview.html", health=_health(), totals=totals, users=len(rows),
                           top=bar_chart(figures.top_users(rows, "total_tokens"), "tokens per user today"))


@bp.get("/models")
def model_list():
    app = state()
    return render_template("models.html", health=_health(), cards=[model_cards.card(s) for s in app.models],
                           rules=app.settings.routing, default=app.models.default.name)


def _health():
    """What /readyz checks, by the same functions, shown rather than refused."""
    app = state()
    database, counters = health.database_answers(), health.counters_answer()
    ready = all(s.engine.ready for s in app.models) and database and (counters or app.settings.ratelimit_fail_open)
    return {"ready": ready, "models": [model_cards.status(served) for served in app.models], "database": database,
            "counters": counters}


# --- users ---
@bp.get("/users")
def users():
    query = request.args.get("q", "")[:64].strip().lower()
    rows = [u for u in state().store.list_users() if query in u["name"]]
    return render_template("users.html", users=rows, q=query)


@bp.post("/users")
def user_add():
    form = _form_quotas(request.form, clear_empty=False)
    body = parse(AdminUserCreate, check_unicode({"name": request.form.get("name", "").strip(),
                                                 "admin": request.form.get("admin") == "on", **form}))
    user = state().store.add_user(body.name, body.admin, **{k: getattr(body, k) for k in QUOTA_FIELDS}, **_who())
    flash(f"created user {user['name']}")
    return redirect(url_for("console.user_detail", name=user["name"]), 303)


@bp.get("/users/<name>")
def user_detail(name):
    store = state().store
    user = store.get_user(name)
    every = request.args.get("all") == "true"
    since = datetime.now(timezone.utc) - parts().sessions.idle
    fields = shown(user)
    return render_template("user.html", user=user, standing=standing(user), shown=fields, version=version(fields),
                           separator=PROMPT_SEPARATOR, tokens=store.list_tokens(name, include_inactive=every),
                           every=every, sessions=parts().access.sessions_of(name, since), int_quotas=INT_QUOTAS)


@bp.post("/users/<name>")
def user_set(name):
    """Only the fields the admin changed, and only when no one changed the user since the form was shown
    (else 409: reload); a text field not in the form is left as it is."""
    store = state().store
    before = shown(store.get_user(name))
    if request.form.get("version") != version(before):
        raise Conflict(f"{name} was changed since this form was shown: reload the page and make the change again",
                       "changed_meanwhile", "version")
    form = {field: text.replace("\r\n", "\n") for field, text in request.form.items()}
    edited = {field: form[field] for field in QUOTA_FIELDS if field in form and form[field] != before[field]}
    changes = _form_quotas(edited, clear_empty=True)
    if (form.get("admin") == "on") != (before["admin"] == "on"):  # a checkbox: absent is unticked
        changes["admin"] = form.get("admin") == "on"
    body = parse(AdminUserPatch, check_unicode(changes)).model_dump(exclude_unset=True)
    if "admin" in body:
        body["is_admin"] = body.pop("admin")
    if not body:
        flash(f"nothing changed for {name}")
    else:
        store.update_user(name, **body, **_who())
        flash(f"saved {name}'s {', '.join(sorted(body))}")
    return redirect(url_for("console.user_detail", name=name), 303)


def version(fields):
    """A digest of the fields a form showed: a save compares it with the user as they are then."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def shown(user):
    """Each editable field of `user` as the form shows it (what an untouched field sends back)."""
    fields = {name: "" if user[name] is None else str(user[name]) for name in QUOTA_FIELDS if name not in LIST_FIELDS}
    fields["models"] = "\n".join(user["models"] or [])
    fields["system_prompts"] = f"\n{PROMPT_SEPARATOR}\n".join(user["system_prompts"] or [])
    fields["admin"] = "on" if user["admin"] else ""
    return fields


@bp.post("/users/<name>/active")
def user_active(name):
    active = _flag(request.form.get("active"), "active")
    state().store.update_user(name, active=active, **_who())
    flash(f"{'enabled' if active else 'disabled'} {name}")
    return redirect(url_for("console.user_detail", name=name), 303)


@bp.post("/users/<name>/transcripts")
def user_transcripts(name):
    keep = _flag(request.form.get("transcripts"), "transcripts")
    state().store.update_user(name, transcripts=keep, **_who())
    flash(f"{name}'s transcripts are {'kept from now on' if keep else 'no longer kept'}")
    return redirect(url_for("console.user_detail", name=name), 303)


@bp.post("/users/<name>/remove")
def user_remove(name):
    """Delete the user, their tokens, sessions and transcripts (the API's rules: 409 while they store files)."""
    if name == g.console_admin["name"]:
        raise Conflict("an admin cannot remove themselves: ask another admin", "cannot_remove_self", "name")
    gone = state().store.remove_user(name, release=release_user, **_who())
    flash(f"removed {name}: {gone['tokens']} token(s), {gone['transcripts']} transcript(s)")
    return redirect(url_for("console.users"), 303)


def _flag(text, field):
    if text not in ("true", "false"):
        raise BadRequest(f"{field} must be true or false", "invalid_value", field)
    return text == "true"


def _form_quotas(form, clear_empty, fields=QUOTA_FIELDS):
    """The quota `fields` (a user's, or a team's TEAM_FIELDS) given in a form as the admin API takes them:
    numbers as numbers, allow-lists as lists (models one per line, system prompts separated by a line of ---);
    an empty field is not given (a new user or team) or cleared (a change: the default, or no team limit)."""
    out = {}
    for name in fields:
        if name not in form:
            continue
        text = form[name]
        if name == "system_prompts":
            value = [part.strip("\r\n") for part in _split_prompts(text)]
            value = [part for part in value if part.strip()] or None
        elif name == "models":
            value = [line.strip() for line in text.splitlines() if line.strip()] or None
        else:
            text = text.strip()
            value = text or None
            if name in INT_QUOTAS and value is not None and re.fullmatch(r"-?[0-9]{1,19}", text):
                value = int(text)  # else the text, which the API's model refuses naming the field
        if value is not None or clear_empty:
            out[name] = value
    return out


def _split_prompts(text):
    prompts, current = [], []
    for line in text.split("\n"):
        if line.strip() == PROMPT_SEPARATOR:
            prompts.append("\n".join(current))
            current = []
        else:
            current.append(line)
    prompts.append("\n".join(current))
    return prompts


# --- teams ---
@bp.get("/teams")
def teams():
    return render_template("teams.html", teams=state().store.list_teams())


@bp.post("/teams")
def team_add():
    body = parse(AdminTeamCreate, check_unicode({"name": request.form.get("name", "").strip(),
                                                 **_form_quotas(request.form, False, TEAM_FIELDS)}))
    team = state().store.add_team(body.name, **{k: getattr(body, k) for k in TEAM_FIELDS}, **_who())
    flash(f"created team {team['name']}")
    return redirect(url_for("console.team_detail", name=team["name"]), 303)


@bp.get("/teams/<name>")
def team_detail(name):
    store = state().store
    team = store.get_team(name)
    midnight = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    today = (store.usage_by_day(team=name, since=midnight, by="team") or [{}])[0]
    outside = [u["name"] for u in store.list_users() if u["team"] is None]
    return render_template("team.html", team=team, today=today, outside=outside)


@bp.post("/teams/<name>")
def team_set(name):
    """The limits the admin changed (an emptied field clears the team's limit of that kind)."""
    store = state().store
    team = store.get_team(name)
    edited = {k: v for k, v in request.form.items()
              if k in TEAM_FIELDS and v.strip() != ("" if team[k] is None else str(team[k]))}
    body = parse(AdminTeamPatch, check_unicode(_form_quotas(edited, True, TEAM_FIELDS)))
    body = body.model_dump(exclude_unset=True)
    if body:
        store.update_team(name, **body, **_who())
        flash(f"saved team {name}'s {', '.join(sorted(body))}")
    else:
        flash(f"nothing changed for team {name}")
    return redirect(url_for("console.team_detail", name=name), 303)


@bp.post("/teams/<name>/transcripts")
def team_transcripts(name):
    keep = _flag(request.form.get("transcripts"), "transcripts")
    state().store.update_team(name, transcripts=keep, **_who())
    flash(f"team {name}'s transcripts are " + ("kept from now on" if keep else
                                                "no longer kept (members who opted in themselves keep theirs)"))
    return redirect(url_for("console.team_detail", name=name), 303)


@bp.post("/teams/<name>/members")
def team_members(name):
    add, remove = request.form.getlist("add"), request.form.getlist("remove")
    body = parse(AdminTeamMembers, check_unicode({"add": [u for u in add if u], "remove": remove}))
    if not body.add and not body.remove:
        raise BadRequest("choose a user to add or a member to remove", "empty", None)
    state().store.set_members(name, add=body.add, remove=body.remove, **_who())
    flash(f"team {name}: {', '.join([*('added ' + u for u in body.add), *('removed ' + u for u in body.remove)])}")
    return redirect(url_for("console.team_detail", name=name), 303)


@bp.post("/teams/<name>/remove")
def team_remove(name):
    team = state().store.remove_team(name, **_who())
    flash(f"removed team {name}; {len(team['members'])} member(s) now in no team")
    return redirect(url_for("console.teams"), 303)


# --- tokens ---
@bp.post("/users/<name>/tokens")
def token_issue(name):
    app, form = state(), request.form
    scope = ",".join(s for s in ("generate", "admin") if form.get(f"scope_{s}") == "on") or "generate"
    body = parse(AdminTokenRequest, check_unicode({"user": name, "scope": scope, "ttl": form.get("ttl") or None,
                                                   "label": form.get("label", "")}))
    text, meta = issue_token(app.store, app.keys, body.user, scope=body.scope, ttl=body.ttl or app.settings.token_ttl,
                             max_ttl=app.settings.token_max_ttl, label=body.label, issuer=app.settings.jwt_issuer,
                             audience=app.settings.jwt_audience, **_who())
    return render_template("token.html", token=text, meta=meta)


@bp.post("/tokens/<jti>/revoke")
def token_revoke(jti):
    token = state().store.revoke_token(jti, **_who())
    flash(f"revoked token {token['jti']}")
    return redirect(url_for("console.user_detail", name=token["user"]), 303)


@bp.post("/tokens/<jti>/rotate")
def token_rotate(jti):
    """The successor's page (its text shown once, as at issue); the old token works until the grace ends."""
    app = state()
    body = parse(AdminTokenRotate, check_unicode({"grace": request.form.get("grace", "").strip()}))
    text, meta = rotate_token(app.store, app.keys, jti, grace=body.grace, max_ttl=app.settings.token_max_ttl,
                              issuer=app.settings.jwt_issuer, audience=app.settings.jwt_audience, **_who())
    return render_template("token.html", token=text, meta=meta)


@bp.post("/users/<name>/revoke-all")
def token_revoke_all(name):
    count = state().store.revoke_all(name, **_who())
    flash(f"revoked {count} token(s) of {name}; their console sessions ended")
    return redirect(url_for("console.user_detail", name=name), 303)


# --- usage ---
def _span():
    """The usage pages' arguments: the user and the team (None: everyone), the days shown (UTC, oldest first)."""
    args = request.args
    span_days = query_int(args.get("days", "14"), "days", 1, 366)
    user, team = args.get("user") or None, args.get("team") or None
    if user is not None:
        check_name(user)
        state().store.get_user(user)  # an unknown user is a 404, not an empty chart
    if team is not None:
        check_name(team, "team")
        state().store.get_team(team)
    return user, team, figures.days(datetime.now(timezone.utc).date(), span_days)


def _start(span):
    return datetime.fromisoformat(span[0]).replace(tzinfo=timezone.utc)


@bp.get("/usage")
def usage():
    app = state()
    user, team, span = _span()
    span_days = len(span)
    rows = app.store.usage_by_day(user, _start(span), team=team)
    return render_template(
        "usage.html", rows=rows, user=user, team=team, span_days=span_days,
        tokens=line_chart(figures.per_day(rows, "total_tokens", span), "tokens per day"),
        requests=bar_chart(figures.per_day(rows, "requests", span), "requests per day"),
        top=bar_chart(figures.top_users(rows, "total_tokens"), f"top users by tokens, last {span_days} days"),
        today=[{"user": u, "standing": standing(u)} for u in app.store.list_users(team)
               if user is None or u["name"] == user])


@bp.get("/usage.csv")
def usage_csv():
    user, team, span = _span()  # the same days as the page
    rows = state().store.usage_by_day(user, _start(span), team=team)
    return Response(figures.usage_csv(rows), mimetype="text/csv",
                    headers={"Content-Disposition": 'attachment; filename="usage.csv"'})


# --- audit ---
@bp.get("/audit")
def audit():
    args = request.args
    filters = {name: _text_arg(name, 200) for name in ("actor", "action", "target")}
    since = args.get("since") or None
    if since is not None:
        try:
            since = datetime.fromisoformat(since)
        except ValueError:
            raise BadRequest("since must be a date (YYYY-MM-DD)", "invalid_value", "since") from None
    limit = query_int(args.get("limit", "200"), "limit", 1, 1000)
    rows = state().store.list_audit(**filters, since=since, limit=limit)
    return render_template("audit.html", rows=rows, filters=filters, since=args.get("since", ""), limit=limit,
                           actions=AUDIT_ACTIONS)


def _text_arg(name, limit):
    """A free-text query argument, stripped, or None; control characters (NUL among them, which PostgreSQL
    refuses) are a 400."""
    text = (request.args.get(name) or "").strip()[:limit]
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise BadRequest(f"{name} has a control character", "invalid_value", name)
    return text or None


# --- batches ---
@bp.get("/batches")
def batch_list():
    records = state().batches
    after = request.args.get("after") or None
    if after is not None and not re.fullmatch(r"batch_[0-9a-f]{24}", after):
        raise BadRequest("after must be a batch id (batch_ and 24 hex digits)", "invalid_value", "after")
    listing = records.list_batches(None, True, limit=100, after=after)
    return render_template("batches.html", listing=listing, owners=records.owners([b["id"] for b in listing["data"]]))


@bp.post("/batches/<batch_id>/cancel")
def batch_cancel(batch_id):
    records = state().batches
    running = records.get_batch(batch_id, None, True)["status"] in ("validating", "in_progress")
    batch = records.cancel(batch_id, None, True)  # the API's rule: a finished batch is a 409
    if running:  # a second click changes nothing, and is not audited again
        owner = records.owners([batch["id"]]).get(batch["id"])
        state().store.record_event("batch.cancel", batch["id"], {"owner": owner}, **_who())
    flash(f"cancelling batch {batch['id']}" if running else f"batch {batch['id']} is already {batch['status']}")
    return redirect(url_for("console.batch_list"), 303)


# --- transcripts ---
@bp.get("/transcripts")
def transcripts():
    """Transcripts' metadata (no content: opening one is audited)."""
    user, team = _text_arg("user", 64), _text_arg("team", 64)
    since = request.args.get("since") or None
    if since is not None:
        try:
            since = datetime.fromisoformat(since)
        except ValueError:
            raise BadRequest("since must be a date (YYYY-MM-DD)", "invalid_value", "since") from None
    rows = state().transcripts.list(user, since, limit=200, team=team)
    return render_template("transcripts.html", rows=rows, user=user or "", team=team or "",
                           since=request.args.get("since", ""))


@bp.get("/transcripts/<transcript_id>")
def transcript(transcript_id):
    """One transcript, decrypted; each view is audited (transcript.read)."""
    if not re.fullmatch(r"[0-9a-f]{32}", transcript_id):
        raise NotFound("no such transcript", "transcript_not_found", "id")
    return render_template("transcript.html", t=state().transcripts.read(transcript_id, **_who()))
