"""The HTTP side of documents: a body allowed to be as large as its documents, held to the small limit beside
them, and /v1/predict's multipart form (its fields, and its one file read through service.serving.attachments).
"""

import math

from flask import request

from service.errors import BadRequest, TooLarge
from service.inputs import documents
from service.serving import attachments
from service.state import state

FORM_FIELDS = ("question", "system_prompt", "model", "max_new_tokens", "temperature", "top_p", "top_k", "min_p",
               "repetition_penalty", "expected_answer", "thinking_token_budget", "reasoning_effort")
OCTET_STREAM = "application/octet-stream"
# Where a chat content part of each document kind holds its data URL.
DATA_URL_FIELDS = {"image_url": "url", "file": "file_data"}


def allow_document_body():
    """Let this request's body be as large as a document needs (the small limit applies elsewhere)."""
    request.max_content_length = state().settings.document_body_bytes


def check_chat_body(size, data):
    """TooLarge when a chat body of `size` bytes holds more than max_body_bytes beside its documents' data
    URLs: the document allowance is for documents. Runs on the decoded JSON, before validation and before any
    per-character cleaning or policy, so a large text-only body costs a parse, not seconds of a thread."""
    limit = state().settings.max_body_bytes
    if size <= limit:
        return
    beside = size - _data_url_chars(data)
    if beside > limit:
        what = "without an image or file part" if beside == size else "beside its documents' data URLs"
        raise TooLarge(f"a chat body holds at most {limit} bytes {what}; this one holds {beside}",
                       "body_too_large")


def _data_url_chars(data):
    """The characters of the image and file data URLs in a decoded chat body (any shape: it is not checked
    yet)."""
    total = 0
    messages = data.get("messages")
    for message in messages if isinstance(messages, list) else ():
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else ():
            kind = part.get("type") if isinstance(part, dict) else None
            field = DATA_URL_FIELDS.get(kind) if isinstance(kind, str) else None
            inner = part.get(kind) if field else None
            url = inner.get(field) if isinstance(inner, dict) else None
            total += len(url) + url.count("/") if isinstance(url, str) else 0  # "/" may come escaped: "\\/"
    return total


# --- /v1/predict's multipart form ---

def from_form(app, job):
    """(the request body as PredictRequest's fields, the one document read for `job` or None) of a
    multipart/form-data /v1/predict request; BadRequest or TooLarge for a field that is not as PredictRequest's
    JSON form says."""
    settings = app.settings
    form, files = request.form, request.files
    if "file" in form:
        raise BadRequest("file must be an uploaded file (curl -F file=@problem.pdf), not a text field",
                         "invalid_type", "file")
    unknown = sorted(set(form) - set(FORM_FIELDS) | set(files) - {"file"})
    if unknown:
        name = unknown[0]
        hint = " (a file goes in the field named file)" if name in files else ""
        raise BadRequest(f"unknown field {name!r}{hint}; allowed fields: {', '.join(FORM_FIELDS)}, file",
                         "unknown_field", name)
    text = sum(len(value) for values in form.listvalues() for value in values)
    if text > settings.max_body_bytes:  # the document allowance is for the file
        raise TooLarge(f"the form's fields beside its file hold {text} characters; the limit is "
                       f"{settings.max_body_bytes}", "body_too_large")
    body = {}
    for name in FORM_FIELDS:
        values = form.getlist(name)
        if len(values) > 1:
            raise BadRequest(f"{name} is given {len(values)} times", "invalid_value", name)
        if values:
            body[name] = _form_value(name, values[0])
    uploads = files.getlist("file")
    if len(uploads) > 1:
        raise BadRequest("a request takes one file", "too_many_documents", "file")
    document = None
    if uploads:
        upload = uploads[0]
        data = upload.stream.read(settings.document_max_bytes + 1)
        if len(data) > settings.document_max_bytes:
            raise TooLarge(f"file is larger than {settings.document_max_bytes} bytes", "document_too_large",
                           "file")
        declared = (upload.mimetype or OCTET_STREAM).lower()
        # A client that did not say (curl's default for an unknown extension): the bytes say.
        media_type = (documents.sniff(data) or declared) if declared == OCTET_STREAM else declared
        document = attachments.read(app, job, data, media_type, "file")
    if document is None and "question" not in body:
        raise BadRequest("question is required (or a file to read it from)", "missing", "question")
    body.setdefault("question", "")
    return body, document


def _form_value(name, text):
    if name in ("max_new_tokens", "top_k", "thinking_token_budget"):
        if not (text.isascii() and text.lstrip("-").isdigit() and len(text) <= 12):
            raise BadRequest(f"{name} must be an integer", "invalid_type", name)
        return int(text)
    if name in ("temperature", "top_p", "min_p", "repetition_penalty"):
        try:
            value = float(text) if text.isascii() else math.nan
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise BadRequest(f"{name} must be a finite number", "invalid_type", name)
        return value
    return text
