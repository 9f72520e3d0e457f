"""Documents the tests write themselves: a PDF with a text layer, a scanned-style PDF (an image and no text),
PNG/JPEG/WebP images of an equation, and the bad ones (encrypted, broken, a pixel bomb, blank)."""

import base64
import io
import os
import struct
import zlib

from fpdf import FPDF
from PIL import Image, ImageDraw, ImageFont
from pypdf import PdfReader, PdfWriter

PROBLEM = "Problem 7: find x if 3x + 5 = 20."
EQUATION = "Solve 2x + 3 = 11"


def text_pdf_with_picture(noise_side=260):
    """A PDF of PROBLEM and a picture of random pixels, which no compression shrinks: about noise_side**2 * 3
    bytes (a document larger than the JSON body limit)."""
    pdf = FPDF()
    pdf.add_page()
    pdf.set_font("Helvetica", size=14)
    pdf.cell(text=PROBLEM, new_x="LMARGIN", new_y="NEXT")
    pdf.image(Image.frombytes("RGB", (noise_side, noise_side), os.urandom(noise_side * noise_side * 3)), w=60)
    return bytes(pdf.output())


def text_pdf(*lines, pages=1):
    """A PDF whose pages hold `lines` (PROBLEM by default) as a text layer."""
    pdf = FPDF()
    for _ in range(pages):
        pdf.add_page()
        pdf.set_font("Helvetica", size=14)
        for line in lines or (PROBLEM,):
            pdf.cell(text=line, new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())


def image(text=EQUATION, size=(900, 160)):
    """A Pillow image of `text`, black on white, large enough to read."""
    picture = Image.new("RGB", size, "white")
    ImageDraw.Draw(picture).text((20, 50), text, fill="black", font=ImageFont.load_default(size=48))
    return picture


def encoded(picture, kind):
    """The picture's bytes as PNG, JPEG, WEBP or PDF (a scanned-style page: an image, no text layer)."""
    out = io.BytesIO()
    picture.save(out, kind, **({"quality": 95} if kind in ("JPEG", "WEBP") else {}))
    return out.getvalue()


def png(text=EQUATION):
    return encoded(image(text), "PNG")


def scanned_pdf(text=EQUATION):
    return encoded(image(text), "PDF")


def encrypted_pdf():
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(text_pdf())))
    writer.encrypt("secret-password", algorithm="AES-256")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def broken_pdf():
    """A PDF header over bytes that are no PDF."""
    return b"%PDF-1.7\n" + bytes(range(256)) * 8


def pixel_bomb(side=12000):
    """A PNG of a few hundred bytes that says it is side x side pixels (a decompression bomb, under Pillow's own guard: ours refuses it)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit greyscale
    rows = zlib.compress(b"\x00" * (side + 1) * 4)  # a few rows; the decoder would want all of them
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def blank_png():
    return encoded(Image.new("RGB", (400, 200), "white"), "PNG")


def data_url(data, media_type):
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"
