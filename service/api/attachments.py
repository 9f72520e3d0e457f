"""Documents attached to a request: /v1/predict's multipart `file`, chat's image and file content parts.

Each document is read by the worker's reading pool (service.inputs.documents)
within the request's limits: how many documents, how many bytes together,
and the time left before the request's deadline (reading counts toward it:
service.api.generation gives the generation what is left). What was read is
written on the request's record, for the usage row, the log line (counts and
times, never the text) and the metrics.

Extracted text is machine-made: control characters a PDF's text layer may
hold are made spaces here, then it goes through the same filters as typed
text (the callers' clean_text, content policy and token limits).
"""

import math
import time
import unicodedata

from flask import request

from service.errors import APIError
from service.inputs import documents
from service.records import accounting, metrics
from service.state import state

FORM_FIELDS = ("question", "system_prompt", "model", "max_new_tokens", "temperature", "top_p")
OCTET_STREAM = "application/octet-stream"
# Where a chat content part of each document kind holds its data URL.
DATA_URL_FIELDS = {"image_url": "url", "file": "file_data"}
MIN_READ_S = 1.0  # the least time a document is given; less left before the deadline: 504 without trying


def open_reader(settings):
    """This worker's reading pool (its processes start on the first document)."""
    return documents.Reader(documents.Limits(settings.document_max_bytes, settings.document_max_pages,
                                             settings.document_max_pixels, settings.document_timeout_s),
                            settings.document_workers)


def allow_document_body():
    """Let this request's body be as large as a document needs (the small limit applies elsewhere)."""
    request.max_content_length = state().settings.document_body_bytes


def check_chat_body(size, data):
    """APIError 413 when a chat body of `size` bytes holds more than max_body_bytes beside its documents' data
    URLs: the document allowance is for documents. Runs on the decoded JSON, before validation and before any
    per-character cleaning or policy, so a large text-only body costs a parse, not seconds of a thread."""
    limit = state().settings.max_body_bytes
    if size <= limit:
        return
    beside = size - _data_url_chars(data)
    if beside > limit:
        what = "without an image or file part" if beside == size else "beside its documents' data URLs"
        raise APIError(413, f"a chat body holds at most {limit} bytes {what}; this one holds {beside}",
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


def read(data, media_type, where):
    """The text of one document of this request; APIError 400/413/415/422/503/504 saying what is wrong."""
    settings, record = state().settings, accounting.current()
    if len(record.documents) >= settings.documents_per_request:
        raise APIError(400, f"a request may hold at most {settings.documents_per_request} documents",
                       "too_many_documents", where)
    spent = sum(document.size for document in record.documents)
    if spent + len(data) > settings.document_max_bytes:
        raise APIError(413, f"the documents of a request may hold {settings.document_max_bytes} bytes together; "
                       f"{where} brings them to {spent + len(data)}", "document_too_large", where)
    left = settings.request_deadline_s - (time.monotonic() - (record.reading_since or record.started))
    if left < MIN_READ_S:
        raise APIError(504, f"no time is left before the {settings.request_deadline_s:g} s deadline to read "
                       f"{where}", "deadline_exceeded", where)
    document = state().documents.read(data, media_type, where, timeout_s=left)
    record.documents.append(accounting.DocumentCost(document.kind, document.pages, document.images,
                                                    document.seconds, len(data)))
    metrics.DOCUMENTS.labels(document.kind, document.method).inc()
    metrics.DOCUMENT_PAGES.labels(document.kind).inc(document.pages)
    metrics.DOCUMENT_IMAGES.inc(document.images)
    metrics.DOCUMENT_SECONDS.labels(document.kind).observe(document.seconds)
    return document


def plain(text):
    """Extracted text with its control characters (other than tab and line ends) made spaces."""
    return "".join(" " if unicodedata.category(c) == "Cc" and c not in "\t\n\r" else c for c in text)


# --- chat content parts ---

def part_text(part, where):
    """The text of one chat content part: its text, or what was read from its image or file."""
    settings = state().settings
    if part.type == "text":
        return part.text
    if part.type == "image_url":
        media_type, data = documents.from_data_url(part.image_url.url, f"{where}.image_url.url",
                                                   settings.document_max_bytes)
        return plain(read(data, media_type, f"{where}.image_url").text)
    if part.file.file_id is not None:
        raise APIError(400, f"{where}.file.file_id is not taken here: send the file itself as file_data (a data: "
                       "URL)", "unsupported_value", f"{where}.file.file_id")
    if part.file.file_data is None:
        raise APIError(400, f"{where}.file.file_data is required", "missing", f"{where}.file.file_data")
    media_type, data = documents.from_data_url(part.file.file_data, f"{where}.file.file_data",
                                               settings.document_max_bytes)
    return plain(read(data, media_type, f"{where}.file").text)


# --- /v1/predict's multipart form ---

def from_form():
    """(the request body as PredictRequest's fields, the one document or None) of a multipart/form-data
    /v1/predict request; APIError 400/413 for a field that is not as PredictRequest's JSON form says."""
    settings = state().settings
    form, files = request.form, request.files
    if "file" in form:
        raise APIError(400, "file must be an uploaded file (curl -F file=@problem.pdf), not a text field",
                       "invalid_type", "file")
    unknown = sorted(set(form) - set(FORM_FIELDS) | set(files) - {"file"})
    if unknown:
        name = unknown[0]
        hint = " (a file goes in the field named file)" if name in files else ""
        raise APIError(400, f"unknown field {name!r}{hint}; allowed fields: {', '.join(FORM_FIELDS)}, file",
                       "unknown_field", name)
    text = sum(len(value) for values in form.listvalues() for value in values)
    if text > settings.max_body_bytes:  # the document allowance is for the file
        raise APIError(413, f"the form's fields beside its file hold {text} characters; the limit is "
                       f"{settings.max_body_bytes}", "body_too_large")
    body = {}
    for name in FORM_FIELDS:
        values = form.getlist(name)
        if len(values) > 1:
            raise APIError(400, f"{name} is given {len(values)} times", "invalid_value", name)
        if values:
            body[name] = _form_value(name, values[0])
    uploads = files.getlist("file")
    if len(uploads) > 1:
        raise APIError(400, "a request takes one file", "too_many_documents", "file")
    document = None
    if uploads:
        upload = uploads[0]
        data = upload.stream.read(settings.document_max_bytes + 1)
        if len(data) > settings.document_max_bytes:
            raise APIError(413, f"file is larger than {settings.document_max_bytes} bytes", "document_too_large",
                           "file")
        declared = (upload.mimetype or OCTET_STREAM).lower()
        # A client that did not say (curl's default for an unknown extension): the bytes say.
        media_type = (documents.sniff(data) or declared) if declared == OCTET_STREAM else declared
        document = read(data, media_type, "file")
    if document is None and "question" not in body:
        raise APIError(400, "question is required (or a file to read it from)", "missing", "question")
    body.setdefault("question", "")
    return body, document


def _form_value(name, text):
    if name == "max_new_tokens":
        if not (text.isascii() and text.lstrip("-").isdigit() and len(text) <= 12):
            raise APIError(400, f"{name} must be an integer", "invalid_type", name)
        return int(text)
    if name in ("temperature", "top_p"):
        try:
            value = float(text) if text.isascii() else math.nan
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise APIError(400, f"{name} must be a finite number", "invalid_type", name)
        return value
    return text
