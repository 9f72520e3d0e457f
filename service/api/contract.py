"""The HTTP contract as OpenAPI 3.1, generated: `GET /openapi.json`, no token needed.

Request bodies are the pydantic models the routes validate with
(service.inputs.schemas); responses are the models the routes' answers
follow (service.api.responses). Paths come from the app's own URL map, and
every route must have an entry in ROUTES, so nothing is served undocumented
(the spec refuses to build otherwise). Bounds that come from settings
(max_new_tokens, the body size) are written in from the running settings.
Every error response is the one error shape (service.errors). The admins'
console (/admin/console/, HTML pages for a browser) is not part of it.
"""

from flask import Blueprint, current_app
from pydantic.json_schema import models_json_schema

from auth.checks import NAME_PATTERN
from service.api import health
from service.api.access import is_console, public, scope_for
from service.api.answer_models import ChatCompletion, Prediction
from service.api.responses import (
    AuditList, Batch, BatchList, CachePurged, Error, FileDeleted, FileList, FileObject, Health, IssuedToken, Me,
    ModelCard, ModelList, Ready, RotatedToken, Team, TeamList, Token, TokenList, Transcript, TranscriptList, UsageList,
    User, UserList, UserRemoved)
from service.inputs import schemas
from service.inputs.extraction import MEDIA_TYPES
from service.serving.params import LEAST_PENALTY, MAX_TOP_K, MAX_TOP_LOGPROBS
from service.state import state

REF = "#/components/schemas/{model}"

UPLOAD = {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"], "additionalProperties": False,
    "properties": {"file": {"type": "string", "format": "binary"}, "purpose": {"type": "string", "enum": ["batch"]}}}}}

# /v1/predict with a document: its JSON form's fields as text fields, and the file (question then optional).
PREDICT_FORM = {"schema": {
    "type": "object", "additionalProperties": False,
    "properties": {**{name: {"type": "string"} for name in ("question", "system_prompt", "model", "expected_answer",
                                                            "reasoning_effort")},
                   "max_new_tokens": {"type": "integer"}, "temperature": {"type": "number"},
                   "top_p": {"type": "number"}, "top_k": {"type": "integer"}, "min_p": {"type": "number"},
                   "repetition_penalty": {"type": "number"}, "thinking_token_budget": {"type": "integer"},
                   "file": {"type": "string", "format": "binary",
                            "description": "PDF, PNG, JPEG or WebP; its text is read (OCR where it has none)"}}},
    "encoding": {"file": {"contentType": ", ".join(MEDIA_TYPES)}}}

# Statuses every route can answer, by what it does; gunicorn itself answers any request whose line or
# headers pass its bounds (service.gunicorn_conf), in the same shape.
EVERY = (414, 431)
AUTH = (401, 403, 429, 503)
BODY = (400, 413, 415)
GENERATION = (*AUTH, *BODY, 422, 499, 500, 501, 504)
QUERY = [{"name": "user", "in": "query", "schema": {"type": "string"}},
         {"name": "since", "in": "query", "schema": {"type": "string", "format": "date-time"}}]

# endpoint -> (summary, request model, response model, success status, error statuses, query parameters).
ROUTES = {
    "health.healthz": ("The process is alive", None, Health, 200, (), ()),
    "health.readyz": ("The model is loaded and the database and Redis answer", None, Ready, 200, (503,), ()),
    "health.metrics": ("Prometheus metrics (nginx serves them to allowed addresses only)", None, None, 200, (), ()),
    "contract.openapi": ("This document", None, None, 200, (), ()),
    "predict.predict": ("Answer one question", schemas.PredictRequest, Prediction, 200, (*GENERATION, 404), ()),
    "chat.chat_completions": ("Answer a conversation, whole or streamed (stream: true gives server-sent events)",
                              schemas.ChatRequest, ChatCompletion, 200, (*GENERATION, 404), ()),
    "models.list_models": ("The models served here (those this token's user may call)", None, ModelList, 200,
                           AUTH, ()),
    "models.get_model": ("One model", None, ModelCard, 200, (*AUTH, 403, 404), ()),
    "me.me": ("Who this token belongs to, its limits and today's use", None, Me, 200, AUTH, ()),
    "batches.upload_file": ("Upload a batch input file (JSONL)", UPLOAD, FileObject, 200, (*AUTH, *BODY), ()),
    "batches.list_files": ("Your files (an admin's: all)", None, FileList, 200, AUTH, (
        {"name": "purpose", "in": "query", "schema": {"type": "string"}},)),
    "batches.get_file": ("One file", None, FileObject, 200, (*AUTH, 404), ()),
    "batches.file_content": ("A file's bytes (a batch's output and error files are JSONL)", None, None, 200,
                             (*AUTH, 404), ()),
    "batches.delete_file": ("Delete a file", None, FileDeleted, 200, (*AUTH, 404), ()),
    "batches.create_batch": ("Start a batch of requests from an input file; every line is checked first",
                             schemas.BatchCreate, Batch, 200, (*AUTH, *BODY, 404), ()),
    "batches.list_batches": ("Your batches, newest first", None, BatchList, 200, (*AUTH, 400), (
        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
        {"name": "after", "in": "query", "schema": {"type": "string"}})),
    "batches.get_batch": ("One batch: its status and request counts", None, Batch, 200, (*AUTH, 404), ()),
    "batches.cancel_batch": ("Cancel a batch: lines running stop, the output has what was done", None, Batch, 200,
                             (*AUTH, 404, 409), ()),
    "admin.add_user": ("Create a user", schemas.AdminUserCreate, User, 201, (*AUTH, *BODY, 409), ()),
    "admin.list_users": ("Every user", None, UserList, 200, AUTH, ()),
    "admin.update_user": ("Change a user's state, rights or quotas", schemas.AdminUserPatch, User, 200,
                          (*AUTH, *BODY, 404), ()),
    "admin.remove_user": ("Remove a user with their tokens, console sessions and transcripts (409 while they "
                          "store files or have batches open); usage and the audit trail stay", None, UserRemoved,
                          200, (*AUTH, 404, 409), ()),
    "admin.list_transcripts": ("Transcripts of users who opted in: metadata only, newest first", None,
                               TranscriptList, 200, (*AUTH, 400), (
                                   *QUERY, {"name": "team", "in": "query", "schema": {"type": "string"}},
                                   {"name": "limit", "in": "query",
                                            "schema": {"type": "integer", "minimum": 1, "maximum": 1000}})),
    "admin.read_transcript": ("One transcript, decrypted (audited as transcript.read)", None, Transcript, 200,
                              (*AUTH, 404, 500), ()),
    "admin.add_team": ("Create a team (its members share its limits)", schemas.AdminTeamCreate, Team, 201,
                       (*AUTH, *BODY, 404, 409), ()),
    "admin.list_teams": ("Every team, its limits and members", None, TeamList, 200, AUTH, ()),
    "admin.get_team": ("One team", None, Team, 200, (*AUTH, 404), ()),
    "admin.update_team": ("Change a team's shared limits", schemas.AdminTeamPatch, Team, 200, (*AUTH, *BODY, 404),
                          ()),
    "admin.team_members": ("Add users to a team and remove others (a user is in one team at most)",
                           schemas.AdminTeamMembers, Team, 200, (*AUTH, *BODY, 404, 409), ()),
    "admin.remove_team": ("Delete a team (its members stay, in no team)", None, Team, 200, (*AUTH, 404), ()),
    "admin.add_token": ("Issue a token (its text is shown once)", schemas.AdminTokenRequest, IssuedToken, 201,
                        (*AUTH, *BODY, 404), ()),
    "admin.list_tokens": ("Tokens, active only unless all=true", None, TokenList, 200, (*AUTH, 400, 404),
                          ({"name": "user", "in": "query", "schema": {"type": "string"}},
                           {"name": "all", "in": "query", "schema": {"type": "string", "enum": ["true", "false"]}})),
    "admin.revoke_token": ("Revoke a token", None, Token, 200, (*AUTH, 404), ()),
    "admin.rotate_token": ("Issue a successor to a token (its text is shown once); the old one works until the "
                           "grace ends", schemas.AdminTokenRotate, RotatedToken, 201, (*AUTH, *BODY, 404, 409), ()),
    "admin.usage_by_day": ("Usage per user (or per team) and UTC day", None, UsageList, 200, (*AUTH, 400, 404), (
        *QUERY, {"name": "team", "in": "query", "schema": {"type": "string"}},
        {"name": "by", "in": "query", "schema": {"type": "string", "enum": ["user", "team"]}})),
    "admin.purge_cache": ("Drop cached answers: all, a user's or a model's (audited)", schemas.CachePurge,
                          CachePurged, 200, (*AUTH, *BODY, 404, 503), ()),
    "admin.list_audit": ("The audit trail, newest first", None, AuditList, 200, (*AUTH, 400), (
        {"name": "actor", "in": "query", "schema": {"type": "string"}},
        {"name": "action", "in": "query", "schema": {"type": "string"}},
        {"name": "target", "in": "query", "schema": {"type": "string"}},
        QUERY[1], {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}})),
}
# What a created thing leads to (OpenAPI links): clients and fuzzers follow them.
LINKS = {
    "admin.add_user": {"UpdateUser": {"operationId": "admin.update_user.patch",
                                      "parameters": {"name": "$response.body#/name"}}},
    "admin.add_team": {"UpdateTeam": {"operationId": "admin.update_team.patch",
                                      "parameters": {"name": "$response.body#/name"}}},
    "admin.add_token": {"RevokeToken": {"operationId": "admin.revoke_token.delete",
                                        "parameters": {"jti": "$response.body#/jti"}},
                        "RotateToken": {"operationId": "admin.rotate_token.post",
                                        "parameters": {"jti": "$response.body#/jti"}}},
    "batches.upload_file": {"CreateBatch": {"operationId": "batches.create_batch.post", "requestBody": {
        "input_file_id": "$response.body#/id", "endpoint": "/v1/chat/completions", "completion_window": "24h"}},
        "GetFile": {"operationId": "batches.get_file.get", "parameters": {"file_id": "$response.body#/id"}}},
    "batches.create_batch": {
        "GetBatch": {"operationId": "batches.get_batch.get", "parameters": {"batch_id": "$response.body#/id"}},
        "CancelBatch": {"operationId": "batches.cancel_batch.post",
                        "parameters": {"batch_id": "$response.body#/id"}}},
}
DESCRIPTIONS = {200: "OK", 201: "Created", 400: "Bad request", 401: "No valid token", 403: "Not allowed",
                404: "No such thing", 405: "Method not allowed", 408: "Expired",
                409: "Conflicts with what exists or its state", 413: "Body too large", 414: "Request line too long",
                415: "Not JSON, or a document of a type not taken", 422: "Refused by the content policy, or a "
                "document that cannot be read", 429: "A limit is reached",
                431: "Request headers too large", 499: "The client closed the connection (recorded, never read)",
                500: "Internal error", 501: "OCR is not installed on this server",
                503: "Not ready, at capacity, or a storage is down", 504: "Deadline passed"}

bp = Blueprint("contract", __name__)


@bp.get("/openapi.json")
@public
def openapi():
    return spec(current_app)


def spec(app):
    """The OpenAPI 3.1 document of `app`; ValueError when a route has no entry in ROUTES."""
    settings = state(app).settings
    models = {Error, *(m for entry in ROUTES.values() for m in entry[1:3] if isinstance(m, type))}
    modes = [(m, "validation" if issubclass(m, schemas.StrictModel) else "serialization") for m in models]
    _, top = models_json_schema(modes, ref_template=REF)
    components = top.get("$defs", {})
    _bound(components, settings)
    paths = {}
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        if rule.endpoint == "static" or is_console(rule.rule):  # the console's pages are for browsers, not the API
            continue
        if rule.endpoint not in ROUTES:
            raise ValueError(f"route {rule.rule} ({rule.endpoint}) is not described in service.api.contract")
        path = _openapi_path(rule)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            paths.setdefault(path, {})[method.lower()] = _operation(app, rule, method)
    return {
        "openapi": "3.1.0",
        "info": {"title": "VibeThinker reasoning API", "version": health.version(),
                 "description": "Bearer tokens are issued by an admin (vibethinker-admin tokens issue)."},
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}}},
        "security": [{"bearer": []}],
    }


def _operation(app, rule, method):
    summary, body, answer, ok, errors, query = ROUTES[rule.endpoint]
    view = app.view_functions[rule.endpoint]
    operation = {"operationId": f"{rule.endpoint}.{method.lower()}", "summary": summary,
                 "responses": {str(ok): _success(rule, answer, ok)}}
    if getattr(view, "vibethinker_public", False):
        operation["security"] = []
    else:
        scope = scope_for(rule.rule)
        operation["description"] = f"Needs a token with the {scope!r} scope." if scope else "Needs any token."
    params = [{"name": arg, "in": "path", "required": True, "schema": {"type": "string"}} for arg in rule.arguments]
    if params or query:
        operation["parameters"] = params + list(query)
    if isinstance(body, dict):  # a body that is not JSON (an upload)
        operation["requestBody"] = {"required": True, "content": body}
    elif body is not None:
        operation["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": {"$ref": REF.format(model=body.__name__)}}}}
        if rule.endpoint == "predict.predict":
            operation["requestBody"]["content"]["multipart/form-data"] = PREDICT_FORM
    for status in sorted({*errors, *EVERY}):
        operation["responses"][str(status)] = {"description": DESCRIPTIONS[status], "content": {
            "application/json": {"schema": {"$ref": REF.format(model="Error")}}}}
    return operation


def _success(rule, answer, status):
    if rule.endpoint == "health.metrics":
        return {"description": "Prometheus text", "content": {"text/plain": {"schema": {"type": "string"}}}}
    if rule.endpoint == "batches.file_content":
        return {"description": "The file", "content": {"application/jsonl": {"schema": {"type": "string"}}}}
    if rule.endpoint == "contract.openapi":
        return {"description": "OpenAPI 3.1", "content": {"application/json": {"schema": {"type": "object"}}}}
    content = {"application/json": {"schema": {"$ref": REF.format(model=answer.__name__)}}}
    if rule.endpoint == "chat.chat_completions":
        content["text/event-stream"] = {"schema": {  # one server-sent event
            "type": "object", "required": ["data"],
            "properties": {"data": {"type": "string", "description": (
                "a chat.completion.chunk object as JSON; on a failure after the stream began, the one error "
                "shape; last, [DONE]")}, "event": {"type": "string"}, "id": {"type": "string"}}}}
    success = {"description": DESCRIPTIONS[status], "content": content}
    if rule.endpoint in LINKS:
        success["links"] = LINKS[rule.endpoint]
    return success


def _bound(components, settings):
    """The bounds the routes check from settings, written into the request schemas."""
    tokens = {"type": "integer", "minimum": 1, "maximum": settings.max_new_tokens_limit}
    number = lambda low, high: {"type": "number", "minimum": low, "maximum": high}  # noqa: E731
    for name, fields in (("PredictRequest", ("max_new_tokens",)), ("ChatRequest", ("max_tokens",
                                                                                   "max_completion_tokens"))):
        props = components[name]["properties"]
        for field in fields:
            props[field] = {"anyOf": [tokens, {"type": "null"}]}
        props["temperature"] = {"anyOf": [number(0, 2), {"type": "null"}]}
        props["top_p"] = {"anyOf": [{**number(0, 1), "exclusiveMinimum": 0}, {"type": "null"}]}
        props["top_k"] = {"anyOf": [{"type": "integer", "minimum": -1, "maximum": MAX_TOP_K},
                                    {"type": "null"}], "description": "0 or -1: no limit"}
        props["min_p"] = {"anyOf": [number(0, 1), {"type": "null"}]}
        props["repetition_penalty"] = {"anyOf": [number(LEAST_PENALTY, 2), {"type": "null"}],
                                       "description": "1: none; above 1, tokens already seen are less likely"}
        props["thinking_token_budget"] = {"anyOf": [{**tokens, "minimum": 0}, {"type": "null"}], "description":
                                          "thinking tokens before the engine ends the thinking (vLLM's name)"}
    chat = components["ChatRequest"]["properties"]
    chat["n"] = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": min(settings.max_n, settings.max_batch_size)},
                           {"type": "null"}], "description": "choices, prefilled once"}
    chat["top_logprobs"] = {"anyOf": [{"type": "integer", "minimum": 0, "maximum": MAX_TOP_LOGPROBS},
                                      {"type": "null"}], "description": "only with logprobs: true"}
    served = [spec.name for spec in settings.served_models()]
    components["ChatRequest"]["properties"]["model"]["examples"] = [served[0], "auto"]
    components["PredictRequest"]["properties"]["question"]["examples"] = ["What is 2 + 2?"]
    for model in ("AdminUserCreate", "AdminTeamCreate"):
        components[model]["properties"]["name"].update(pattern=f"^{NAME_PATTERN}$", maxLength=64)
    components["ChatRequest"]["properties"]["seed"] = {"anyOf": [
        {"type": "integer", "minimum": schemas.SEED_RANGE[0], "maximum": schemas.SEED_RANGE[1]}, {"type": "null"}]}


def _openapi_path(rule):
    """/admin/users/<name> -> /admin/users/{name}."""
    path = rule.rule
    for arg in rule.arguments:
        for converter in ("", "path:", "string:"):
            path = path.replace(f"<{converter}{arg}>", "{" + arg + "}")
    return path
