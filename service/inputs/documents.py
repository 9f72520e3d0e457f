"""Documents as questions: the text of a PDF or an image, read off the engine's process.

A client sends a PDF, PNG, JPEG or WebP (a multipart `file` on /v1/predict, a
`data:` URL in a chat content part). `Reader.read` checks it here, in the
worker, cheaply (its size, that its bytes are what its type says), then hands
it to a small pool of separate processes that do the slow and risky part:
PDF parsing through pypdf, OCR through rapidocr-onnxruntime (whose models ship
inside its wheel: nothing is downloaded). A process, not a thread: pypdf is
pure Python and would hold the worker's interpreter lock against the engine
thread, and a document that runs past its time limit is stopped by killing
its process, which no thread allows. The pool is fair (service.inputs.fairness:
each user within their share, turns round-robin between users) and bounded:
a document waits for its turn a few seconds at most, then gets 503. Each
reading process is spawned with a bare environment and none of the worker's
open files, under a memory cap (service.processes, extraction.confine).
Deployed, `socket_path` names a socket where systemd starts a reader unit of
its own per document instead (service.inputs.reader): another user, no
network, no access to the keys or the database.

A PDF page with a text layer gives its text; a page without one (a scan)
gives the OCR of its images. Limits hold before anything is decoded: bytes,
pages, and the pixels of every image (declared sizes and the encoded data's
own header are read first, so a small file that decodes into gigabytes is
refused unread); pypdf's own stream-length limits stop a compressed stream
bomb, and the memory cap what slips past all of them.

The text that comes back is a question like a typed one: the callers put it
through the same filters (service.inputs.filtering). Nothing here logs it.

This module is the worker's side: the checks, the data: URLs and the pool.
What runs in a reading process is service.inputs.extraction.
"""

import base64
import binascii
import dataclasses
import json
import logging
import re
import socket
import time
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from service.errors import BadRequest, TooLarge, Unavailable, Unimplemented, Unprocessable, UnsupportedMedia
from service.inputs.extraction import MEDIA_TYPES, Document, DocumentError, confine, extract
from service.inputs.fairness import Busy, Gate
from service.processes import Processes

log = logging.getLogger("vibethinker.documents")
DATA_URL = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+)(?P<params>(?:;[\w.+-]+=[\w.+-]+)*);base64,", re.ASCII)
# What a reading process's DocumentError becomes in the worker.
REFUSALS = {"too_large": TooLarge, "unreadable": Unprocessable, "unimplemented": Unimplemented}
WAITING_PER_WORKER = 4  # documents that may wait for a pool process, per process, before 503
QUEUE_S = 5.0  # how long a document waits for its turn at a process before 503 (within its time limit)
RESULT_MARGIN_S = 5.0  # past its time limit, for pebble to kill the process and say so


@dataclass(frozen=True)
class Limits:
    """What one document may be: bytes, PDF pages, pixels per image, seconds and memory to read it."""

    max_bytes: int
    max_pages: int
    max_pixels: int
    timeout_s: float
    max_memory: int = 2 * 2**30  # bytes of address space a reading process may map (RLIMIT_AS)


def sniff(data):
    """The media type `data`'s first bytes show, or None."""
    if data.startswith(b"%PDF-"):
        return "application/pdf"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def check(data, media_type, limits, where):
    """A refusal unless `data` is a supported document of `media_type` within the byte limit: TooLarge,
    UnsupportedMedia, Unprocessable."""
    if media_type not in MEDIA_TYPES:
        raise UnsupportedMedia(f"{where} has type {media_type[:64]!r}; supported: {', '.join(MEDIA_TYPES)}",
                               "unsupported_media_type", where)
    if len(data) > limits.max_bytes:
        raise TooLarge(f"{where} is {len(data)} bytes; the limit is {limits.max_bytes}", "document_too_large",
                       where)
    if not data:
        raise Unprocessable(f"{where} is empty", "empty_document", where)
    seen = sniff(data)
    if seen != media_type:
        what = f"a {MEDIA_TYPES[seen].upper()} file" if seen else "no supported kind of file"
        raise UnsupportedMedia(f"{where} says it is {media_type} but its bytes are {what}", "file_type_mismatch",
                               where)


def from_data_url(url, where, max_bytes):
    """(media type, bytes) of a base64 `data:` URL; 400 for any other URL (the server fetches none), 413 past
    `max_bytes` before decoding."""
    if not isinstance(url, str) or not url.startswith("data:"):
        scheme = url.split(":", 1)[0][:16] if isinstance(url, str) and ":" in url else ""
        said = f"a {scheme}: URL" if scheme else "not a data: URL"
        raise BadRequest(f"{where} is {said}; only data: URLs (base64) are accepted: the server fetches no URL",
                         "unsupported_url", where)
    head = DATA_URL.match(url)
    if head is None:
        raise BadRequest(f"{where} must be data:<media type>;base64,<data>", "invalid_data_url", where)
    encoded = url[head.end():]
    if len(encoded) > (max_bytes + 2) // 3 * 4 + 4:
        raise TooLarge(f"{where} holds more than {max_bytes} bytes", "document_too_large", where)
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{where} is not valid base64", "invalid_data_url", where) from None
    return head["type"].lower(), data


class Reader:
    """The fair pool of reading processes of one worker, started on first use: each process under a memory cap,
    with a bare environment and none of the worker's open files (service.processes); or, with `socket_path`,
    fair turns at the reader units behind it."""

    def __init__(self, limits, workers, queue_s=QUEUE_S, socket_path=""):
        self.limits, self.workers, self.queue_s, self.socket_path = limits, workers, queue_s, socket_path
        self._processes = Processes(workers, initializer=confine, initargs=(limits.max_memory,), bare=True)
        self._gate = Gate(workers, workers * WAITING_PER_WORKER)

    def read(self, data, media_type, where, timeout_s=None, user=""):
        """The Document in `data` (checked by `check` first), read on `user`'s turn; TooLarge, UnsupportedMedia
        or Unprocessable for the document, Unavailable when no turn comes within the queue's wait,
        Unprocessable past the time limit (`timeout_s`, at most the configured one; the wait counts)."""
        check(data, media_type, self.limits, where)
        limit = min(self.limits.timeout_s, timeout_s or self.limits.timeout_s)
        started = time.monotonic()
        try:
            self._gate.turn(user, min(self.queue_s, limit))
        except Busy:
            raise Unavailable("too many documents are being read now; retry shortly", "documents_busy",
                              retry_after=2) from None
        try:
            document = self._run(data, media_type, where, limit - (time.monotonic() - started), limit)
        finally:
            self._gate.done(user)
        return dataclasses.replace(document, seconds=time.monotonic() - started)

    def _run(self, data, media_type, where, left, limit):
        """The document read in a free process within `left` seconds; pebble kills the process past it."""
        too_slow = Unprocessable(f"{where} could not be read within {limit:g} s", "document_too_slow", where)
        if left <= 0:
            raise too_slow
        if self.socket_path:
            return self._ask(data, media_type, where, left, too_slow)
        future = self._processes.pool().schedule(extract, args=(data, media_type, self.limits), timeout=left)
        try:
            return future.result(timeout=left + RESULT_MARGIN_S)
        except FutureTimeout:
            future.cancel()  # pebble did not stop it in time: stop its process now
            raise too_slow from None
        except DocumentError as exc:
            raise REFUSALS[exc.kind](f"{where}: {exc.message}", exc.code, where) from None
        except Exception as exc:  # the process died (a crash in a decoder, past its memory cap): the document's
            raise Unprocessable(f"{where} could not be read ({type(exc).__name__}); it may need more than "
                                f"{self.limits.max_memory // 2**20} MiB to decode", "unreadable_document",
                                where) from None

    def _ask(self, data, media_type, where, left, too_slow):
        """The document read by a reader unit of its own (service.inputs.reader) behind the socket: systemd
        starts one per connection, and stops it past its RuntimeMaxSec. The reader is untrusted: its reply is
        read within the time left and MAX_REPLY bytes, and taken only in the exact shape of a Document or of
        a known refusal."""
        limits = dataclasses.replace(self.limits, timeout_s=left)  # the reader ends itself when the worker stops
        header = json.dumps({"media_type": media_type, "limits": dataclasses.asdict(limits)}).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(left)
                conn.connect(self.socket_path)
                conn.sendall(header + b"\n" + data)
                conn.shutdown(socket.SHUT_WR)
                raw = _reply(conn, time.monotonic() + left)
        except (FileNotFoundError, ConnectionRefusedError):  # no reader socket (an upgrade in progress?)
            log.error("the document readers' socket does not answer", extra={"fields": {"socket": self.socket_path}})
            raise Unavailable("documents cannot be read right now; retry shortly", "documents_unavailable",
                              retry_after=5) from None
        except TimeoutError:
            raise too_slow from None
        except OSError as exc:  # the reader died (its memory cap, a crash in a decoder)
            raise Unprocessable(f"{where} could not be read ({type(exc).__name__})", "unreadable_document",
                                where) from None
        return _answer(raw, where, self.limits)

    def holding(self):
        """{user: documents being read now}."""
        return self._gate.holding()

    def close(self):
        """Stop the reading processes."""
        self._processes.close()


MAX_REPLY = 16 * 2**20  # bytes of a reader's reply: a document's text, JSON-escaped, fits many times over
KINDS, METHODS = ("pdf", "image"), ("text", "ocr", "text+ocr")


def _reply(conn, deadline):
    """A reader's reply line, read by `deadline` (TimeoutError) and within MAX_REPLY (ValueError)."""
    chunks, size = [], 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the reader's reply did not end in time")
        conn.settimeout(left)
        chunk = conn.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_REPLY:
            raise ValueError("the reader's reply is too large")
        if b"\n" in chunk:
            return b"".join(chunks)


def _answer(raw, where, limits):
    """The Document of a reader's reply, or the refusal it names; anything else is the document's 422 (a
    reader that misbehaves is a document that could not be read, never a 500 or a new metric label)."""
    unreadable = Unprocessable(f"{where} could not be read (the reader ended without a valid reply; it may need "
                               f"more than {limits.max_memory // 2**20} MiB)", "unreadable_document", where)
    try:
        reply = json.loads(raw.split(b"\n", 1)[0]) if b"\n" in raw else None  # no newline: it died mid-reply
    except ValueError:
        reply = None
    if not isinstance(reply, dict) or len(reply) != 1:
        raise unreadable
    if isinstance(reply.get("document"), dict):
        fields = reply["document"]
        good = (set(fields) == {f.name for f in dataclasses.fields(Document)}
                and fields["kind"] in KINDS and fields["method"] in METHODS and isinstance(fields["text"], str)
                and all(type(fields[name]) is int and fields[name] >= 0 for name in ("pages", "images"))
                and isinstance(fields["seconds"], (int, float)))
        if not good:
            raise unreadable
        return Document(**fields)
    error = reply.get("error")
    if not (isinstance(error, list) and len(error) == 3 and error[0] in REFUSALS
            and all(isinstance(part, str) and len(part) <= 500 for part in error)):
        raise unreadable
    kind, code, message = error
    if not code.replace("_", "").isalnum():
        raise unreadable
    raise REFUSALS[kind](f"{where}: {message}", code, where)
