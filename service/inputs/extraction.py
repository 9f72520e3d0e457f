"""What runs in a reading process: the text of a checked PDF or image (pypdf, Pillow, rapidocr).

The worker's side (service.inputs.documents) checks a document and hands it
here through its pool of reading processes; no Flask, no torch, no service
error is imported here, so a reading process starts light. A PDF page with
a text layer gives its text; a page without one (a scan) gives the OCR of its
images. The pixels of every image are checked before it is decoded, from its
declared size and from the header of its encoded data (an embedded JPEG's SOF,
PNG's IHDR, JPEG 2000's header), and the process runs under a memory cap
(`confine`), so what slips past both ends as MemoryError, not a swollen
process. What goes wrong is a DocumentError, whose plain args cross
the process pool back to the worker.
"""

import io
import warnings
from dataclasses import dataclass

MEDIA_TYPES = {"application/pdf": "pdf", "image/png": "png", "image/jpeg": "jpeg", "image/webp": "webp"}
MIN_PAGE_TEXT = 3  # a page whose text layer holds fewer non-space characters is read by OCR
OCR_SIDE = 2048  # pixels: larger images are scaled down to this long side for text detection


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
    `kind` is a key of service.inputs.documents.REFUSALS."""

    def __init__(self, kind, code, message):
        super().__init__(kind, code, message)
        self.kind, self.code, self.message = kind, code, message


def confine(max_memory):
    """Run at a reading process's start: its address space capped at `max_memory` bytes (RLIMIT_AS), so a
    decoder that would swell past it gets MemoryError (or dies) instead of taking the machine's memory."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (max_memory, max_memory))


def peak_memory():
    """This process's peak resident memory in bytes (for the tests' measurements): VmHWM, its own since it
    started (getrusage's ru_maxrss keeps the forking worker's across exec)."""
    with open("/proc/self/status") as status:
        kb = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    return int(kb) * 1024


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
    except MemoryError:
        raise DocumentError("too_large", "document_too_large", "the PDF needs more memory to read than a reading "
                            "process may use") from None
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
    """The page's images as RGB Pillow images, each checked for size before it is decoded: its declared size,
    and the real one its encoded stream's own header says."""
    resources = page.get("/Resources") or {}
    xobjects = resources.get("/XObject") or {}
    for name in list(xobjects):
        obj = xobjects[name].get_object()
        if obj.get("/Subtype") != "/Image":
            continue
        for stream in _with_masks(obj):  # pypdf decodes a soft mask (or a stencil mask) in full beside it
            _check_pixels(int(stream.get("/Width", 0)), int(stream.get("/Height", 0)), limits)
            _check_encoded(stream.get_data(), limits)
        yield obj.decode_as_image().convert("RGB")


def _with_masks(image):
    """An image XObject and the image streams decoded with it: its /SMask, and its /Mask when that is a stream
    (not an array of colour ranges)."""
    streams = [image]
    for key in ("/SMask", "/Mask"):
        mask = image.get(key)
        mask = mask.get_object() if mask is not None else None
        if hasattr(mask, "get_data"):
            streams.append(mask)
    return streams


def _check_encoded(data, limits):
    """DocumentError when an image stream's data (after its non-image filters) is an encoded image (a JPEG's
    SOF, a PNG's IHDR, a JPEG 2000 or TIFF header...) larger than the pixel limit, whatever the PDF declares:
    pypdf decodes such a stream at the size its own header says. Raw samples are read at the declared size."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as encoded:  # the header only: nothing is decoded
                _check_pixels(*encoded.size, limits)
    except Image.DecompressionBombError:
        raise DocumentError("too_large", "image_too_large",
                            f"an image has more than {limits.max_pixels} pixels, the limit") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        pass  # raw samples (or damaged: decoding says so)


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
    except MemoryError:
        raise DocumentError("too_large", "image_too_large", "the image needs more memory to decode than a "
                            "reading process may use") from None
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
