"""Console sign-in through an OpenID Connect provider: a real one (npm's oidc-provider, tests/oidc_op/) started
on loopback, and a real gunicorn configured for it. The code flow signs a mapped admin in; a wrong audience,
issuer or nonce, a replayed code or callback, an unmapped or unverified user are refused (and audited); in a
real Chromium the SameSite=Strict session holds on the first page after the provider's redirect back."""

import json
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.support.browser import csp_violations, make_driver, screenshot
from tests.support.servers import free_port

pytestmark = pytest.mark.slow

OP_DIR = Path(__file__).resolve().parent / "oidc_op"
CLIENT_SECRET = "console-test-secret-not-for-production"
CALLBACK = "/admin/console/login/oidc/callback"


@pytest.fixture(scope="module")
def ports():
    return free_port(), free_port()


@pytest.fixture(scope="module")
def provider(ports, tmp_path_factory):
    """The test provider at http://localhost:PORT: another site than the console's 127.0.0.1."""
    console_port, op_port = ports
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is missing: the provider runs on Node.js (nodejs, with npm)")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    if int(version.lstrip("v").split(".")[0]) < 20:
        pytest.fail(f"Node.js {version} is too old for oidc-provider 9 (it needs 20 or later)")
    if not (OP_DIR / "node_modules" / "oidc-provider").is_dir():  # make test installs it; so does this
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--prefer-offline"], cwd=OP_DIR, check=True,
                       capture_output=True, timeout=300)
    log = tmp_path_factory.mktemp("op") / "op.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([node, "op.mjs"], cwd=OP_DIR, stdout=out, stderr=subprocess.STDOUT, env={
            "PATH": "/usr/bin:/bin", "OP_PORT": str(op_port),
            "OP_REDIRECT_URI": f"http://127.0.0.1:{console_port}{CALLBACK}"})
    base = f"http://localhost:{op_port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if requests.get(base + "/.well-known/openid-configuration", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            time.sleep(0.1)
    else:
        proc.kill()
        proc.wait()
        pytest.fail(f"the test provider did not start:\n{log.read_text()}")
    yield base
    proc.terminate()
    proc.wait(timeout=10)


def op_state(provider, **state):
    assert requests.post(provider + "/__test/state", params=state, timeout=5).status_code == 204


@pytest.fixture(autouse=True)
def plain_provider(request):
    """Every test starts with alice signing in, untampered, without the click page."""
    if "provider" in request.fixturenames:
        op_state(request.getfixturevalue("provider"), login_as="alice", tamper="", click="0")


@pytest.fixture(scope="module")
def server(start_server, provider, ports):
    return start_server(VIBE_BIND=f"127.0.0.1:{ports[0]}", VIBE_CONSOLE_URL=f"http://127.0.0.1:{ports[0]}",
                        VIBE_CONSOLE_OIDC_ISSUER=provider,
                        VIBE_CONSOLE_OIDC_CLIENT_ID="console", VIBE_CONSOLE_OIDC_CLIENT_SECRET=CLIENT_SECRET,
                        VIBE_CONSOLE_OIDC_ADMINS=json.dumps({"alice@example.org": "root",
                                                             "mallory@example.org": "nobody-here"}))


def to_callback(server, session):
    """Start a sign-in and follow the provider's redirects until the one back to the console: its URL."""
    response = session.get(server.url("/admin/console/login/oidc/start"), allow_redirects=False, timeout=10)
    for _ in range(10):
        assert response.status_code in (302, 303), (response.status_code, response.text[:300])
        location = requests.compat.urljoin(response.url, response.headers["Location"])
        if location.startswith(server.url(CALLBACK)):
            return location
        response = session.get(location, allow_redirects=False, timeout=10)
    pytest.fail("no redirect back to the console")


def signed_in_as(server, session):
    page = session.get(server.url("/admin/console/"), timeout=10)
    found = page.status_code == 200 and '<span id="signed-in-as">' in page.text
    return page.text.split('<span id="signed-in-as">')[1].split("<")[0] if found else None


def refused(response, words, server=None, reason=None):
    assert response.status_code == 403, (response.status_code, response.text[:400])
    assert words in response.text
    assert "console_session" not in response.headers.get("Set-Cookie", "")
    if reason is not None:  # the audit trail says why
        event = server.get("/admin/audit?action=console.refused&limit=1").json()["data"][0]
        assert reason in event["detail"]["reason"], event


def test_a_mapped_admin_signs_in_with_the_code_flow(server, provider):
    session = requests.Session()
    start = session.get(server.url("/admin/console/login/oidc/start"), allow_redirects=False, timeout=10)
    query = parse_qs(urlsplit(start.headers["Location"]).query)
    assert start.headers["Location"].startswith(provider + "/auth?")
    assert query["code_challenge_method"] == ["S256"] and query["nonce"] and query["state"]
    assert query["redirect_uri"] == [server.url(CALLBACK)] and "openid" in query["scope"][0].split()
    session = requests.Session()
    callback = session.get(to_callback(server, session), timeout=10)
    assert callback.status_code == 200 and 'http-equiv="refresh"' in callback.text
    cookie = next(c for c in callback.headers["Set-Cookie"].split(", console") if "console_session=" in c)
    assert "SameSite=Strict" in cookie and "HttpOnly" in cookie
    assert signed_in_as(server, session) == "root"
    audit = server.get("/admin/audit?action=console.sign_in&limit=1").json()["data"][0]
    assert (audit["actor"], audit["detail"]) == ("root", {"method": "oidc"})


def test_a_replayed_callback_or_code_is_refused(server, provider):
    session = requests.Session()
    callback = to_callback(server, session)
    assert session.get(callback, timeout=10).status_code == 200
    again = requests.Session()  # no sign-in transaction holds its state (and a stray callback is not audited)
    refused(again.get(callback, timeout=10), "did not check out")
    refused(session.get(callback, timeout=10), "did not check out")  # this one's ended at its sign-in
    # the old code with a new sign-in's state: the provider refuses the code (used once already)
    fresh = requests.Session()
    new_state = parse_qs(urlsplit(to_callback(server, fresh)).query)
    old = parse_qs(urlsplit(callback).query)
    replay = fresh.get(server.url(CALLBACK), params={"code": old["code"][0], "state": new_state["state"][0],
                                                     "iss": new_state["iss"][0]}, timeout=10)
    refused(replay, "did not check out", server, "invalid_grant")
    assert signed_in_as(server, fresh) is None


def test_a_stray_callback_writes_nothing_and_a_callbacks_free_text_never_reaches_the_audit_trail(server, provider):
    def refusals():
        return server.get("/admin/audit?action=console.refused&limit=1000").json()["data"]

    before = refusals()
    stray = requests.get(server.url(CALLBACK), params={"error": "access_denied", "error_description": "x" * 500},
                         timeout=10)
    refused(stray, "did not check out")
    assert refusals() == before  # no sign-in begun in this browser: nothing stored
    session = requests.Session()
    state = parse_qs(urlsplit(to_callback(server, session)).query)["state"][0]
    answer = session.get(server.url(CALLBACK), params={"state": state, "error": "<b>made-up</b>",
                                                       "error_description": "<script>alert(1)</script>"}, timeout=10)
    refused(answer, "did not check out", server, "OAuthError: other")
    assert "made-up" not in str(refusals()) and "script" not in str(refusals())


@pytest.mark.parametrize(("tamper", "claim"), [("aud+azp", "aud"), ("aud", "aud"), ("iss", "iss"), ("nonce", "nonce")])
def test_an_id_token_for_another_audience_issuer_or_nonce_is_refused(server, provider, tamper, claim):
    op_state(provider, tamper=tamper)
    session = requests.Session()
    refused(session.get(to_callback(server, session), timeout=10), "did not check out", server,
            f"InvalidClaimError: {claim}")
    assert signed_in_as(server, session) is None


@pytest.mark.parametrize(("account", "email", "words"), [
    ("mallory", "mallory@example.org", "mallory@example.org is not an admin"),  # mapped to no user
    ("unverified", "alice@example.org", "not verified")])  # alice's address, unverified
def test_an_unmapped_or_unverified_user_is_refused_and_audited(server, provider, account, email, words):
    op_state(provider, login_as=account)
    session = requests.Session()
    refused(session.get(to_callback(server, session), timeout=10), words)
    assert signed_in_as(server, session) is None
    event = server.get("/admin/audit?action=console.refused&limit=1").json()["data"][0]
    assert (event["detail"]["method"], event["target"], event["actor"]) == ("oidc", email, "-")  # no one signed in
    assert not [u for u in server.get("/admin/users").json()["data"] if u["name"] in ("mallory", "nobody-here")]


def test_in_a_browser_the_strict_session_holds_after_the_providers_redirect(server, provider, tmp_path):
    """The provider shows a page and its button sends the browser back: a navigation begun on another site,
    which carries no SameSite=Strict cookie, so the console answers it with a page that refreshes itself."""
    op_state(provider, click="1")
    driver = make_driver(tmp_path / "chromium")
    try:
        driver.get(server.url("/admin/console/"))
        assert not driver.find_elements(By.ID, "signed-in-as")
        driver.find_element(By.ID, "oidc-sign-in").click()  # clicked, as a person does (a typed URL differs)
        WebDriverWait(driver, 15).until(lambda d: d.find_elements(By.ID, "continue"))
        assert driver.current_url.startswith(provider)
        driver.find_element(By.ID, "continue").click()
        WebDriverWait(driver, 15).until(lambda d: d.find_elements(By.ID, "signed-in-as"))
        assert driver.find_element(By.ID, "signed-in-as").text == "root"
        assert driver.current_url == server.url("/admin/console/")
        screenshot(driver, "11-signed-in-with-the-provider")
        assert csp_violations(driver) == []
    finally:
        driver.quit()
