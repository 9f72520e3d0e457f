"""Documents attached to a generation: chat's image and file content parts, /v1/predict's file.

A live request is admitted (service.serving.pipeline.admit_reading: its
slot, its rate, a reservation of the document allowance) before its first
document is read, so documents past a user's concurrency cap or budget are
refused unparsed. Each document is read by the worker's fair reading pool
(service.inputs.documents), on the user's share of it, within the job's limits: how many documents, how many bytes together, and
the time left before the job's deadline (reading counts toward it:
service.serving.pipeline gives the generation what is left). What was read
goes on the job (service.serving.job) as its cost, for the usage row, the
log line (counts and times, never the text) and the metrics.

Extracted text is machine-made: control characters a PDF's text layer may
hold are made spaces here, then it goes through the same filters as typed
text (prompts' clean_text, content policy and token limits).
"""

import time
import unicodedata

from service.errors import BadRequest, DeadlineExceeded, TooLarge
from service.inputs import documents
from service.records import metrics
from service.records.accounting import DocumentCost
from service.serving import pipeline

MIN_READ_S = 1.0  # the least time a document is given; less left before the deadline: 504 without trying


def open_reader(settings):
    """This worker's reading pool (its processes start on the first document)."""
    return documents.Reader(documents.Limits(settings.document_max_bytes, settings.document_max_pages,
                                             settings.document_max_pixels, settings.document_timeout_s,
                                             settings.document_memory_mb * 2**20),
                            settings.document_workers, settings.document_queue_s, settings.document_reader_socket)


def read(state, job, data, media_type, where):
    """The text of one document of `job`; a refusal (413, 415, 422, 503, 504 as HTTP says them) naming
    `where`."""
    settings = state.settings
    if len(job.documents) >= settings.documents_per_request:
        raise BadRequest(f"a request may hold at most {settings.documents_per_request} documents",
                         "too_many_documents", where)
    spent = sum(document.size for document in job.documents)
    if spent + len(data) > settings.document_max_bytes:
        raise TooLarge(f"the documents of a request may hold {settings.document_max_bytes} bytes together; "
                       f"{where} brings them to {spent + len(data)}", "document_too_large", where)
    left = settings.request_deadline_s - (time.monotonic() - job.started)
    if left < MIN_READ_S:
        raise DeadlineExceeded(f"no time is left before the {settings.request_deadline_s:g} s deadline to read "
                               f"{where}", "deadline_exceeded", where)
    documents.check(data, media_type, state.documents.limits, where)  # what costs nothing to refuse, first
    job.timings.lap("template")
    pipeline.admit_reading(state, job)
    job.timings.lap("admission")
    started = time.monotonic()
    try:
        document = state.documents.read(data, media_type, where, timeout_s=left, user=job.caller.user)
    except Exception:  # refused in reading: the time it took is still the user's, in the usage row
        kind = "pdf" if media_type == "application/pdf" else "image"
        job.documents.append(DocumentCost(kind, 0, 0, time.monotonic() - started, len(data)))
        raise
    finally:
        job.timings.lap("documents")
    job.documents.append(DocumentCost(document.kind, document.pages, document.images, document.seconds,
                                      len(data)))
    metrics.DOCUMENTS.labels(document.kind, document.method).inc()
    metrics.DOCUMENT_PAGES.labels(document.kind).inc(document.pages)
    metrics.DOCUMENT_IMAGES.inc(document.images)
    metrics.DOCUMENT_SECONDS.labels(document.kind).observe(document.seconds)
    return document


def plain(text):
    """Extracted text with its control characters (other than tab and line ends) made spaces."""
    return "".join(" " if unicodedata.category(c) == "Cc" and c not in "\t\n\r" else c for c in text)


def part_text(state, job, part, where):
    """The text of one chat content part: its text, or what was read from its image or file."""
    limit = state.settings.document_max_bytes
    if part.type == "text":
        return part.text
    if part.type == "image_url":
        media_type, data = documents.from_data_url(part.image_url.url, f"{where}.image_url.url", limit)
        return _kept(job, read(state, job, data, media_type, f"{where}.image_url").text)
    if part.file.file_id is not None:
        raise BadRequest(f"{where}.file.file_id is not taken here: send the file itself as file_data (a data: "
                         "URL)", "unsupported_value", f"{where}.file.file_id")
    if part.file.file_data is None:
        raise BadRequest(f"{where}.file.file_data is required", "missing", f"{where}.file.file_data")
    media_type, data = documents.from_data_url(part.file.file_data, f"{where}.file.file_data", limit)
    return _kept(job, read(state, job, data, media_type, f"{where}.file").text)


def _kept(job, text):
    """A chat part's document text, plain, noted on the job (a transcript keeps it)."""
    text = plain(text)
    job.document_texts.append(text)
    return text
