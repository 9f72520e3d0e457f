"""Documents as questions: the text of a PDF or an image, read off the engine's process.

A client sends a PDF, PNG, JPEG or WebP (a multipart `file` on /v1/predict, a
`data:` URL in a chat content part). `Reader.read` checks it here, in the
worker, cheaply (its size, that its bytes are what its type says), then hands
it to a small pool of separate processes that do the slow and risky part:
PDF parsing through pypdf, OCR through rapidocr-onnxruntime (whose models ship
inside its wheel: nothing is downloaded). A process, not a thread: pypdf is
pure Python and would hold the worker's interpreter lock against the engine
thread, and a document that runs past its time limit is stopped by killing
its process, which no thread allows. The pool is bounded: past a few waiting
documents a request is refused with 503 rather than queued for ever.

A PDF page with a text layer gives its text; a page without one (a scan)
gives the OCR of its images. Limits hold before anything is decoded: bytes,
pages, and the pixels of every image (declared sizes are read first, so a
small file that decodes into gigabytes is refused unread); pypdf's own
stream-length limits stop a compressed stream bomb.

The text that comes back is a question like a typed one: the callers put it
through the same filters (service.inputs.filtering). Nothing here logs it.
"""

import base64
import binascii
import dataclasses
import io
import multiprocessing
import re
import threading
import time
import warnings
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from service.errors import BadRequest, TooLarge, Unavailable, Unimplemented, Unprocessable, UnsupportedMedia

MEDIA_TYPES = {"application/pdf": "pdf", "image/png": "png", "image/jpeg": "jpeg", "image/webp": "webp"}
MIN_PAGE_TEXT = 3  # a page whose text layer holds fewer non-space characters is read by OCR
DATA_URL = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+)(?P<params>(?:;[\w.+-]+=[\w.+-]+)*);base64,", re.ASCII)
OCR_SIDE = 2048  # pixels: larger images are scaled down to this long side for text detection
# What a reading process's DocumentError becomes in the worker.
REFUSALS = {"too_large": TooLarge, "unreadable": Unprocessable, "unimplemented": Unimplemented}
WAITING_PER_WORKER = 4  # documents that may wait for a pool process, per process, before 503


@dataclass(frozen=True)
class Limits:
    """What one document may be: bytes, PDF pages, pixels per image, seconds to read it."""

    max_bytes: int
    max_pages: int
    max_pixels: int
    timeout_s: float


@dataclass(frozen=True)
class Document:
    """What was read from one document."""

    kind: str  # "pdf" or "image"
    pages: int  # a PDF's pages; 1 for an image
    images: int  # images read by OCR
    method: str  # "text" (a text layer), "ocr", or "text+ocr" (some pages of each)
    text: str
    seconds: float = 0.0  # time spent reading it, waiting included

    def summary(self, text):
        """The /predict answer's `document` field, with `text`: what the model saw of it (cleaned as typed text)."""
        return {"kind": self.kind, "pages": self.pages, "chars": len(text), "method": self.method, "text": text}


class DocumentError(Exception):
    """A document that cannot be read, as (kind, code, message): plain args, so it crosses the process pool;
    `kind` is a key of REFUSALS."""

    def __init__(self, kind, code, message):
        super().__init__(kind, code, message)
        self.kind, self.code, self.message = kind, code, message


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
    """The pool of reading processes of one worker, started on first use."""

    def __init__(self, limits, workers):
        self.limits, self.workers = limits, workers
        self._pool, self._lock = None, threading.Lock()
        self._waiting = threading.BoundedSemaphore(workers * (1 + WAITING_PER_WORKER))

    def read(self, data, media_type, where, timeout_s=None):
        """The Document in `data` (checked by `check` first); TooLarge, UnsupportedMedia or Unprocessable for
        the document, Unavailable when the pool is full, Unprocessable past the time limit (`timeout_s`, at
        most the configured one)."""
        check(data, media_type, self.limits, where)
        limit = min(self.limits.timeout_s, timeout_s or self.limits.timeout_s)
        started = time.monotonic()
        if not self._waiting.acquire(blocking=False):
            raise Unavailable("too many documents are being read now; retry shortly", "documents_busy",
                              retry_after=2)
        try:
            future = self.pool().schedule(extract, args=(data, media_type, self.limits), timeout=limit)
            document = future.result(timeout=limit)  # the wait for a process counts too
        except FutureTimeout:
            future.cancel()  # not started: dropped; running: its process is stopped
            raise Unprocessable(f"{where} could not be read within {limit:g} s", "document_too_slow",
                                where) from None
        except DocumentError as exc:
            raise REFUSALS[exc.kind](f"{where}: {exc.message}", exc.code, where) from None
        except Exception as exc:  # the process died (memory, a crash in a decoder): the document's doing
            raise Unprocessable(f"{where} could not be read ({type(exc).__name__})", "unreadable_document",
                                where) from None
        finally:
            self._waiting.release()
        return dataclasses.replace(document, seconds=time.monotonic() - started)

    def pool(self):
        with self._lock:
            if self._pool is None:
                import pebble  # the reading processes: spawned (never forked from a worker holding torch's threads)

                self._pool = pebble.ProcessPool(max_workers=self.workers,
                                                context=multiprocessing.get_context("spawn"))
            return self._pool

    def close(self):
        with self._lock:
            if self._pool is not None:
                self._pool.stop()
                self._pool.join(timeout=5)
                self._pool = None


# What runs in a reading process: no Flask, no torch.

def extract(data, media_type, limits):
    """The Document in checked `data`; DocumentError saying what is wrong with it."""
    if MEDIA_TYPES[media_type] == "pdf":
        return _pdf(data, limits)
    text = _ocr(_image(data, limits))
    if not text.strip():
        raise DocumentError("unreadable", "empty_document", "no text could be read from the image")
    return Document("image", 1, 1, "ocr", text)


def _pdf(data, limits):
    import pypdf
    from pypdf.errors import DependencyError, FileNotDecryptedError, LimitReachedError, PyPdfError

    try:
        reader = pypdf.PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted and not reader.decrypt(""):
            raise DocumentError("unreadable", "encrypted_pdf",
                                "the PDF is encrypted with a password; send it unencrypted")
        count = len(reader.pages)
        if count > limits.max_pages:
            raise DocumentError("too_large", "too_many_pages",
                                f"the PDF has {count} pages; the limit is {limits.max_pages}")
        texts, methods, images = [], set(), 0
        for page in reader.pages:
            text = page.extract_text() or ""
            if len("".join(text.split())) >= MIN_PAGE_TEXT:
                texts.append(text.strip())
                methods.add("text")
                continue
            for image in _page_images(page, limits):
                images += 1
                texts.append(_ocr(image))
                methods.add("ocr")
    except DocumentError:
        raise
    except LimitReachedError:
        raise DocumentError("too_large", "document_too_large", "the PDF decompresses past the size limit") from None
    except (DependencyError, FileNotDecryptedError):
        raise DocumentError("unreadable", "encrypted_pdf",
                            "the PDF is encrypted in a way this server cannot read; send it "
                            "unencrypted") from None
    except (PyPdfError, ValueError, KeyError, TypeError, AttributeError, IndexError, OSError,
            RecursionError, AssertionError, ZeroDivisionError):
        raise DocumentError("unreadable", "invalid_pdf",
                            "the PDF is damaged or not a PDF; it could not be parsed") from None
    if count == 0:
        raise DocumentError("unreadable", "empty_document", "the PDF has no pages")
    text = "\n\n".join(t for t in texts if t.strip())
    if not text:
        raise DocumentError("unreadable", "empty_document",
                            "no text could be read from the PDF (no text layer, and OCR "
                            "found none)")
    return Document("pdf", count, images, "+".join(sorted(methods, key=("text", "ocr").index)), text)


def _page_images(page, limits):
    """The page's images as RGB Pillow images, each checked for size before it is decoded."""
    resources = page.get("/Resources") or {}
    xobjects = resources.get("/XObject") or {}
    for name in list(xobjects):
        obj = xobjects[name].get_object()
        if obj.get("/Subtype") != "/Image":
            continue
        width, height = int(obj.get("/Width", 0)), int(obj.get("/Height", 0))
        _check_pixels(width, height, limits)
        yield obj.decode_as_image().convert("RGB")


def _image(data, limits):
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():  # Pillow warns of a large image; the size is checked next, ours
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
        _check_pixels(*image.size, limits)
        image.load()
        return image.convert("RGB")
    except DocumentError:
        raise
    except Image.DecompressionBombError:  # Pillow's own guard, past twice its MAX_IMAGE_PIXELS, at open
        raise DocumentError("too_large", "image_too_large",
                            f"the image has more than {limits.max_pixels} pixels, the limit") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise DocumentError("unreadable", "invalid_image",
                            "the image is damaged; it could not be decoded") from None


def _check_pixels(width, height, limits):
    if width * height > limits.max_pixels:
        raise DocumentError("too_large", "image_too_large", f"an image is {width}x{height} pixels; the limit is "
                            f"{limits.max_pixels} pixels")


_engine = None


def _ocr(image):
    """The text in a Pillow RGB image, lines in reading order."""
    global _engine
    import numpy

    try:
        from rapidocr_onnxruntime import RapidOCR
    except ImportError as exc:  # not installed (Python 3.13), or OpenCV's system libraries missing (libgl1)
        raise DocumentError("unimplemented", "ocr_unavailable",
                            f"OCR is not available on this server ({exc}); a PDF with a "
                            "text layer can still be read") from None
    if _engine is None:
        # One thread per stage: the engine thread keeps the rest of the processor. Detection at the image's
        # own size up to OCR_SIDE: rapidocr's default scales every image up to 736 pixels on its short side,
        # which made a one-line image ten times slower here and split its line in two.
        _engine = RapidOCR(det_limit_type="max", det_limit_side_len=OCR_SIDE,
                           **{f"{stage}_{kind}_op_num_threads": 1 for stage in ("det", "cls", "rec")
                              for kind in ("intra", "inter")})
    found, _ = _engine(numpy.ascontiguousarray(numpy.asarray(image)[:, :, ::-1]))  # BGR, as OpenCV reads
    return "\n".join(" ".join(text for _, text in line) for line in lines(found or ())).strip()


def lines(found):
    """OCR boxes ([corner points], text, score) as lines of (left, text), top to bottom and left to right: a
    box whose middle lies within half a line's height of the line's middle is on that line."""
    boxes = sorted(((min(y for _, y in box), max(y for _, y in box), min(x for x, _ in box), text)
                    for box, text, _ in found), key=lambda b: (b[0] + b[1]) / 2)
    grouped = []
    for top, bottom, left, text in boxes:
        middle = (top + bottom) / 2
        if grouped and abs(middle - grouped[-1]["middle"]) <= grouped[-1]["height"] / 2:
            grouped[-1]["boxes"].append((left, text))
        else:
            grouped.append({"middle": middle, "height": bottom - top, "boxes": [(left, text)]})
    return [sorted(line["boxes"]) for line in grouped]
