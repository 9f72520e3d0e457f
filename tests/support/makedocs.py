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


def pdf_with_image_stream(data, filter_name, width=10, height=10, mask=None):
    """A one-page PDF (no text layer) showing one image XObject whose stream is `data` under `filter_name`,
    declared `width` x `height` grey pixels whatever the data holds; with `mask` (data, filter name), a soft
    mask declared the same size."""
    from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

    writer = PdfWriter()
    page = writer.add_blank_page(200, 200)
    image = _image_stream(data, filter_name, width, height)
    if mask is not None:
        image[NameObject("/SMask")] = writer._add_object(_image_stream(*mask, width, height))
    contents = DecodedStreamObject()
    contents.set_data(b"q 200 0 0 200 0 0 cm /Im0 Do Q")
    page[NameObject("/Resources")] = DictionaryObject(
        {NameObject("/XObject"): DictionaryObject({NameObject("/Im0"): writer._add_object(image)})})
    page[NameObject("/Contents")] = writer._add_object(contents)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def _image_stream(data, filter_name, width, height):
    from pypdf.generic import ArrayObject, DecodedStreamObject, NameObject, NumberObject

    image = DecodedStreamObject()
    image.set_data(data)
    image.update({NameObject("/Type"): NameObject("/XObject"), NameObject("/Subtype"): NameObject("/Image"),
                  NameObject("/Width"): NumberObject(width), NameObject("/Height"): NumberObject(height),
                  NameObject("/ColorSpace"): NameObject("/DeviceGray"),
                  NameObject("/BitsPerComponent"): NumberObject(8),
                  NameObject("/Filter"): ArrayObject([NameObject(filter_name)])})
    return image


def smask_in_pdf_bomb(side=8600):
    """A PDF whose image is an honest 10x10 JPEG, and whose soft mask, declared 10x10, holds a side x side
    JPEG: pypdf decodes the mask in full beside the image."""
    small = encoded(Image.new("L", (10, 10), 128), "JPEG")
    return pdf_with_image_stream(small, "/DCTDecode", mask=(encoded(Image.new("L", (side, side), 128), "JPEG"),
                                                             "/DCTDecode"))


def jpeg_in_pdf_bomb(side=8600):
    """A PDF whose image, declared 10x10, holds a side x side JPEG: under a megabyte that decodes to side**2
    bytes (the issue's attack: 1.4 GB in the reading process)."""
    return pdf_with_image_stream(encoded(Image.new("L", (side, side), 128), "JPEG"), "/DCTDecode")


def png_in_pdf_bomb(side=8600):
    """A PDF whose image, declared 10x10, holds a side x side PNG behind /ASCII85Decode: pypdf opens what such
    a stream decodes to with Pillow, at the PNG's own size."""
    png_bytes = encoded(Image.new("L", (side, side), 128), "PNG")
    return pdf_with_image_stream(base64.a85encode(png_bytes, adobe=True)[2:], "/ASCII85Decode")


def slow_pdf(pages=3, repeats=250_000):
    """A small PDF whose pages share one content stream of `repeats` text operators (about 2 MB, a few KB
    compressed): seconds of pypdf's text extraction per page (the issue's slow-PDF attack)."""
    from pypdf.generic import DictionaryObject, NameObject, StreamObject

    writer = PdfWriter()
    stream = StreamObject()
    stream.set_data(b"BT /F1 1 Tf " + b"(a) Tj " * repeats + b"ET")
    shared = writer._add_object(stream.flate_encode())
    font = DictionaryObject({NameObject("/Type"): NameObject("/Font"), NameObject("/Subtype"): NameObject("/Type1"),
                             NameObject("/BaseFont"): NameObject("/Helvetica")})
    for _ in range(pages):
        page = writer.add_blank_page(200, 200)
        page[NameObject("/Contents")] = shared
        page[NameObject("/Resources")] = DictionaryObject(
            {NameObject("/Font"): DictionaryObject({NameObject("/F1"): writer._add_object(font)})})
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()
