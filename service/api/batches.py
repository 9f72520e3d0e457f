"""Files and batches, as the OpenAI Batch API: the official client's files.* and batches.* work unchanged.

Routes are thin: service.batches.records keeps files and batches,
service.batches.lines checks input files, service.batches.runner runs them.
A user sees only their own files and batches (404 otherwise); an admin sees
all of them.
"""

import os

from flask import Blueprint, request, send_file

from service.api.access import caller
from service.api.body import read
from service.batches import lines
from service.errors import BadRequest, LimitReached, UnsupportedMedia
from service.inputs.schemas import BatchCreate, query_int
from service.serving.caller import Caller
from service.state import state

bp = Blueprint("batches", __name__, url_prefix="/v1")


def _records():
    return state().batches


def _who():
    token = caller()
    return token["user"], bool(token.get("user_admin"))


@bp.post("/files")
def upload_file():
    """A batch input file (multipart: file, purpose=batch), streamed to disk."""
    settings = state().settings
    request.max_content_length = settings.max_upload_bytes  # the small body limit applies elsewhere
    if request.mimetype != "multipart/form-data":
        raise UnsupportedMedia("Content-Type must be multipart/form-data (fields: file, purpose)",
                               "unsupported_media_type")
    unknown = sorted((set(request.form) - {"purpose"}) | (set(request.files) - {"file"}))
    if unknown:
        raise BadRequest(f"unknown field {unknown[0][:60]!r}; allowed fields: file, purpose", "unknown_field",
                         unknown[0][:60])
    purpose = request.form.get("purpose")
    if purpose != "batch":
        raise BadRequest("purpose must be batch", "invalid_value", "purpose")
    upload = request.files.get("file")
    if upload is None:
        raise BadRequest("file is required (a multipart field named file)", "missing", "file")
    user, _ = _who()
    name = os.path.basename(upload.filename or "")[:255]
    return _records().add_file(user, purpose, name, upload.stream, settings.max_upload_bytes), 200


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
    return send_file(records.open(file_id), mimetype="application/jsonl", as_attachment=False,
                     download_name=meta["filename"], max_age=0)


@bp.delete("/files/<file_id>")
def delete_file(file_id):
    return _records().delete_file(file_id, *_who())


@bp.post("/batches")
def create_batch():
    """Check every line of the input file now; the batch is in progress, or failed with the bad lines."""
    settings, records = state().settings, _records()
    body = read(BatchCreate)
    user, admin = _who()
    source = records.get_file(body.input_file_id, user, admin)
    if source["purpose"] != "batch":
        raise BadRequest(f"file {body.input_file_id} is not a batch input file", "invalid_value",
                         "input_file_id")
    if records.open_count(user) >= settings.max_open_batches:
        raise LimitReached(f"{user} already has {settings.max_open_batches} batches open; wait for one to end",
                           "too_many_batches", retry_after=60)
    with records.open(body.input_file_id) as handle:
        found, errors = lines.read_input(state(), Caller.of_token(caller()), handle, body.endpoint,
                                         settings.max_batch_lines)
    batch = records.create_batch(user, body.endpoint, body.input_file_id, body.completion_window,
                                 settings.batch_window_s, body.metadata, found, errors)
    return batch


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
