"""Reading documents without HTTP: types, limits, PDF text, OCR, bad files, the reading pool, the English hint."""

import dataclasses
import io
import json
import os
import subprocess
import sys
import threading
import time

import pytest
from pypdf import PdfReader, PdfWriter

from service.errors import Refusal, status_of
from service import processes
from service.inputs import documents, extraction, fairness
from service.inputs.documents import DocumentError, Limits
from service.inputs.language import english_hint
from tests.support import makedocs, probe
from tests.support.servers import ROOT

LIMITS = Limits(max_bytes=2_000_000, max_pages=3, max_pixels=20_000_000, timeout_s=30, max_memory=2 * 2**30)


def compact(text):
    return "".join(text.split())


@pytest.mark.parametrize("data, media_type", [
    (makedocs.text_pdf(), "application/pdf"), (makedocs.png(), "image/png"),
    (makedocs.encoded(makedocs.image(), "JPEG"), "image/jpeg"), (makedocs.encoded(makedocs.image(), "WEBP"),
                                                                 "image/webp"),
    (b"GIF89a...", None), (b"hello", None), (b"", None)])
def test_the_bytes_say_what_a_file_is(data, media_type):
    assert documents.sniff(data) == media_type


@pytest.mark.parametrize("data, media_type, status, code", [
    (b"plain text", "text/plain", 415, "unsupported_media_type"),
    (makedocs.png(), "application/pdf", 415, "file_type_mismatch"),
    (makedocs.text_pdf(), "image/png", 415, "file_type_mismatch"),
    (b"not an image at all", "image/jpeg", 415, "file_type_mismatch"),
    (b"", "image/png", 422, "empty_document"),
    (b"%PDF-" + b"0" * 2_000_000, "application/pdf", 413, "document_too_large"),
])
def test_a_file_that_is_not_what_it_says_or_too_big_is_refused_unread(data, media_type, status, code):
    with pytest.raises(Refusal) as refused:
        documents.check(data, media_type, LIMITS, "file")
    assert (status_of(refused.value), refused.value.code, refused.value.param) == (status, code, "file")


@pytest.mark.parametrize("url, status, code, words", [
    ("https://example.com/problem.png", 400, "unsupported_url", "a https: URL"),
    ("http://169.254.169.254/latest/meta-data", 400, "unsupported_url", "fetches no URL"),
    ("file:///etc/passwd", 400, "unsupported_url", "a file: URL"),
    ("problem.png", 400, "unsupported_url", "not a data: URL"),
    ("data:image/png,rawbytes", 400, "invalid_data_url", "base64"),
    ("data:image/png;base64,@@@@", 400, "invalid_data_url", "not valid base64"),
    ("data:image/png;base64," + "A" * 3_000_000, 413, "document_too_large", "more than 2000000 bytes"),
])
def test_only_data_urls_are_taken_and_the_server_fetches_nothing(url, status, code, words):
    with pytest.raises(Refusal) as refused:
        documents.from_data_url(url, "messages.0.content.0.image_url.url", LIMITS.max_bytes)
    assert (status_of(refused.value), refused.value.code) == (status, code)
    assert words in refused.value.message


def test_a_data_url_gives_its_type_and_bytes():
    data = makedocs.png()
    assert documents.from_data_url(makedocs.data_url(data, "image/PNG"), "x", LIMITS.max_bytes) == ("image/png", data)


def test_a_pdf_with_a_text_layer_is_read_as_text():
    document = documents.extract(makedocs.text_pdf(makedocs.PROBLEM, "Give x.", pages=2), "application/pdf", LIMITS)
    assert (document.kind, document.pages, document.images, document.method) == ("pdf", 2, 0, "text")
    assert document.text.count(makedocs.PROBLEM) == 2 and "Give x." in document.text


def test_a_scanned_page_and_an_image_are_read_by_ocr():
    scanned = documents.extract(makedocs.scanned_pdf(), "application/pdf", LIMITS)
    assert (scanned.kind, scanned.pages, scanned.images, scanned.method) == ("pdf", 1, 1, "ocr")
    assert compact(scanned.text) == compact(makedocs.EQUATION)
    for kind, media_type in (("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")):
        read = documents.extract(makedocs.encoded(makedocs.image(), kind), media_type, LIMITS)
        assert (read.kind, read.pages, read.images, read.method) == ("image", 1, 1, "ocr")
        assert compact(read.text) == compact(makedocs.EQUATION), kind


def test_a_pdf_of_text_pages_and_scanned_pages_is_read_both_ways():
    writer = PdfWriter()
    for data in (makedocs.text_pdf(), makedocs.scanned_pdf()):
        writer.append(PdfReader(io.BytesIO(data)))
    out = io.BytesIO()
    writer.write(out)
    document = documents.extract(out.getvalue(), "application/pdf", LIMITS)
    assert (document.pages, document.images, document.method) == (2, 1, "text+ocr")
    assert document.text.index(makedocs.PROBLEM) < compact(document.text).index("2x+3")


@pytest.mark.parametrize("make, media_type, status, code", [
    (makedocs.encrypted_pdf, "application/pdf", 422, "encrypted_pdf"),
    (makedocs.broken_pdf, "application/pdf", 422, "invalid_pdf"),
    (lambda: makedocs.text_pdf(pages=4), "application/pdf", 413, "too_many_pages"),
    (makedocs.pixel_bomb, "image/png", 413, "image_too_large"),
    (lambda: makedocs.pixel_bomb(30000), "image/png", 413, "image_too_large"),  # past Pillow's own guard too
    (makedocs.blank_png, "image/png", 422, "empty_document"),
    (lambda: makedocs.png()[:200], "image/png", 422, "invalid_image"),
    (lambda: makedocs.encoded(makedocs.image(size=(400, 200)).crop((0, 0, 1, 1)), "PDF"), "application/pdf", 422,
     "empty_document"),
])
def test_bad_documents_get_a_precise_error(make, media_type, status, code):
    with pytest.raises(DocumentError) as refused:
        documents.extract(make(), media_type, LIMITS)
    crossed = documents.REFUSALS[refused.value.kind](refused.value.message, refused.value.code)  # in the worker
    assert (status_of(crossed), refused.value.code) == (status, code), refused.value.message


def test_the_pixel_bomb_is_refused_from_its_header_without_being_decoded():
    bomb = makedocs.pixel_bomb()
    assert len(bomb) < 2000
    with pytest.raises(DocumentError, match="12000x12000 pixels; the limit is 20000000"):
        documents.extract(bomb, "image/png", LIMITS)


def test_ocr_boxes_become_lines_in_reading_order():
    def box(left, top, width, height, text):
        return [[left, top], [left + width, top], [left + width, top + height], [left, top + height]], text, 0.9
    found = [box(300, 12, 80, 30, "= 11"), box(10, 100, 200, 30, "second"), box(10, 10, 250, 34, "Solve 2x + 3"),
             box(220, 104, 90, 28, "line")]
    assert [[text for _, text in line] for line in extraction.lines(found)] == [
        ["Solve 2x + 3", "= 11"], ["second", "line"]]


def test_the_reading_pool_reads_kills_a_slow_reading_and_goes_on():
    reader = documents.Reader(LIMITS, workers=1)
    try:
        read = reader.read(makedocs.scanned_pdf(), "application/pdf", "file")
        assert read.method == "ocr" and read.seconds > 0
        with pytest.raises(Refusal) as slow:  # far less than its reading takes (seconds: an OCR of a small PNG
            # can end within the pool's 0.1 s look at its timeouts, and then counts as read)
            reader.read(makedocs.slow_pdf(), "application/pdf", "file", timeout_s=0.001)
        assert (status_of(slow.value), slow.value.code) == (422, "document_too_slow")
        with pytest.raises(Refusal) as bad:  # the error crosses from the reading process with its status
            reader.read(makedocs.encrypted_pdf(), "application/pdf", "file")
        assert (status_of(bad.value), bad.value.code, bad.value.param) == (422, "encrypted_pdf", "file")
        assert compact(reader.read(makedocs.png(), "image/png", "file").text) == compact(makedocs.EQUATION)
    finally:
        reader.close()


def test_a_full_reading_pool_refuses_with_503_rather_than_queueing():
    reader = documents.Reader(LIMITS, workers=1)
    outcomes, start = [], threading.Barrier(9)

    def read():
        start.wait()
        try:
            reader.read(makedocs.png(), "image/png", "file")
            outcomes.append(200)
        except Refusal as exc:
            outcomes.append((status_of(exc), exc.code))
    threads = [threading.Thread(target=read) for _ in range(9)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        reader.close()
    capacity = 1 + documents.WAITING_PER_WORKER
    assert outcomes.count(200) == capacity and outcomes.count((503, "documents_busy")) == 9 - capacity


@pytest.mark.parametrize("text, script", [
    ("What is 2 + 2? Show your steps.", None),
    ("x = 3", None),  # too few letters to say
    ("Найдите все действительные корни уравнения x^2 - 5x + 6 = 0.", "Cyrillic"),
    ("求解方程 2x + 3 = 11 的所有实数解，并说明理由。", "Chinese (Han)"),
    ("次の方程式を解きなさい: 2x + 3 = 11 です。ひらがなとカタカナ", "Japanese"),
    ("방정식 2x + 3 = 11 을 풀어라 그리고 설명하라", "Korean"),
    ("Solve for α and β: α + β = 3, α − β = 1, then give α·β.", None),  # Greek letters in English math
    ("حل المعادلة التالية من فضلك", "Arabic"),
])
def test_the_english_hint_names_the_script_of_a_mostly_non_latin_question(text, script):
    hint = english_hint(text)
    if script is None:
        assert hint is None
    else:
        assert f"mostly in {script} script" in hint and "English" in hint and hint.isascii()


def test_turns_are_fair_between_users_and_a_full_pool_waits_briefly():
    gate, order = fairness.Gate(processes=1, waiting=4), []
    gate.turn("attacker", 1)  # the attacker's first document reads

    def second(user, name):
        gate.turn(user, 10)
        order.append(name)
    late = [threading.Thread(target=second, args=("attacker", "attacker 2"))]
    late[0].start()
    time.sleep(0.2)  # the attacker's second waits first...
    late.append(threading.Thread(target=second, args=("other", "other 1")))
    late[1].start()
    time.sleep(0.2)
    with pytest.raises(fairness.Busy):  # ...a full pool refuses after the wait
        gate.turn("third", 0.1)
    gate.done("attacker")
    late[1].join(5)
    assert order == ["other 1"]  # ...yet another user's first goes before it
    gate.done("other")
    late[0].join(5)
    assert order == ["other 1", "attacker 2"] and gate.holding() == {"attacker": 1}


def test_one_user_never_holds_the_whole_pool():
    gate = fairness.Gate(processes=2, waiting=4)
    gate.turn("attacker", 1)
    with pytest.raises(fairness.Busy):  # a process is free, but it is not the attacker's share
        gate.turn("attacker", 0.2)
    gate.turn("other", 0.2)  # at once
    assert gate.holding() == {"attacker": 1, "other": 1}


@pytest.fixture(scope="module")
def lone_reader():
    """A reading pool of one process, shared by the tests that look inside it."""
    reader = documents.Reader(LIMITS, workers=1)
    yield reader
    reader.close()


def test_a_reading_process_has_a_memory_cap_a_bare_environment_and_none_of_the_workers_files(lone_reader,
                                                                                              tmp_path):
    assert lone_reader.read(makedocs.png(), "image/png", "file").method == "ocr"  # OCR fits under the cap
    lone_reader.close()  # its next process starts while the worker holds a secret and a file
    os.environ["VIBE_PROBE_SECRET"] = "not for readers"
    try:
        with open(tmp_path / "worker-file", "w"):
            seen = lone_reader._processes.pool().schedule(probe.inside).result(30)
    finally:
        del os.environ["VIBE_PROBE_SECRET"]
    assert seen["address_space"] == LIMITS.max_memory
    assert set(seen["environ"]) - {"QT_QPA_PLATFORM_PLUGIN_PATH", "QT_QPA_FONTDIR", "LD_LIBRARY_PATH"} == \
        set(processes.BARE_ENV)  # OpenCV sets its own three when it is imported
    assert not [name for name in seen["files"] if "worker-file" in name or name.endswith(".db")
                and "onnxruntime" not in name]


@pytest.fixture(scope="module")
def bomb_reader():
    """A reading pool of one process that reads nothing but bombs: its peak memory is theirs."""
    reader = documents.Reader(LIMITS, workers=1)
    yield reader
    reader.close()


@pytest.mark.parametrize("bomb", [makedocs.jpeg_in_pdf_bomb, makedocs.png_in_pdf_bomb, makedocs.smask_in_pdf_bomb])
def test_an_image_bomb_inside_a_pdf_is_refused_by_its_own_header_without_swelling_the_reader(bomb_reader, bomb):
    data = bomb()
    assert len(data) < 1_000_000  # under a megabyte; 8600 x 8600 pixels decoded
    with pytest.raises(Refusal) as refused:
        bomb_reader.read(data, "application/pdf", "file")
    assert (status_of(refused.value), refused.value.code) == (413, "image_too_large")
    assert "8600x8600" in refused.value.message
    peak = bomb_reader._processes.pool().schedule(extraction.peak_memory).result(30)
    # Measured in the reader: far under its cap, and under the one grey plane the bomb decodes to.
    assert peak < LIMITS.max_memory and peak < 8600 * 8600


def test_past_the_pixel_check_the_memory_cap_ends_a_bomb_as_a_413():
    """With the pixel limit raised past the bomb, decoding it needs more than the reader's cap: MemoryError in
    the reader, a precise 413 in the worker, and the reader's memory stays under its cap."""
    capped = dataclasses.replace(LIMITS, max_pixels=400_000_000, max_memory=512 * 2**20)
    reader = documents.Reader(capped, workers=1)
    try:
        with pytest.raises(Refusal) as refused:
            reader.read(makedocs.jpeg_in_pdf_bomb(side=12000), "application/pdf", "file")
        assert (status_of(refused.value), refused.value.code) == (413, "document_too_large")
        assert reader._processes.pool().schedule(extraction.peak_memory).result(30) < capped.max_memory
    finally:
        reader.close()


def test_a_reader_of_its_own_behind_a_socket_reads_one_document_per_connection(tmp_path):
    """What systemd does with vibethinker-reader.socket (Accept=yes), done by systemd-socket-activate: each
    connection starts `python -m service.inputs.reader` on it."""
    sock = tmp_path / "reader.sock"
    activator = subprocess.Popen(["systemd-socket-activate", "-l", str(sock), "--inetd", "-a", sys.executable,
                                  "-m", "service.inputs.reader"], cwd=ROOT, stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):
            if sock.exists():
                break
            time.sleep(0.1)
        reader = documents.Reader(LIMITS, workers=1, socket_path=str(sock))
        read = reader.read(makedocs.text_pdf(), "application/pdf", "file")
        assert (read.kind, read.method, makedocs.PROBLEM in read.text) == ("pdf", "text", True)
        for data, status, code in [(makedocs.encrypted_pdf(), 422, "encrypted_pdf"),
                                   (makedocs.jpeg_in_pdf_bomb(), 413, "image_too_large")]:
            with pytest.raises(Refusal) as refused:
                reader.read(data, "application/pdf", "file")
            assert (status_of(refused.value), refused.value.code) == (status, code)
    finally:
        activator.terminate()
        activator.wait(10)


GOOD = {"kind": "pdf", "pages": 1, "images": 0, "method": "text", "text": "x = 3", "seconds": 0.1}


@pytest.mark.parametrize("raw", [
    b"", b"{}\n", b"[]\n", b"not json\n", b'{"document": {"kind": "pdf"}}\n',  # nothing, or not a reply
    json.dumps({"document": {**GOOD, "kind": "x" * 40}}).encode() + b"\n",  # would become a metric label
    json.dumps({"document": {**GOOD, "pages": -1}}).encode() + b"\n",
    json.dumps({"document": {**GOOD, "extra": 1}}).encode() + b"\n",
    json.dumps({"document": GOOD}).encode(),  # no newline: the reader died mid-reply
    json.dumps({"error": ["too_large", "document_too_large"]}).encode() + b"\n",
    json.dumps({"error": ["no_such_kind", "x", "y"]}).encode() + b"\n",
    json.dumps({"error": ["unreadable", "bad code!", "y"]}).encode() + b"\n",
    json.dumps({"document": GOOD, "error": ["unreadable", "x", "y"]}).encode() + b"\n",
])
def test_a_readers_reply_is_taken_only_in_its_exact_shape(raw):
    with pytest.raises(Refusal) as refused:
        documents._answer(raw, "file", Limits(1, 1, 1, 1.0))
    assert status_of(refused.value) == 422 and refused.value.code == "unreadable_document"


def test_a_readers_good_reply_and_refusal_are_taken():
    assert documents._answer(json.dumps({"document": GOOD}).encode() + b"\n", "file", Limits(1, 1, 1, 1.0)).text \
        == "x = 3"
    with pytest.raises(Refusal) as refused:
        documents._answer(json.dumps({"error": ["too_large", "image_too_large", "too big"]}).encode() + b"\n",
                          "file", Limits(1, 1, 1, 1.0))
    assert (status_of(refused.value), refused.value.code) == (413, "image_too_large")


def test_a_reply_past_its_size_or_time_is_cut():
    import socket

    ours, theirs = socket.socketpair()
    with ours, theirs:
        def send():
            try:
                theirs.sendall(b"x" * (documents.MAX_REPLY + 70_000))
            except OSError:  # cut off, as it should be
                pass

        flood = threading.Thread(target=send, daemon=True)
        flood.start()  # a reader that never ends its line
        with pytest.raises(ValueError):
            documents._reply(ours, time.monotonic() + 30)
        ours.shutdown(socket.SHUT_RDWR)
        flood.join(5)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(b"{")  # then nothing: a reader that trickles
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            documents._reply(ours, time.monotonic() + 0.3)
        assert time.monotonic() - started < 3
