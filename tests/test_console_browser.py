"""The admins' console in a real headless Chromium against a real gunicorn: an admin's whole visit, by clicks,
from the one-time link the real CLI prints to signing out. Each page's screenshot is written under
var/test-artifacts/console/, and no page may trip its Content-Security-Policy."""

import json
import re

import pytest
import requests
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from service.settings import Settings
from tests.support.browser import csp_violations, make_driver, screenshot

pytestmark = pytest.mark.slow
XSS = '"><img src=x onerror="document.title=1">'


@pytest.fixture(scope="module")
def server(start_server):
    return start_server()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver = make_driver(tmp_path_factory.mktemp("chromium"))
    yield driver
    driver.quit()


def page(driver, name):
    """After each page: its screenshot, and no CSP violation."""
    screenshot(driver, name)
    assert csp_violations(driver) == [], name


def click(driver, selector):
    driver.find_element(By.CSS_SELECTOR, selector).click()


def fill(driver, selector, value):
    field = driver.find_element(By.CSS_SELECTOR, selector)
    field.clear()
    field.send_keys(value)


def wait_for(driver, condition, timeout=15):
    return WebDriverWait(driver, timeout).until(lambda d: condition(d))


def nav(driver, label):
    driver.find_element(By.LINK_TEXT, label).click()
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, f'nav a[aria-current="page"]'))


def me(server, token):
    return requests.get(server.url("/v1/me"), headers={"Authorization": f"Bearer {token}"}, timeout=30)


def test_an_admins_visit(server, browser, long_question):
    driver = browser
    # sign in: the real CLI prints the link; the link's page asks for one click
    url = server.cli("--json", "console-link", "root").stdout
    url = json.loads(url)["url"]
    assert url.startswith(server.base + "/admin/console/login/link/")
    driver.get(url)
    page(driver, "01-sign-in-link")
    click(driver, "#continue")
    wait_for(driver, lambda d: d.find_elements(By.ID, "signed-in-as"))
    assert driver.find_element(By.ID, "signed-in-as").text == "root"
    assert driver.find_element(By.ID, "ready").text == "ready"
    cookie = driver.get_cookie("console_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/admin/console/"
    page(driver, "02-overview")

    # create a user
    nav(driver, "Users")
    fill(driver, "#new-name", "carol")
    click(driver, "#create-user")
    wait_for(driver, lambda d: d.current_url.endswith("/admin/console/users/carol"))
    assert "created user carol" in driver.find_element(By.CSS_SELECTOR, ".notice").text
    page(driver, "03-user")

    # issue a token: shown once, with a Copy button (the console's one script), and it works
    fill(driver, "#token-label", "notebook")
    click(driver, "#issue")
    wait_for(driver, lambda d: d.find_elements(By.ID, "token"))
    token = driver.find_element(By.ID, "token").get_attribute("value")
    click(driver, "#copy")
    wait_for(driver, lambda d: d.find_element(By.ID, "copy").text == "Copied")
    page(driver, "04-token-shown-once")
    assert me(server, token).status_code == 200
    answer = requests.post(server.url("/v1/predict"), json={"question": "hello", "max_new_tokens": 8},
                           headers={"Authorization": f"Bearer {token}"}, timeout=60)
    assert answer.status_code == 200

    # revoke it: refused at the next request
    driver.find_element(By.LINK_TEXT, "Back to carol").click()
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#tokens .revoke"))
    assert driver.find_element(By.CSS_SELECTOR, "#tokens td.label").text == "notebook"
    click(driver, "#tokens .revoke")
    wait_for(driver, lambda d: "revoked token" in d.find_element(By.CSS_SELECTOR, ".notice").text)
    refused = me(server, token)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "token_revoked"

    # a label and a system prompt that are markup stay text
    fill(driver, "#token-label", XSS)
    click(driver, "#issue")
    wait_for(driver, lambda d: d.find_elements(By.ID, "token"))
    driver.find_element(By.LINK_TEXT, "Back to carol").click()
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#tokens td.label"))
    assert driver.find_element(By.CSS_SELECTOR, "#tokens td.label").text == XSS
    assert not driver.find_elements(By.CSS_SELECTOR, "#tokens img, #tokens script")
    fill(driver, "#system-prompts", "<script>document.title='owned'</script>")

    # set a quota
    fill(driver, "#quota-daily_tokens", "12345")
    click(driver, "#save-limits")
    wait_for(driver, lambda d: "saved carol" in d.find_element(By.CSS_SELECTOR, ".notice").text)
    users = json.loads(server.cli("--json", "users", "list").stdout)
    carol = next(u for u in users if u["name"] == "carol")
    assert carol["daily_tokens"] == 12345 and carol["system_prompts"] == ["<script>document.title='owned'</script>"]
    assert driver.title != "owned" and driver.find_element(By.ID, "system-prompts").get_attribute("value") == \
        "<script>document.title='owned'</script>"
    page(driver, "05-user-limits")

    # usage: today's figures as a chart
    nav(driver, "Usage")
    bars = driver.find_elements(By.CSS_SELECTOR, "svg.chart rect.bar")
    titles = [b.find_element(By.TAG_NAME, "title").get_attribute("textContent") for b in bars]
    assert any(re.fullmatch(r"carol: \d+", t) for t in titles), titles
    assert any(float(b.get_attribute("height")) > 0 for b in bars)
    assert "carol" in driver.find_element(By.ID, "usage-rows").text
    page(driver, "06-usage")

    # the audit trail, filtered: the console's changes under the admin's name
    nav(driver, "Audit")
    driver.find_element(By.CSS_SELECTOR, '#audit-action option[value="token.revoke"]').click()
    click(driver, "#filter")
    wait_for(driver, lambda d: "action=token.revoke" in d.current_url)
    rows = driver.find_elements(By.CSS_SELECTOR, "#audit tbody tr")
    assert [(r.find_element(By.CSS_SELECTOR, ".actor").text, r.find_element(By.CSS_SELECTOR, ".target").text)
            for r in rows] == [("root", "carol")]
    page(driver, "07-audit")

    # cancel a batch that is running
    batch = start_batch(server, long_question)
    nav(driver, "Batches")
    row = f'tr[data-batch="{batch}"]'
    click(driver, f"{row} .cancel")
    wait_for(driver, lambda d: "cancelling batch" in d.find_element(By.CSS_SELECTOR, ".notice").text)
    status = requests.get(server.url(f"/v1/batches/{batch}"), headers=server.auth(), timeout=30).json()["status"]
    assert status in ("cancelling", "cancelled")
    assert driver.find_element(By.CSS_SELECTOR, f"{row} .status").text in ("cancelling", "cancelled")
    page(driver, "08-batches")

    nav(driver, "Models")
    assert "VibeThinker-1.5B" in driver.find_element(By.ID, "models").text
    page(driver, "09-models")

    # sign out: the session is gone
    click(driver, "#sign-out")
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "main h1") and
             d.find_element(By.CSS_SELECTOR, "main h1").text == "Sign in")
    driver.get(server.url("/admin/console/"))
    assert not driver.find_elements(By.ID, "signed-in-as")
    page(driver, "10-signed-out")


def start_batch(server, question):
    """A batch of long answers as `root` (it runs for minutes): its id."""
    system = Settings().default_system_prompt
    lines = "".join(json.dumps({"custom_id": f"l{i}", "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": "VibeThinker-1.5B", "max_tokens": 2000, "seed": i,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]}}) + "\n"
        for i in range(40))
    upload = requests.post(server.url("/v1/files"), headers=server.auth(), data={"purpose": "batch"},
                           files={"file": ("in.jsonl", lines.encode())}, timeout=30)
    assert upload.status_code == 200, upload.text
    created = server.post("/v1/batches", {"input_file_id": upload.json()["id"], "endpoint": "/v1/chat/completions",
                                          "completion_window": "24h"})
    assert created.status_code == 200, created.text
    return created.json()["id"]
