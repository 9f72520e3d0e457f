"""Nobody stops the service from the outside: real nginx, gunicorn and two Redis (counters, cache) on loopback.

Slow bodies cost nginx, never an app thread; a text-only chat body past the JSON limit is refused before any
per-character work; a full cache never touches the limits; a client's request id is kept only when it is sane,
and the id it gets back is the one logged; encoded NULs get the JSON error shape.
"""

import io
import json
import os
import re
import shutil
import socket
import sqlite3
import ssl
import statistics
import tempfile
import threading
import time
from pathlib import Path

import openai
import pytest
import redis as redis_client
import requests

from service.records.requestid import VALID
from tests.support.databases import Redis
from tests.support.nginx import Nginx, make_certificate, render
from tests.support.servers import ROOT, free_port
from tests.support.slowclients import SlowBodies, p99, probe_latencies, slow_requests
from tests.support.tokens import user_token

pytestmark = pytest.mark.slow
MODEL = "VibeThinker-1.5B"
HEALTHY_P99_S = 0.5


@pytest.fixture(scope="module")
def edge(start_server, tmp_path_factory):
    """nginx before gunicorn on a unix socket, counters in one Redis and cached answers in another (evicting)."""
    counters = Redis(tmp_path_factory.mktemp("redis-counters")).start()
    cache = Redis(tmp_path_factory.mktemp("redis-answers"), "--maxmemory-policy", "allkeys-lru").start()
    folder = Path(tempfile.mkdtemp(prefix="vibethinker-edge-"))
    os.chmod(folder, 0o755)
    sock = folder / "gunicorn.sock"
    app = start_server(VIBE_BIND=f"unix:{sock}", VIBE_PROXY_FIX_HOPS=1, VIBE_RATELIMIT_STORAGE_URI=counters.uri,
                       VIBE_CACHE="user", VIBE_CACHE_STORAGE_URI=cache.uri)
    cert, key = make_certificate(folder)
    https_port, http_port = free_port(), free_port()
    site = render(server_name="localhost", http_port=http_port, https_port=https_port, listen_address="127.0.0.1",
                  socket_path=sock, cert_path=cert, key_path=key, max_body_bytes=65536,
                  document_body_bytes=app_settings_document_body(), proxy_read_timeout_s=90, req_rate="1000r/s",
                  req_burst=1000, conn_limit=20, metrics_allow=["127.0.0.1"], admin_allow=["127.0.0.1"])
    nginx = Nginx(folder, site, connections=512).start()
    nginx.app, nginx.port, nginx.http_port, nginx.cert = app, https_port, http_port, str(cert)
    nginx.https = f"https://localhost:{https_port}"
    nginx.counters, nginx.cache = counters, cache
    yield nginx
    nginx.stop()
    app.stop()
    counters.stop()
    cache.stop()
    shutil.rmtree(folder, ignore_errors=True)


def app_settings_document_body():
    from service.settings import Settings

    return Settings().document_body_bytes


def call(edge, method, path, token=None, session=requests, **kwargs):
    headers = {**({"Authorization": f"Bearer {token}"} if token else {}), **kwargs.pop("headers", {})}
    return session.request(method, edge.https + path, headers=headers, verify=edge.cert, timeout=60, **kwargs)


def chat_body(question, max_tokens=4):
    return {"model": MODEL, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0}


def log_lines(edge):
    lines = []
    for line in edge.app.log().splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            pass
    return lines


def usage_row(edge, request_id):
    with sqlite3.connect(edge.app.env["VIBE_DB_URL"].removeprefix("sqlite:///")) as conn:
        return conn.execute("SELECT route, status FROM usage WHERE request_id = ?", (request_id,)).fetchall()


# --- slow bodies ------------------------------------------------------------------------------------------------

def test_a_hundred_slow_bodies_hold_no_app_thread(edge):
    """100 uploads trickling a byte every 2 s, half without a token and half with one, from 50 addresses (the
    app has 8 threads): health and /v1/me stay fast, and nginx keeps every slow connection (nothing refused)."""
    token = user_token(edge.app, "slow-uploader")
    prober = user_token(edge.app, "prober")
    kinds = slow_requests({"Authorization": f"Bearer {token}"})
    slow = SlowBodies(edge.port, kinds, count=100, every_s=2.0, addresses=50, declared=60_000).open()
    try:
        time.sleep(3)  # every header is in, the first bytes trickle
        durations = probe_latencies(edge.https, edge.cert, prober, seconds=8)
        assert slow.alive == 100 and slow.dropped == 0  # held, not refused: the figure is under load
    finally:
        slow.close()
    assert len(durations) >= 20
    assert p99(durations) < HEALTHY_P99_S, sorted(durations)[-5:]


def test_uploads_from_one_address_are_bounded(edge):
    """A fifth slow upload from one address is refused at once (429 JSON); the four others are held."""
    token = user_token(edge.app, "greedy-uploader")
    kinds = [("/v1/files", {"Content-Type": "multipart/form-data; boundary=b", "Authorization": f"Bearer {token}"})]
    slow = SlowBodies(edge.port, kinds, count=4, addresses=1).open()
    try:
        time.sleep(0.5)
        refused = requests.post(edge.https + "/v1/files", files={"file": ("a.jsonl", b"{}\n")},
                                data={"purpose": "batch"}, headers={"Authorization": f"Bearer {token}"},
                                verify=edge.cert, timeout=30)
        # the test client connects from 127.0.0.1, the slow ones from 127.0.0.2: it is not refused
        assert refused.status_code != 429, refused.text
    finally:
        slow.close()
    slow = SlowBodies(edge.port, kinds, count=5, addresses=1).open()
    try:
        time.sleep(1)
        answers = []
        for sock in slow.socks:
            sock.settimeout(0.5)
            try:
                answers.append(sock.recv(4096))
            except TimeoutError:
                answers.append(b"")
        refused = [a for a in answers if a]
        assert len(refused) == 1 and refused[0].startswith(b"HTTP/1.1 429 "), answers
        assert b'"code":"rate_limit_exceeded"' in refused[0]
    finally:
        slow.close()


def test_a_large_body_refused_for_its_token_is_json_and_the_connection_goes_on(edge):
    """nginx has the whole body before the app sees it: the app's 401 comes at once, never nginx's 502, and the
    kept-alive connection serves the next request."""
    with requests.Session() as session:
        for path, files in (("/v1/files", {"file": ("big.jsonl", b"{}\n" * 3_000_000)}),
                            ("/v1/predict", {"file": ("big.pdf", b"%PDF-" + b"0" * 8_000_000)})):
            refused = call(edge, "POST", path, "not.a.token", session=session, files=files)
            assert refused.status_code == 401, refused.text
            assert refused.json()["error"]["code"] == "invalid_token"
            assert call(edge, "GET", "/healthz", session=session).status_code == 200
    [line] = [entry for entry in log_lines(edge) if entry.get("request_id") == refused.headers["X-Request-ID"]]
    assert line["latency_ms"] < 5000  # drained from nginx at socket speed, not at a client's pace


# --- bodies sized before they are cleaned ---------------------------------------------------------------------

def test_a_text_only_chat_body_past_the_json_limit_is_refused_before_any_work(edge):
    """9 MB bodies of text with no document part, four a second: each refused 413 in under 0.2 s of the app's
    time (the log line's latency), another user's latency unmoved."""
    attacker, other = user_token(edge.app, "big-texter"), user_token(edge.app, "bystander")
    huge = json.dumps(chat_body("a" * 9_000_000)).encode()

    def bystander_latencies(count):
        durations = []
        with requests.Session() as session:
            for _ in range(count):
                started = time.monotonic()
                answer = call(edge, "POST", "/v1/chat/completions", other, session=session,
                              json={**chat_body("What is 2+2?", 16), "temperature": 0.7})  # not cached
                durations.append(time.monotonic() - started)
                assert answer.status_code == 200, answer.text
        return durations

    idle = statistics.median(bystander_latencies(15))
    ids, wrong, stop = [], [], threading.Event()

    def flood():
        with requests.Session() as session:
            while not stop.is_set():
                refused = call(edge, "POST", "/v1/chat/completions", attacker, session=session, data=huge,
                               headers={"Content-Type": "application/json"})
                error = refused.json()["error"]
                if refused.status_code != 413 or "without an image or file part" not in error["message"] \
                        or error["code"] != "body_too_large":
                    wrong.append(refused.text[:300])
                ids.append(refused.headers["X-Request-ID"])
                stop.wait(0.25)  # four a second: each once held a thread for 20 s
    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    try:
        time.sleep(0.5)
        busy = statistics.median(bystander_latencies(15))
    finally:
        stop.set()
        flooder.join(timeout=60)
    assert ids and not wrong, wrong[:3]
    spent = [entry["latency_ms"] for entry in log_lines(edge) if entry.get("request_id") in set(ids)]
    assert busy / idle < 2, (busy, idle, spent)
    assert spent and statistics.median(spent) < 200, spent


@pytest.mark.parametrize("form", [
    {"question": "q" * 70_000},  # a form's text fields are held to the JSON limit too
    {"question": "What is 2+2?", "system_prompt": "s" * 40_000, "model": "m" * 30_000},
])
def test_a_predict_forms_text_past_the_json_limit_is_413(edge, form):
    refused = call(edge, "POST", "/v1/predict", edge.app.token, files={"file": ("p.txt", b"hi", "text/plain")},
                   data=form)
    assert refused.status_code == 413, refused.text
    assert "the form's fields beside its file hold 70" in refused.json()["error"]["message"]


def test_a_chat_body_with_a_document_keeps_the_document_allowance_but_not_for_its_text(edge):
    image = "data:image/png;base64," + "A" * 200_000  # not a real image: only its size matters here
    body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "t" * 100_000}, {"type": "image_url", "image_url": {"url": image}}]}]}
    refused = call(edge, "POST", "/v1/chat/completions", edge.app.token, json=body)
    assert refused.status_code == 413, refused.text
    assert "beside its documents' data URLs" in refused.json()["error"]["message"]
    body["messages"][0]["content"][0]["text"] = "What does it say?"
    read = call(edge, "POST", "/v1/chat/completions", edge.app.token, json=body)
    assert read.status_code != 413 and read.json()["error"]["param"].startswith("messages.0.content.1"), read.text


# --- the request id ----------------------------------------------------------------------------------------------

def test_nginx_and_the_app_share_one_request_id_rule():
    template = (ROOT / "nginx" / "vibethinker.conf.j2").read_text()
    assert f'"~^{VALID.pattern}$" $http_x_request_id;' in template


@pytest.mark.parametrize("given, kept", [
    ("client-1.2:3_4", True),
    ("has space", False),
    ("a;b", False),
    ("<script>alert(1)</script>", False),
    ("x" * 129, False),
    ("x" * 128, True),
    ("é", False),
])
def test_a_clients_request_id_is_kept_only_when_sane_and_the_one_returned_is_logged(edge, given, kept):
    answer = call(edge, "POST", "/v1/predict", edge.app.token, json={"question": "hi", "max_new_tokens": 1},
                  headers={"X-Request-ID": given.encode()})
    assert answer.status_code == 200, answer.text
    returned = answer.headers["X-Request-ID"]
    assert (returned == given) is kept and VALID.fullmatch(returned)  # one id (two would be joined by ", ")
    time.sleep(0.2)  # the log line and the usage row are written as the answer leaves
    assert [entry for entry in log_lines(edge) if entry.get("request_id") == returned]
    assert usage_row(edge, returned) == [("/v1/predict", 200)]


@pytest.mark.parametrize("path", ["/metrics%00", "/v1/me%00", "/%00", "/v1/files%00x", "/admin/%00"])
def test_an_encoded_nul_gets_the_json_error_shape(edge, path):
    answer = requests.get(edge.https + path, verify=edge.cert, timeout=30)
    assert answer.status_code == 400, answer.text
    assert answer.headers["Content-Type"].startswith("application/json")
    assert answer.json()["error"]["code"] == "invalid_http_request"
    assert VALID.fullmatch(answer.headers["X-Request-ID"])


@pytest.mark.parametrize("request_bytes, tls_name", [
    (b"GET /v1/me%00 HTTP/1.1\r\nHost: localhost\r\n\r\n", None),  # on plain HTTP: before a Host is read
    (b"GET / HTTP/1.1\r\n\r\n", "localhost"),  # no Host
    (b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n", "localhost"),  # a known name, an unknown Host
    (b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", None),  # plain HTTP on the TLS port
])
def test_what_no_server_of_ours_takes_gets_nothing_not_an_html_page(edge, request_bytes, tls_name):
    """Nothing at all (the unknown host's 444), or the JSON 400: never nginx's HTML page or its version."""
    port = edge.http_port if b"%00" in request_bytes else edge.port
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    if tls_name is not None:
        context = ssl.create_default_context(cafile=edge.cert)
        raw = context.wrap_socket(raw, server_hostname=tls_name)
    with raw:
        raw.sendall(request_bytes)
        try:
            answer = raw.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            answer = b""
    assert answer == b"" or answer.startswith(b"HTTP/1.1 400 ") and b'"invalid_http_request"' in answer, answer
    assert b"<html" not in answer and b"nginx/" not in answer

# --- a full cache never touches the limits -----------------------------------------------------------------------

def test_a_full_cache_evicts_and_the_limits_stay_exact(edge):
    """The cache's Redis a few KB from full: a batch of cacheable lines larger than it evicts old answers, while
    every other user's requests succeed and a rate limit counts exactly."""
    token = user_token(edge.app, "batch-filler")
    assert call(edge, "POST", "/v1/chat/completions", token, json=chat_body("warm", 2)).headers["x-cache"] == "miss"
    answers = redis_client.Redis(unix_socket_path=str(edge.cache.sock))  # the app is connected: room for ~30 entries
    answers.config_set("maxmemory", int(answers.info("memory")["used_memory"]) + 64_000)
    limited = user_token(edge.app, "limited-user", "--rate-limit", "5/minute")
    others = user_token(edge.app, "other-user", "--rate-limit", "10000/minute")
    lines = [{"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": chat_body(f"Question number {i}: what is {i} times {i + 1}?", 160)} for i in range(80)]
    client = openai.OpenAI(base_url=edge.https + "/v1", api_key=token, max_retries=0, timeout=60,
                           http_client=openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=edge.cert)))
    with client:
        uploaded = client.files.create(file=("q.jsonl", io.BytesIO("".join(json.dumps(x) + "\n" for x in lines)
                                                                   .encode())), purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        statuses, deadline = [], time.monotonic() + 180
        while batch.status not in ("completed", "failed") and time.monotonic() < deadline:
            answer = call(edge, "POST", "/v1/chat/completions", others, json=chat_body(f"live {len(statuses)}", 2))
            statuses.append(answer.status_code)
            batch = client.batches.retrieve(batch.id)
            time.sleep(0.2)  # polling has its own limit (VIBE_POLL_RATE_LIMIT, 600/minute): poll as a client would
    assert batch.status == "completed" and batch.request_counts.completed == 80, batch
    assert statuses and set(statuses) == {200}
    assert answers.info("stats")["evicted_keys"] > 0 and answers.dbsize() < 80, answers.dbsize()  # it was full
    limited_statuses = [call(edge, "POST", "/v1/chat/completions", limited, json=chat_body(f"l{i}", 2)).status_code
                        for i in range(7)]
    assert limited_statuses == [200] * 5 + [429] * 2


def test_a_cache_that_refuses_writes_never_fails_a_request(start_server, tmp_path_factory):
    """A cache Redis that is full and will not evict (the old shared setup): answers are still given."""
    counters = Redis(tmp_path_factory.mktemp("redis-c")).start()
    cache = Redis(tmp_path_factory.mktemp("redis-a"), "--maxmemory-policy", "noeviction").start()
    try:
        full = redis_client.Redis(unix_socket_path=str(cache.sock), single_connection_client=True)
        full.set("filler", b"x" * 20_000)
        full.config_set("maxmemory", int(full.info("memory")["used_memory"]) - 1000)  # full: writes are refused
        server = start_server(VIBE_RATELIMIT_STORAGE_URI=counters.uri, VIBE_CACHE="user",
                              VIBE_CACHE_STORAGE_URI=cache.uri)
        body = chat_body("What is 7 * 8?", 6)
        first, second = (server.post("/v1/chat/completions", body) for _ in range(2))
        assert [first.status_code, second.status_code] == [200, 200]
        assert [first.headers["x-cache"], second.headers["x-cache"]] == ["miss", "miss"]
        assert "response cache store failed" in server.log()
        server.stop()
    finally:
        counters.stop()
        cache.stop()


def test_one_storage_for_both_warns_at_start(start_server, tmp_path_factory):
    shared = Redis(tmp_path_factory.mktemp("redis-s")).start()
    try:
        server = start_server(VIBE_RATELIMIT_STORAGE_URI=shared.uri, VIBE_CACHE="user")
        assert "the response cache shares the counters' Redis" in server.log()
        server.stop()
    finally:
        shared.stop()
