"""Documents as questions over real gunicorn (and nginx): the text read from a PDF or an image reaches the model,
bad documents get precise errors and cost nothing, reading runs beside generation, and the English hint."""

import json
import os
import re
import shutil
import socket
import sqlite3
import tempfile
import threading
import time
from pathlib import Path

import openai
import pytest
import requests

from service.settings import Settings
from tests.support import makedocs
from tests.support.batches import jsonl, wait
from tests.support.nginx import Nginx, make_certificate, render
from tests.support.servers import free_port

pytestmark = pytest.mark.slow
MODEL = "VibeThinker-1.5B"
MAX_DOCUMENT = 300_000
BANNED = "forbidden theorem"
LIMITS = {"VIBE_DOCUMENT_MAX_BYTES": str(MAX_DOCUMENT), "VIBE_DOCUMENT_MAX_PAGES": "3"}


@pytest.fixture(scope="module")
def docs(start_server, tmp_path_factory):
    policy = tmp_path_factory.mktemp("policy") / "policy.toml"
    policy.write_text(f'[[rule]]\nid = "banned"\nterms = ["{BANNED}"]\n')
    return start_server(VIBE_CONTENT_POLICY_PATH=str(policy), **LIMITS)


def ask(server, files=None, token=None, **fields):
    """POST /v1/predict as a multipart form (what curl -F sends), fields and files alike as its parts."""
    parts = [(name, (None, value)) for name, value in {"temperature": "0", "max_new_tokens": "8", **fields}.items()]
    parts += list(files.items()) if isinstance(files, dict) else list(files or [])
    return requests.post(server.url("/v1/predict"), files=parts, headers=server.auth(token), timeout=120)


def ask_json(server, question, token=None):
    return server.post("/v1/predict", {"question": question, "temperature": 0, "max_new_tokens": 8}, token=token)


def compact(text):
    return "".join(text.split())


def usage_rows(server):
    with sqlite3.connect(server.env["VIBE_DB_URL"].removeprefix("sqlite:///")) as conn:
        return conn.execute("SELECT route, status, prompt_tokens, document_pages, document_images, document_ms "
                            "FROM usage ORDER BY id").fetchall()


def test_a_pdf_is_read_and_the_model_sees_its_text_then_the_question(docs):
    pdf = makedocs.text_pdf(makedocs.PROBLEM, "Show each step.")
    answer = ask(docs, {"file": ("problem.pdf", pdf, "application/pdf")}, question="Answer briefly.")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["document"]["kind"] == "pdf" and body["document"]["pages"] == 1
    assert body["document"]["method"] == "text" and body["document"]["chars"] == len(body["document"]["text"])
    assert makedocs.PROBLEM in body["document"]["text"] and body["input"] == "Answer briefly."
    timing = dict(entry.split(";dur=") for entry in answer.headers["Server-Timing"].split(", "))
    assert float(timing["documents"]) > 0  # reading it is a phase of its own, apart from the template's
    # Exactly what the model saw: the same text typed gives the same prompt and the same greedy answer.
    typed = ask_json(docs, f"{body['document']['text']}\n\nAnswer briefly.").json()
    assert typed["usage"]["prompt_tokens"] == body["usage"]["prompt_tokens"]
    assert typed["response"] == body["response"]
    assert ask_json(docs, "Answer briefly.").json()["usage"]["prompt_tokens"] < body["usage"]["prompt_tokens"]
    route, status, _, pages, images, ms = usage_rows(docs)[-3]
    assert (route, status, pages, images) == ("/v1/predict", 200, 1, 0) and ms >= 0


@pytest.mark.parametrize("name, make, media_type, kind", [
    ("scan.pdf", makedocs.scanned_pdf, "application/pdf", "pdf"),
    ("equation.png", makedocs.png, "image/png", "image"),
    ("equation.jpg", lambda: makedocs.encoded(makedocs.image(), "JPEG"), "image/jpeg", "image"),
    ("equation.webp", lambda: makedocs.encoded(makedocs.image(), "WEBP"), "image/webp", "image"),
    # curl's type for a name it does not know: the bytes say what it is
    ("equation", makedocs.png, "application/octet-stream", "image"),
])
def test_a_scan_or_a_photo_is_read_by_ocr_without_a_question(docs, name, make, media_type, kind):
    answer = ask(docs, {"file": (name, make(), media_type)})
    assert answer.status_code == 200, answer.text
    document = answer.json()["document"]
    assert (document["kind"], document["method"], document["pages"]) == (kind, "ocr", 1)
    assert compact(document["text"]) == compact(makedocs.EQUATION)
    assert answer.json()["input"] == ""
    first, again = answer.json()["usage"], ask_json(docs, document["text"]).json()["usage"]
    assert again["cached_tokens"] >= max(first["cached_tokens"], 64)  # the same prompt: read from the prefix
    for usage in (first, again):  # cache, and the rest counted the same
        del usage["cached_tokens"], usage["prompt_tokens_details"]
    assert again == first
    assert usage_rows(docs)[-2][3:5] == ((1, 1) if kind == "pdf" else (0, 1))


def test_chat_takes_image_and_file_parts_as_the_openai_client_sends_them(docs):
    client = openai.OpenAI(base_url=docs.url("/v1"), api_key=docs.token, max_retries=0, timeout=120)
    image = {"type": "image_url", "image_url": {"url": makedocs.data_url(makedocs.png(), "image/png")}}
    pdf = {"type": "file", "file": {"filename": "problem.pdf",
                                    "file_data": makedocs.data_url(makedocs.text_pdf(), "application/pdf")}}
    sent = [{"role": "user", "content": [{"type": "text", "text": "Solve both:"}, image, pdf]}]
    answer = client.chat.completions.create(model=MODEL, messages=sent, max_tokens=6, temperature=0)
    read = client.chat.completions.create(
        model=MODEL, max_tokens=6, temperature=0,
        messages=[{"role": "user", "content": f"Solve both:\n\n{makedocs.EQUATION}\n\n{makedocs.PROBLEM}"}])
    assert answer.usage.prompt_tokens == read.usage.prompt_tokens
    assert answer.choices[0].message.content == read.choices[0].message.content


# Refusals that come after a document was read (admitted first, since issue 31): their usage row has the reading.
READ_BEFORE_REFUSED = {"encrypted_pdf", "invalid_pdf", "too_many_pages", "image_too_large", "empty_document",
                       "content_policy"}


@pytest.mark.parametrize("files, fields, status, code, param", [
    ({"file": ("a.txt", b"just text", "text/plain")}, {}, 415, "unsupported_media_type", "file"),
    ({"file": ("a.pdf", makedocs.png(), "application/pdf")}, {}, 415, "file_type_mismatch", "file"),
    ({"file": ("a.pdf", makedocs.encrypted_pdf(), "application/pdf")}, {}, 422, "encrypted_pdf", "file"),
    ({"file": ("a.pdf", makedocs.broken_pdf(), "application/pdf")}, {}, 422, "invalid_pdf", "file"),
    ({"file": ("a.pdf", makedocs.text_pdf(pages=4), "application/pdf")}, {}, 413, "too_many_pages", "file"),
    ({"file": ("bomb.png", makedocs.pixel_bomb(), "image/png")}, {}, 413, "image_too_large", "file"),
    ({"file": ("blank.png", makedocs.blank_png(), "image/png")}, {}, 422, "empty_document", "file"),
    ({"file": ("big.pdf", b"%PDF-" + b"0" * MAX_DOCUMENT, "application/pdf")}, {}, 413, "document_too_large", "file"),
    ([("file", ("a.png", makedocs.png(), "image/png")), ("file", ("b.png", makedocs.png(), "image/png"))], {}, 400,
     "too_many_documents", "file"),
    ({"attachment": ("a.png", makedocs.png(), "image/png")}, {"question": "q"}, 400, "unknown_field", "attachment"),
    (None, {"question": "q", "max_new_tokens": "eight"}, 400, "invalid_type", "max_new_tokens"),
    (None, {"question": "q", "temperature": "nan"}, 400, "invalid_type", "temperature"),
    (None, {"system_prompt": "be brief"}, 400, "missing", "question"),
    (None, {"question": "q", "file": "problem.pdf"}, 400, "invalid_type", "file"),
    ({"file": ("a.pdf", makedocs.text_pdf(f"Prove the {BANNED}."), "application/pdf")}, {}, 422, "content_policy",
     "file"),
])
def test_bad_documents_get_a_precise_error_and_cost_nothing(docs, files, fields, status, code, param):
    before = usage_rows(docs)
    refused = ask(docs, files, **fields)
    assert refused.status_code == status, refused.text
    error = refused.json()["error"]
    assert (error["code"], error["param"]) == (code, param) and error["message"] and error["type"]
    assert refused.json()["success"] is False  # /predict's own contract beside the error
    after = usage_rows(docs)
    if code in READ_BEFORE_REFUSED:  # admitted, then read: a row with its reading time, and no tokens
        assert after[:-1] == before and after[-1][:3] == ("/v1/predict", status, 0)
    else:  # refused before admission: no row at all
        assert after == before


@pytest.mark.parametrize("part, status, code", [
    ({"type": "image_url", "image_url": {"url": "https://example.com/problem.png"}}, 400, "unsupported_url"),
    ({"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/secret"}}, 400, "unsupported_url"),
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}, 400, "invalid_data_url"),
    ({"type": "image_url", "image_url": {"url": makedocs.data_url(makedocs.png(), "image/gif")}}, 415,
     "unsupported_media_type"),
    ({"type": "file", "file": {"file_id": "file-abc"}}, 400, "unsupported_value"),
    ({"type": "file", "file": {"filename": "a.pdf"}}, 400, "missing"),
    ({"type": "input_audio", "input_audio": {}}, 400, "invalid_value"),
    ({"type": "file", "file": {"file_data": makedocs.data_url(makedocs.broken_pdf(), "application/pdf")}}, 422,
     "invalid_pdf"),
])
def test_bad_chat_parts_get_a_precise_error(docs, part, status, code):
    refused = docs.post("/v1/chat/completions", {"model": MODEL, "max_tokens": 4, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Read this:"}, part]}]})
    assert refused.status_code == status, refused.text
    assert refused.json()["error"]["code"] == code
    assert refused.json()["error"]["param"].startswith("messages.0.content.1")


def test_only_a_users_message_may_hold_a_document(docs):
    image = {"type": "image_url", "image_url": {"url": makedocs.data_url(makedocs.png(), "image/png")}}
    refused = docs.post("/v1/chat/completions", {"model": MODEL, "max_tokens": 4, "messages": [
        {"role": "system", "content": [image]}, {"role": "user", "content": "hi"}]})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "messages.0.content.0"


def test_too_many_documents_in_one_conversation(docs):
    image = {"type": "image_url", "image_url": {"url": makedocs.data_url(makedocs.png(), "image/png")}}
    refused = docs.post("/v1/chat/completions", {"model": MODEL, "max_tokens": 4, "messages": [
        {"role": "user", "content": [image] * 5}]})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "too_many_documents"
    assert refused.json()["error"]["param"] == "messages.0.content.4.image_url"


def test_reading_a_slow_document_does_not_stall_other_requests(docs):
    page = makedocs.image("\n".join(f"Line {i}: add {i} and {i + 1}, then double it." for i in range(24)),
                          size=(1400, 1800))
    slow_pdf = makedocs.encoded(page, "PDF")  # seconds of OCR, under the byte limit
    assert len(slow_pdf) < MAX_DOCUMENT
    order, reading = [], threading.Event()

    def read_it():
        reading.set()
        response = ask(docs, {"file": ("long.pdf", slow_pdf, "application/pdf")})
        order.append(("document", response.status_code))
    thread = threading.Thread(target=read_it)
    thread.start()
    reading.wait()
    plain = docs.post("/v1/predict", {"question": "What is 1 + 1?", "max_new_tokens": 2})
    order.append(("plain", plain.status_code))
    thread.join(120)
    assert order == [("plain", 200), ("document", 200)]


def test_the_log_has_document_counts_and_never_document_text(docs):
    ask(docs, {"file": ("problem.pdf", makedocs.text_pdf("Secret exam question 42: integrate x."),
                        "application/pdf")})
    log = docs.log()
    assert "Secret exam question" not in log and "integrate x" not in log and BANNED not in log
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{") and '"document_pages"' in line]
    assert lines and lines[-1]["documents"] == 1 and lines[-1]["document_pages"] == 1


def test_metrics_count_documents_by_kind_and_method(docs):
    ask(docs, {"file": ("problem.pdf", makedocs.text_pdf(), "application/pdf")})
    text = requests.get(docs.url("/metrics"), timeout=30).text
    assert re.search(r'vibethinker_documents_total\{kind="pdf",method="text"\} [1-9]', text)
    assert re.search(r'vibethinker_document_read_seconds_count\{kind="pdf"\} [1-9]', text)


@pytest.mark.parametrize("question, hinted", [
    ("What is the sum of the first ten odd numbers?", False),
    ("Какова сумма первых десяти нечётных чисел?", True),
    ("前十个奇数的和是多少？请一步一步地推理。", True),
])
def test_the_english_hint(docs, question, hinted):
    answer = ask_json(docs, question)
    assert answer.status_code == 200
    assert ("x-vibethinker-hint" in answer.headers) is hinted
    assert (answer.json()["hint"] is not None) is hinted
    if hinted:
        assert answer.headers["x-vibethinker-hint"] == answer.json()["hint"] and "English" in answer.json()["hint"]
    chat = docs.post("/v1/chat/completions", {"model": MODEL, "max_tokens": 2,
                                              "messages": [{"role": "user", "content": question}]})
    assert ("x-vibethinker-hint" in chat.headers) is hinted


def test_the_hint_holds_for_a_question_read_from_a_document(docs):
    english = makedocs.text_pdf(makedocs.PROBLEM, "Show each step, then check the answer by substitution.")
    answer = ask(docs, {"file": ("p.pdf", english, "application/pdf")}, question="Решите.")
    assert answer.status_code == 200 and answer.json()["hint"] is None  # mostly Latin letters, all told
    answer = ask(docs, {"file": ("p.png", makedocs.png(), "image/png")},
                 question="Решите это уравнение, подробно объясните каждый шаг и проверьте ответ подстановкой.")
    assert answer.status_code == 200 and "Cyrillic" in answer.json()["hint"]
    assert answer.headers["x-vibethinker-hint"] == answer.json()["hint"]


def test_batch_lines_read_their_documents_when_the_batch_is_created(docs):
    client = openai.OpenAI(base_url=docs.url("/v1"), api_key=docs.token, max_retries=0, timeout=120)
    image = {"type": "image_url", "image_url": {"url": makedocs.data_url(makedocs.png(), "image/png")}}

    def line(i, part):
        return {"custom_id": f"doc-{i}", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": MODEL, "max_tokens": 4, "temperature": 0,
                         "messages": [{"role": "user", "content": [{"type": "text", "text": "Solve:"}, part]}]}}
    count = 5  # more lines with a document than one request may hold: each line has a request's limits
    good = client.files.create(file=("docs.jsonl", jsonl([line(i, image) for i in range(count)])), purpose="batch")
    batch = client.batches.create(input_file_id=good.id, endpoint="/v1/chat/completions", completion_window="24h")
    done, _ = wait(client, batch.id)
    assert done.status == "completed" and done.request_counts.completed == count
    outs = [json.loads(text) for text in client.files.content(done.output_file_id).text.splitlines()]
    typed = client.chat.completions.create(model=MODEL, max_tokens=4, temperature=0, messages=[
        {"role": "user", "content": f"Solve:\n\n{makedocs.EQUATION}"}])
    assert {out["response"]["body"]["usage"]["prompt_tokens"] for out in outs} == {typed.usage.prompt_tokens}
    lines_read = [row for row in usage_rows(docs) if row[0] == "/v1/batches"][-count:]
    assert len(lines_read) == count and {row[4] for row in lines_read} == {1}  # each line's row: its image
    bad = {"type": "file", "file": {"file_data": makedocs.data_url(makedocs.encrypted_pdf(), "application/pdf")}}
    refused = client.files.create(file=("bad.jsonl", jsonl([line(1, image), line(2, bad)])), purpose="batch")
    failed = client.batches.create(input_file_id=refused.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert failed.status == "failed"
    assert [(e.code, e.line) for e in failed.errors.data] == [("encrypted_pdf", 2)]


def test_a_document_past_its_time_limit_is_stopped_and_the_worker_goes_on(start_server):
    server = start_server(VIBE_DOCUMENT_TIMEOUT_S="0.01", **LIMITS)
    refused = ask(server, {"file": ("scan.pdf", makedocs.scanned_pdf(), "application/pdf")})
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "document_too_slow"
    assert "within 0.01 s" in refused.json()["error"]["message"]
    assert ask_json(server, "What is 2 + 2?").status_code == 200


def test_without_its_ocr_a_server_still_reads_text_pdfs_and_says_why_not_images(start_server, tmp_path):
    # The OCR package made unimportable, as where it is not installed (Python 3.13) or OpenCV lacks libGL.
    (tmp_path / "rapidocr_onnxruntime").mkdir()
    (tmp_path / "rapidocr_onnxruntime" / "__init__.py").write_text('raise ImportError("libGL.so.1: cannot open")\n')
    server = start_server(PYTHONPATH=str(tmp_path), **LIMITS)
    assert ask(server, {"file": ("p.pdf", makedocs.text_pdf(), "application/pdf")}).status_code == 200
    refused = ask(server, {"file": ("p.png", makedocs.png(), "image/png")})
    assert refused.status_code == 501 and refused.json()["error"]["code"] == "ocr_unavailable"
    assert "libGL.so.1" in refused.json()["error"]["message"] and "text layer" in refused.json()["error"]["message"]


@pytest.fixture(scope="module")
def front(start_server):
    """nginx in front of a server, rendered with the service's own document body limit."""
    folder = Path(tempfile.mkdtemp(prefix="vibethinker-nginx-docs-"))
    os.chmod(folder, 0o755)
    sock = folder / "gunicorn.sock"
    app = start_server(VIBE_BIND=f"unix:{sock}", VIBE_PROXY_FIX_HOPS=1, **LIMITS)
    settings = Settings(document_max_bytes=MAX_DOCUMENT)
    cert, key = make_certificate(folder)
    https_port = free_port()
    site = render(server_name="localhost", http_port=free_port(), https_port=https_port, listen_address="127.0.0.1",
                  socket_path=sock, cert_path=cert, key_path=key, max_body_bytes=settings.max_body_bytes,
                  document_body_bytes=settings.document_body_bytes, proxy_read_timeout_s=90, req_rate="20r/s",
                  req_burst=20, conn_limit=20, metrics_allow=["127.0.0.1"], admin_allow=["127.0.0.1"])
    nginx = Nginx(folder, site)
    nginx.start()
    nginx.app, nginx.cert, nginx.https = app, str(cert), f"https://localhost:{https_port}"
    yield nginx
    nginx.stop()
    shutil.rmtree(folder, ignore_errors=True)


def test_through_nginx_a_document_larger_than_the_json_limit_is_taken(front):
    padded = makedocs.text_pdf_with_picture(noise_side=260)
    assert Settings().max_body_bytes < len(padded) < MAX_DOCUMENT
    headers = front.app.auth()
    answer = requests.post(front.https + "/v1/predict", files={"file": ("p.pdf", padded, "application/pdf")},
                           data={"max_new_tokens": "2"}, headers=headers, verify=front.cert, timeout=120)
    assert answer.status_code == 200, answer.text
    assert makedocs.PROBLEM in answer.json()["document"]["text"]
    body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "file", "file": {"file_data": makedocs.data_url(padded, "application/pdf")}}]}]}
    chat = requests.post(front.https + "/v1/chat/completions", json=body, headers=headers, verify=front.cert,
                         timeout=120)
    assert chat.status_code == 200, chat.text


def test_through_nginx_a_body_past_the_document_limit_gets_the_json_413(front):
    settings = Settings(document_max_bytes=MAX_DOCUMENT)
    huge = b"%PDF-" + b"0" * (settings.document_body_bytes + 1000)
    refused = requests.post(front.https + "/v1/predict", files={"file": ("p.pdf", huge, "application/pdf")},
                            headers=front.app.auth(), verify=front.cert, timeout=120)
    assert refused.status_code == 413
    assert refused.json()["error"]["code"] == "body_too_large"
    small = requests.post(front.https + "/v1/models", data=b"x" * (settings.max_body_bytes + 10),
                          headers=front.app.auth(), verify=front.cert, timeout=30)
    assert small.status_code == 413  # elsewhere the small limit holds


@pytest.mark.parametrize("path, content_type, body, token, status", [
    ("/v1/predict", "application/json", b'{"question": "' + b"a" * 200_000 + b'"}', None, 413),  # the JSON limit
    ("/v1/chat/completions", "application/json", b"x" * 1_000_000, "not.a.token", 401),  # refused before reading
    ("/v1/predict", "multipart/form-data; boundary=b", b"x" * 1_000_000, "not.a.token", 401),
])
def test_a_large_body_refused_unread_leaves_the_connection_serving(docs, path, content_type, body, token, status):
    """nginx sends the next request down the same upstream connection: gunicorn alone drains only 64 KiB of an
    unread body and then closes a connection it said it kept, which nginx answers 502 (another client's)."""
    with socket.create_connection(("127.0.0.1", docs.port), timeout=30) as raw:
        raw.sendall(f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: {content_type}\r\n"
                    f"Authorization: Bearer {token or docs.token}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                    + body)
        first = raw.recv(65536)
        assert first.startswith(f"HTTP/1.1 {status} ".encode()), first[:200]
        assert b"Connection: keep-alive" in first
        while b"\r\n\r\n" not in first or len(first.split(b"\r\n\r\n", 1)[1]) < int(
                re.search(rb"Content-Length: (\d+)", first).group(1)):
            first += raw.recv(65536)
        raw.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        second = raw.recv(65536)
    assert second.startswith(b"HTTP/1.1 200 "), second[:200]


def test_a_chunked_body_with_a_document_has_the_document_allowance(docs):
    """A body sent chunked (no Content-Length) is held to the route's limit too, not the small JSON one."""
    padded = makedocs.text_pdf_with_picture(noise_side=260)
    body = json.dumps({"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "file", "file": {"file_data": makedocs.data_url(padded, "application/pdf")}}]}]}).encode()
    assert len(body) > Settings().max_body_bytes

    def chunks():
        for start in range(0, len(body), 65536):
            yield body[start:start + 65536]
    answer = requests.post(docs.url("/v1/chat/completions"), data=chunks(), timeout=120,
                           headers={**docs.auth(), "Content-Type": "application/json"})
    assert answer.status_code == 200, answer.text
    too_big = b"x" * (Settings(document_max_bytes=MAX_DOCUMENT).document_body_bytes + 10)
    refused = requests.post(docs.url("/v1/chat/completions"), data=iter([too_big]), timeout=120,
                            headers={**docs.auth(), "Content-Type": "application/json"})
    assert refused.status_code == 413 and refused.json()["error"]["code"] == "body_too_large"


def test_five_slow_pdfs_from_a_user_capped_at_two_are_admitted_before_reading_and_fairly(start_server):
    """The issue's attack: five concurrent predict forms, each a small PDF whose pages share one slow content
    stream, from a user capped at 2 requests at a time, on a pool of two reading processes."""
    # 8 s: the other user's whole request (a reading process started, the PDF read, an answer) fits inside the
    # attacker's reading time even on a slow machine; the slow PDF needs far longer (seconds a page).
    server = start_server(VIBE_DOCUMENT_TIMEOUT_S="8", VIBE_DOCUMENT_WORKERS="2", **LIMITS)
    server.cli("users", "add", "attacker", "--max-concurrent", "2", "--rate-limit", "1000/minute")
    attacker = server.cli("tokens", "issue", "attacker").stdout.strip().splitlines()[-1]
    slow, outcomes, start = makedocs.slow_pdf(pages=3), [], threading.Barrier(6)

    def attack():
        start.wait()
        began = time.monotonic()
        refused = ask(server, {"file": ("slow.pdf", slow, "application/pdf")}, token=attacker)
        outcomes.append((refused.status_code, refused.json()["error"]["code"], time.monotonic() - began))
    threads = [threading.Thread(target=attack) for _ in range(5)]
    for thread in threads:
        thread.start()
    start.wait()
    time.sleep(0.5)  # the attacker's two admitted documents have their turn, or wait for it
    other = ask(server, {"file": ("problem.pdf", makedocs.text_pdf(), "application/pdf")})
    assert other.status_code == 200, other.text  # the other process was not the attacker's to take
    answered_while_attacked = len(outcomes) == 3  # only the refusals were back yet
    for thread in threads:
        thread.join(60)
    assert answered_while_attacked
    refused = [o for o in outcomes if o[0] == 429]
    assert [o[1] for o in refused] == ["concurrency_limit_exceeded"] * 3
    assert max(o[2] for o in refused) < 2  # before any parsing: a page alone takes seconds
    # The first is stopped at its time limit; the second waited for the attacker's one process meanwhile (the
    # wait counts toward the limit): stopped too, or refused as busy when its wait ran out first.
    admitted = sorted(o[:2] for o in outcomes if o[0] != 429)
    assert admitted[0] == (422, "document_too_slow") and admitted[1] in [(422, "document_too_slow"),
                                                                         (503, "documents_busy")]
    with sqlite3.connect(server.env["VIBE_DB_URL"].removeprefix("sqlite:///")) as conn:
        rows = conn.execute("SELECT status, prompt_tokens, completion_tokens, document_ms FROM usage "
                            "WHERE user = 'attacker'").fetchall()
    assert len(rows) == 2 and all(status in (422, 503) and tokens == [0, 0] and ms >= 2900
                                  for status, *tokens, ms in rows), rows  # the reading time is theirs
