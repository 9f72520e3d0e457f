"""How long reading a document takes: a PDF's text layer, OCR of a photo and of a scanned page.

    python -m bench.documents [--repeats 5]

Reads documents written here (fpdf2 and Pillow, as the tests write them) in
this process, as a reading process does (service.inputs.documents.extract),
and prints one JSON line: the median milliseconds of each kind, and, side by
side in the same run, OCR with rapidocr's own default detection size (every
image scaled up to 736 pixels on its short side) against the service's
(the image's own size, up to documents.OCR_SIDE on its long side): the
ratio is the figure to compare across machines, with whether each read the
text right.
"""

import argparse
import io
import json
import statistics
import time

import numpy
from PIL import Image, ImageDraw, ImageFont


from service.inputs import documents, extraction
from tests.support import makedocs

LIMITS = documents.Limits(64 << 20, 100, 400_000_000, 600)


def page(lines=24, size=(1400, 1800)):
    """A dense scanned-style page: many lines of small text."""
    picture = Image.new("RGB", size, "white")
    text = "\n".join(f"Line {i}: add {i} and {i + 1}, then double it." for i in range(lines))
    ImageDraw.Draw(picture).text((20, 50), text, fill="black", font=ImageFont.load_default(size=40))
    out = io.BytesIO()
    picture.save(out, "PDF")
    return out.getvalue()


def median_ms(run, repeats):
    run()  # warm: the OCR's sessions load once per reading process
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = run()
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 1), result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from rapidocr_onnxruntime import RapidOCR

    text_pdf, photo, scan = makedocs.text_pdf(makedocs.PROBLEM, pages=3), makedocs.png(), page()
    figures = {}
    for name, data, media_type in (("text_pdf_3_pages", text_pdf, "application/pdf"),
                                   ("ocr_one_line_photo", photo, "image/png"),
                                   ("ocr_dense_scanned_page", scan, "application/pdf")):
        figures[f"{name}_ms"], _ = median_ms(lambda: documents.extract(data, media_type, LIMITS), args.repeats)
    pixels = numpy.ascontiguousarray(numpy.asarray(makedocs.image())[:, :, ::-1])
    threads = {f"{stage}_{kind}_op_num_threads": 1 for stage in ("det", "cls", "rec") for kind in ("intra", "inter")}
    default, ours = RapidOCR(**threads), RapidOCR(det_limit_type="max", det_limit_side_len=documents.OCR_SIDE,
                                                  **threads)
    want = "".join(makedocs.EQUATION.split())
    for name, engine in (("rapidocr_default", default), ("service", ours)):
        ms, found = median_ms(lambda: engine(pixels)[0], args.repeats)
        read = "".join(" ".join(t for _, t in line) for line in extraction.lines(found or ()))
        figures[f"{name}_photo_ms"], figures[f"{name}_reads_it_right"] = ms, "".join(read.split()) == want
    figures["service_speedup_over_default"] = round(figures["rapidocr_default_photo_ms"]
                                                    / figures["service_photo_ms"], 1)
    print(json.dumps({"bench": "documents", "repeats": args.repeats, **figures}))


if __name__ == "__main__":
    main()
