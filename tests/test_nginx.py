"""Real nginx (the rendered template, a certificate made here) in front of real gunicorn on a unix socket."""

import json
import os
import shutil
import socket
import ssl
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from service.settings import Settings
from tests.support.nginx import Nginx, make_certificate, render
from tests.support.servers import free_port

pytestmark = pytest.mark.slow  # real restarts, many CLI calls or long runs: not in make test-quick

MAX_BODY = 65536
CONSOLE_ADDRESS = "127.0.0.2"  # the admins' console's allow-list: not the API's 127.0.0.1
DEADLINE_S = 60


@pytest.fixture(scope="module")
def front(start_server, long_question):
    # Not under pytest's tmp folder: nginx's workers must reach the socket.
    folder = Path(tempfile.mkdtemp(prefix="vibethinker-nginx-"))
    os.chmod(folder, 0o755)
    sock = folder / "gunicorn.sock"
    app = start_server(VIBE_BIND=f"unix:{sock}", VIBE_PROXY_FIX_HOPS=1)
    cert, key = make_certificate(folder)
    http_port, https_port = free_port(), free_port()
    site = render(server_name="localhost", http_port=http_port, https_port=https_port, listen_address="127.0.0.1",
                  socket_path=sock, cert_path=cert, key_path=key, max_body_bytes=MAX_BODY,
                  proxy_read_timeout_s=DEADLINE_S + 30, req_rate="20r/s", req_burst=20, conn_limit=20,
                  metrics_allow=["10.11.12.13"], admin_allow=["127.0.0.1"], console_allow=[CONSOLE_ADDRESS])
    nginx = Nginx(folder, site)
    checked = nginx.test_config()
    assert checked.returncode == 0, checked.stderr
    nginx.start()
    nginx.app, nginx.cert = app, str(cert)
    nginx.https = f"https://localhost:{https_port}"
    nginx.http = f"http://localhost:{http_port}"
    nginx.https_port, nginx.http_port = https_port, http_port
    yield nginx
    nginx.stop()
    shutil.rmtree(folder, ignore_errors=True)


def get(front, path, **kwargs):
    kwargs.setdefault("timeout", 30)
    return requests.get(front.https + path, verify=front.cert, **kwargs)


def test_nginx_t_passes(front):
    result = front.test_config()
    assert result.returncode == 0 and "syntax is ok" in result.stderr


def test_https_works_and_http_redirects(front):
    response = get(front, "/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}
    assert response.headers["Strict-Transport-Security"].startswith("max-age=")
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Cache-Control"] == "no-store"
    assert "nginx/" not in response.headers.get("Server", "")
    redirect = requests.get(front.http + "/healthz?x=1", allow_redirects=False, timeout=10)
    assert redirect.status_code == 301
    assert redirect.headers["Location"] == f"https://localhost:{front.https_port}/healthz?x=1"


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest.mark.parametrize("version,accepted", [(ssl.TLSVersion.TLSv1, False), (ssl.TLSVersion.TLSv1_1, False),
                                              (ssl.TLSVersion.TLSv1_2, True), (ssl.TLSVersion.TLSv1_3, True)])
def test_only_tls_1_2_and_1_3(front, version, accepted):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(front.cert)
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the client offer old versions: the server must refuse
    context.minimum_version = context.maximum_version = version
    with socket.create_connection(("127.0.0.1", front.https_port), timeout=10) as raw:
        if accepted:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                assert tls.version() == {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
        else:
            with pytest.raises(ssl.SSLError):
                context.wrap_socket(raw, server_hostname="localhost")


def test_unknown_host_gets_no_response(front):
    with pytest.raises(requests.ConnectionError):
        requests.get(front.http + "/healthz", headers={"Host": "evil.example"}, timeout=10)
    context = ssl.create_default_context(cafile=front.cert)
    context.check_hostname = False
    with socket.create_connection(("127.0.0.1", front.https_port), timeout=10) as raw:
        with pytest.raises(ssl.SSLError):
            context.wrap_socket(raw, server_hostname="evil.example")


def test_oversize_body_is_413_json(front):
    response = requests.post(front.https + "/predict", data=b"x" * (MAX_BODY + 1), verify=front.cert, timeout=30,
                             headers={**front.app.auth(), "Content-Type": "application/json"})
    assert response.status_code == 413 and response.headers["Content-Type"] == "application/json"
    assert response.json()["error"]["code"] == "body_too_large"


def test_batch_files_may_be_larger_than_any_other_body(front):
    lines = "".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/predict",
                                "body": {"question": "x" * 900, "max_new_tokens": 1}}) + "\n" for i in range(300))
    assert len(lines) > 4 * MAX_BODY
    uploaded = requests.post(front.https + "/v1/files", verify=front.cert, timeout=60, headers=front.app.auth(),
                             files={"file": ("big.jsonl", lines.encode())}, data={"purpose": "batch"})
    assert uploaded.status_code == 200, uploaded.text
    assert uploaded.json()["bytes"] == len(lines.encode())
    refused = requests.post(front.https + "/predict", data=lines.encode(), verify=front.cert, timeout=30,
                            headers={**front.app.auth(), "Content-Type": "application/json"})
    assert refused.status_code == 413 and refused.json()["error"]["code"] == "body_too_large"


@pytest.mark.parametrize("request_bytes, status, code", [
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n", 414, "request_line_too_long"),
    (b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n", 431, "headers_too_large"),
    (b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nBad Header\r\n\r\n", 400, "invalid_http_request"),
])
def test_what_nginx_refuses_itself_is_the_json_error_shape(front, request_bytes, status, code):
    context = ssl.create_default_context(cafile=front.cert)
    with socket.create_connection(("127.0.0.1", front.https_port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as sock:
            sock.sendall(request_bytes)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert int(head.split()[1]) == status and b"application/json" in head
    assert b"Strict-Transport-Security" in head
    assert json.loads(body)["error"]["code"] == code


def test_burst_beyond_limit_req_is_429_json(front):
    with requests.Session() as session:
        statuses = [session.get(front.https + "/healthz", verify=front.cert, timeout=10) for _ in range(60)]
    refused = [r for r in statuses if r.status_code == 429]
    assert refused and refused[0].json()["error"]["type"] == "rate_limit_error"
    assert refused[0].headers["Retry-After"] == "1"
    time.sleep(2)  # let the bucket refill for the other tests


def test_metrics_only_from_allowed_addresses(front):
    refused = get(front, "/metrics")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "address_not_allowed"
    assert get(front, "/admin/users", headers=front.app.auth()).status_code == 200  # 127.0.0.1 is allowed there


class FromAddress(requests.adapters.HTTPAdapter):
    """Connections from a given loopback address (127.0.0.2 is this machine too)."""

    def __init__(self, address):
        self.address = address
        super().__init__()

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, source_address=(self.address, 0), **kwargs)


def test_the_console_has_its_own_allow_list_and_secure_cookies_behind_tls(front):
    refused = get(front, "/admin/console/")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "address_not_allowed"
    assert get(front, "/admin/console/login/link/" + "x" * 43).status_code == 403
    assert get(front, "/admin/console", allow_redirects=False).status_code == 301  # to the page refused above
    site = (front.folder / "site.conf").read_text()
    plain, tls = site.split("location /admin/console/login/link/ {")[1:3]  # the port-80 server's, then TLS's
    assert "access_log off;" in plain.split("}")[0] and "return 301 https://" in plain.split("}")[0]
    assert "access_log off;" in tls.split("}")[0] and f"allow {CONSOLE_ADDRESS};" in tls.split("}")[0]
    with requests.Session() as admin:
        admin.mount("https://", FromAddress(CONSOLE_ADDRESS))
        admin.trust_env = False  # REQUESTS_CA_BUNDLE would win over the session's verify
        admin.verify = front.cert
        moved = admin.get(front.https + "/admin/console", allow_redirects=False, timeout=10)
        assert moved.status_code == 301 and moved.headers["Location"].endswith("/admin/console/")
        page = admin.get(front.https + "/admin/console/", timeout=10)
        assert page.status_code == 401 and "console-link" in page.text  # the sign-in page
        assert page.headers["Cache-Control"] == "no-store" and page.headers["X-Content-Type-Options"] == "nosniff"
        assert page.headers["Strict-Transport-Security"].startswith("max-age=")
        assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
        asset = admin.get(front.https + "/admin/console/static/console.css", timeout=10)
        assert asset.status_code == 200 and asset.headers["Cache-Control"] == "public, max-age=86400"
        # the admin API keeps its own list: the console's address may not call it
        assert admin.get(front.https + "/admin/users", headers=front.app.auth(), timeout=10).status_code == 403
        url = json.loads(front.app.cli("--json", "console-link", "root").stdout)["url"]
        link = urlsplit(url).path
        form = admin.get(front.https + link, timeout=10)
        token = form.text.split('name="csrf_token" value="')[1].split('"')[0]
        done = admin.post(front.https + link, data={"csrf_token": token}, allow_redirects=False, timeout=10)
        assert done.status_code == 303
        cookie = next(c for c in done.raw.headers.getlist("Set-Cookie") if c.startswith("console_session="))
        assert "Secure" in cookie and "SameSite=Strict" in cookie and "HttpOnly" in cookie
        home = admin.get(front.https + "/admin/console/", timeout=10)
        assert home.status_code == 200 and '<span id="signed-in-as">root</span>' in home.text
        signed = json.loads(front.app.cli("--json", "audit", "--action", "console.sign_in", "--limit", "1").stdout)
        assert signed[0]["source"] == CONSOLE_ADDRESS  # the admin's address, as nginx saw it


def test_real_client_ip_and_request_id_reach_the_app(front):
    response = get(front, "/v1/me", headers={**front.app.auth(), "X-Forwarded-For": "6.6.6.6",
                                            "X-Request-ID": "through-nginx-1"})
    assert response.status_code == 200 and response.headers["X-Request-ID"] == "through-nginx-1"
    generated = get(front, "/healthz").headers["X-Request-ID"]
    assert len(generated) == 32
    lines = [json.loads(line) for line in front.app.log().splitlines() if line.startswith("{")]
    [line] = [entry for entry in lines if entry.get("request_id") == "through-nginx-1"]
    assert line["client_ip"] == "127.0.0.1"
    assert any(entry.get("request_id") == generated for entry in lines)  # nginx's id is the app's id


def test_a_stream_arrives_chunk_by_chunk(front, long_question):
    messages = [{"role": "system", "content": Settings().default_system_prompt},
                {"role": "user", "content": long_question}]
    body = {"model": "VibeThinker-1.5B", "messages": messages, "max_tokens": 1500, "temperature": 0, "stream": True}
    started = time.monotonic()
    arrivals = []
    with requests.post(front.https + "/v1/chat/completions", json=body, headers=front.app.auth(), stream=True,
                       verify=front.cert, timeout=60) as response:
        assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith(b"data: {"):
                arrivals.append(time.monotonic() - started)
    total = arrivals[-1]
    assert len(arrivals) > 100 and total > 1.0
    assert arrivals[1] < total / 4  # the first tokens came long before the last: nothing buffered them
