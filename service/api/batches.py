"""Files and batches, as the OpenAI Batch API: the official client's files.* and batches.* work unchanged.

Routes are thin: service.batches.records keeps files and batches,
service.batches.lines checks input files, service.batches.quotas holds what
a user may store, service.batches.runner runs them. A user sees only their
own files and batches (404 otherwise); a token with the `admin` scope of an
admin user sees all of them (an admin's generate-only token sees its own).

Uploads and creates count against the user's request rate limit like any
generation; retrieves, lists, downloads, deletes and cancels (`POLLS`)
against the separate, generous polling limit (service.admission.ratelimit).
"""

from urllib.parse import quote

from flask import Blueprint, request, send_file

from service.api.access import caller
from service.api.body import read
from service.batches import files, lines, quotas
from service.errors import BadRequest, UnsupportedMedia
from service.inputs.schemas import BatchCreate, query_int
from service.serving import pipeline
from service.serving.caller import Caller
from service.state import state

bp = Blueprint("batches", __name__, url_prefix="/v1")
POLLS = {f"batches.{name}" for name in ("list_files", "get_file", "file_content", "delete_file", "list_batches",
                                         "get_batch", "cancel_batch")}
UPLOAD_FIELDS = {"purpose", "expires_after[anchor]", "expires_after[seconds]"}


def _records():
    return state().batches


def _who():
    """(user, admin): admin power only with the token's `admin` scope, as on /admin/*."""
    token = caller()
    return token["user"], bool(token.get("user_admin")) and "admin" in token["scope"].split()


def _quota():
    return quotas.StorageQuota.of(caller(), state().settings)


@bp.post("/files")
def upload_file():
    """A batch input file (multipart: file, purpose=batch, optional expires_after), streamed to disk."""
    settings = state().settings
    request.max_content_length = settings.max_upload_bytes  # the small body limit applies elsewhere
    if request.mimetype != "multipart/form-data":
        raise UnsupportedMedia("Content-Type must be multipart/form-data (fields: file, purpose)",
                               "unsupported_media_type")
    unknown = sorted((set(request.form) - UPLOAD_FIELDS) | (set(request.files) - {"file"}))
    if unknown:
        raise BadRequest(f"unknown field {unknown[0][:60]!r}; allowed fields: file, purpose, expires_after",
                         "unknown_field", unknown[0][:60])
    purpose = request.form.get("purpose")
    if purpose != "batch":
        raise BadRequest("purpose must be batch", "invalid_value", "purpose")
    upload = request.files.get("file")
    if upload is None:
        raise BadRequest("file is required (a multipart field named file)", "missing", "file")
    name = files.clean_filename(upload.filename)
    expires_s = files.expiry_s(request.form.get("expires_after[anchor]"),
                               request.form.get("expires_after[seconds]"), settings.file_expiry_s)
    return _records().add_file(_who()[0], purpose, name, upload.stream, settings.max_upload_bytes, expires_s,
                               _quota()), 200


@bp.get("/files")
def list_files():
    user, admin = _who()
    return {"object": "list", "data": _records().list_files(user, admin, request.args.get("purpose")),
            "has_more": False}


@bp.get("/files/<file_id>")
def get_file(file_id):
    return _records().get_file(file_id, *_who())


@bp.get("/files/<file_id>/content")
def file_content(file_id):
    records = _records()
    meta = records.get_file(file_id, *_who())
    response = send_file(records.open(file_id), mimetype="application/jsonl", max_age=0)
    response.headers["Content-Disposition"] = disposition(meta["filename"])
    return response


def disposition(filename):
    """A Content-Disposition that is safe for any stored name (RFC 6266): an ASCII `filename` with anything
    else replaced, and the exact name, percent-encoded, in `filename*`."""
    simple = "".join(c if " " <= c <= "~" and c not in '"\\' else "_" for c in filename) or "file.jsonl"
    return f"attachment; filename=\"{simple}\"; filename*=UTF-8''{quote(filename, safe='')}"


@bp.delete("/files/<file_id>")
def delete_file(file_id):
    return _records().delete_file(file_id, *_who())


@bp.post("/batches")
def create_batch():
    """Check every line of the input file now, within one deadline; the batch is in progress, or failed with
    the bad lines."""
    settings, records = state().settings, _records()
    body = read(BatchCreate)
    user, admin = _who()
    source = records.get_file(body.input_file_id, user, admin)
    if source["purpose"] != "batch":
        raise BadRequest(f"file {body.input_file_id} is not a batch input file", "invalid_value",
                         "input_file_id")
    quota = _quota()
    with records.engine.connect() as conn:  # early: a full quota costs no preparation (checked again at insert)
        quotas.check_batches(conn, user, quota)
    owner = Caller.of_token(caller())
    with pipeline.preparing(state(), owner):
        found, errors = lines.read_file(state(), owner, lambda: records.open(body.input_file_id), body.endpoint,
                                        settings.max_batch_lines)
    return records.create_batch(user, body.endpoint, body.input_file_id, body.completion_window,
                                settings.batch_window_s, body.metadata, found, errors, quota)


@bp.get("/batches")
def list_batches():
    limit = query_int(request.args.get("limit", "20"), "limit", 1, 100)
    return _records().list_batches(*_who(), limit=limit, after=request.args.get("after"))


@bp.get("/batches/<batch_id>")
def get_batch(batch_id):
    return _records().get_batch(batch_id, *_who())


@bp.post("/batches/<batch_id>/cancel")
def cancel_batch(batch_id):
    return _records().cancel(batch_id, *_who())
