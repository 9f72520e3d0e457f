"""The admins' console in process (Flask's test client, the real app, store and engine): sign-in by one-time
link, sessions, CSRF, every page and form, escaping, the security headers, and the attacks the issue names.
The browser's view of the same pages is tests/test_console_browser.py."""

import re
import xml.etree.ElementTree as ET
from datetime import date, timedelta
from html import unescape
from html.parser import HTMLParser

import pytest
import sqlalchemy as sa

from auth.schema import console_sessions
from auth.store import utcnow
from service.console import charts, figures
from service.console.parts import KEY
from service.state import state
from tests.support.inprocess import BatchUser, bearer, make_app, moved_clock, stop_app, token_header
from tests.support.servers import free_port

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
XSS = ('<script>alert(1)</script>', '"><img src=x onerror=alert(1)>')


@pytest.fixture(scope="module")
def app(tiny_model, tmp_path_factory):
    app = make_app(tiny_model, tmp_path_factory.mktemp("console"))
    state(app).store.add_user("boss", is_admin=True)
    yield app
    stop_app(app)


@pytest.fixture
def clock(app):
    with moved_clock(app) as moved:
        yield moved


def access(app):
    """The console's links and sessions in the app's database (auth.console.ConsoleAccess)."""
    return app.extensions[KEY].access


def link(app, name="boss", ttl=timedelta(minutes=10)):
    return access(app).issue_link(name, ttl)


def csrf(page):
    found = re.search(r'name="csrf_token" value="([^"]+)"', page.get_data(as_text=True))
    assert found, page.get_data(as_text=True)[:500]
    return found.group(1)


def sign_in(app, name="boss", client=None):
    """A test client signed in as `name` by a one-time link, as a browser would: the page, then its form."""
    client = client or app.test_client()
    secret = link(app, name)
    page = client.get(f"/admin/console/login/link/{secret}")
    assert page.status_code == 200
    done = client.post(f"/admin/console/login/link/{secret}", data={"csrf_token": csrf(page)})
    assert done.status_code == 303, done.get_data(as_text=True)
    return client


def post(client, path, data=None, page=None):
    """A form post with the CSRF token of `page` (default: the console's overview)."""
    page = page or client.get("/admin/console/")
    return client.post(path, data={"csrf_token": csrf(page), **(data or {})})


def text(response):
    return response.get_data(as_text=True)


# --- sign-in ---
def test_a_link_signs_its_admin_in_once_with_a_strict_session_cookie(app):
    client = app.test_client()
    secret = link(app)
    page = client.get(f"/admin/console/login/link/{secret}")
    assert page.status_code == 200 and 'id="continue"' in text(page)
    login_cookie = next(v for k, v in page.headers.items() if k == "Set-Cookie")
    assert login_cookie.startswith("console_login=") and "SameSite=Lax" in login_cookie
    assert "Path=/admin/console/login/" in login_cookie and "HttpOnly" in login_cookie
    done = client.post(f"/admin/console/login/link/{secret}", data={"csrf_token": csrf(page)})
    assert done.status_code == 303 and done.headers["Location"].endswith("/admin/console/")
    cookies = done.headers.getlist("Set-Cookie")
    session_cookie = next(c for c in cookies if c.startswith("console_session="))
    assert "SameSite=Strict" in session_cookie and "HttpOnly" in session_cookie
    assert "Path=/admin/console/" in session_cookie
    assert any(c.startswith("console_login=;") for c in cookies)  # the sign-in transaction ends
    home = client.get("/admin/console/")
    assert home.status_code == 200 and '<span id="signed-in-as">boss</span>' in text(home)
    again = app.test_client()
    refused = again.get(f"/admin/console/login/link/{secret}")  # a used link's page says so, and stores nothing
    assert refused.status_code == 403 and "unknown, used or expired" in text(refused)
    assert "Set-Cookie" not in refused.headers
    page = client.get(f"/admin/console/users")  # a form of this session, posted to the used link
    refused = client.post(f"/admin/console/login/link/{secret}", data={"csrf_token": csrf(page)})
    assert refused.status_code == 403
    actions = [(e["action"], e["actor"]) for e in state(app).store.list_audit(target="boss", limit=5)]
    assert ("console.sign_in", "boss") in actions and ("console.link", "system") in actions


def test_behind_tls_the_session_cookie_is_secure(app):
    client = sign_in(app, client=app.test_client())
    secret = link(app)
    tls = app.test_client()
    page = tls.get(f"/admin/console/login/link/{secret}", base_url="https://localhost")
    done = tls.post(f"/admin/console/login/link/{secret}", data={"csrf_token": csrf(page)},
                    base_url="https://localhost")
    assert "Secure" in next(c for c in done.headers.getlist("Set-Cookie") if c.startswith("console_session="))
    assert client.get("/admin/console/").status_code == 200


def test_an_expired_link_is_refused(app, clock):
    client = app.test_client()
    secret = link(app, ttl=timedelta(minutes=1))
    page = client.get(f"/admin/console/login/link/{secret}")
    clock.offset = timedelta(minutes=2)  # the link's minute is over; the sign-in page's form still holds
    refused = client.post(f"/admin/console/login/link/{secret}", data={"csrf_token": csrf(page)})
    assert refused.status_code == 403 and "unknown, used or expired" in text(refused)


def test_a_link_is_only_for_an_active_admin(app):
    store = state(app).store
    store.add_user("plain")
    with pytest.raises(Exception, match="not an admin"):
        link(app, "plain")
    client = app.test_client()
    store.add_user("leaving", is_admin=True)
    secret = link(app, "leaving")
    page = client.get(f"/admin/console/login/link/{secret}")
    store.update_user("leaving", active=False)  # between the link's page and its button
    assert client.post(f"/admin/console/login/link/{secret}", data={"csrf_token": csrf(page)}).status_code == 403
    store.update_user("leaving", active=True)  # disabling also ended the links it had
    assert client.get(f"/admin/console/login/link/{secret}").status_code == 403


def test_a_link_form_without_its_csrf_token_does_not_use_the_link(app):
    client = app.test_client()
    secret = link(app)
    client.get(f"/admin/console/login/link/{secret}")
    assert client.post(f"/admin/console/login/link/{secret}", data={}).status_code == 403
    page = client.get(f"/admin/console/login/link/{secret}")
    assert client.post(f"/admin/console/login/link/{secret}", data={"csrf_token": csrf(page)}).status_code == 303


def test_without_a_session_every_page_shows_the_sign_in_page_and_a_forged_one_is_refused(app):
    client = app.test_client()
    for path in ("/admin/console/", "/admin/console/users", "/admin/console/usage", "/admin/console/audit",
                 "/admin/console/batches", "/admin/console/models", "/admin/console/users/boss"):
        page = client.get(path)
        assert page.status_code == 401 and "console-link" in text(page), path
    client.set_cookie("console_session", "A" * 43, path="/admin/console/")
    assert client.get("/admin/console/").status_code == 401
    assert client.post("/admin/console/users", data={"name": "forged"}).status_code in (401, 403)
    with pytest.raises(Exception, match="no such user"):
        state(app).store.get_user("forged")


def test_a_bearer_token_opens_no_console_even_an_admins(app):
    admin = bearer(app, "tokenadmin", "generate admin", is_admin=True)
    generate = bearer(app, "tokengen", "generate", is_admin=True)
    for headers in (admin, generate):
        assert app.test_client().get("/admin/console/", headers=headers).status_code == 401
    assert app.test_client().get("/admin/users", headers=generate).status_code == 403  # the API is unchanged


def test_the_api_never_sets_a_cookie(app):
    client = sign_in(app)
    me = client.get("/v1/me", headers=bearer(app, "cookieless"))
    assert me.status_code == 200 and "Set-Cookie" not in me.headers


# --- sessions end ---
def test_idle_and_absolute_timeouts_end_a_session(app, clock):
    client = sign_in(app)
    clock.offset = timedelta(minutes=14)
    assert client.get("/admin/console/").status_code == 200  # moves the idle clock
    clock.offset = timedelta(minutes=28)
    assert client.get("/admin/console/").status_code == 200
    clock.offset = timedelta(minutes=44)
    assert client.get("/admin/console/").status_code == 401  # 16 minutes idle
    client = sign_in(app)
    for minutes in range(10, 8 * 60, 10):
        clock.offset = timedelta(minutes=44 + minutes)
        assert client.get("/admin/console/").status_code == 200
    clock.offset = timedelta(minutes=44 + 8 * 60 + 1)
    assert client.get("/admin/console/").status_code == 401


@pytest.mark.parametrize("change", ["disable", "demote", "revoke-all"])
def test_disabling_demoting_or_revoking_an_admin_ends_their_session_at_the_next_request(app, change):
    store, name = state(app).store, f"admin-{change}"
    store.add_user(name, is_admin=True)
    client = sign_in(app, name)
    assert client.get("/admin/console/").status_code == 200
    since = utcnow() - timedelta(minutes=1)
    assert access(app).sessions_of(name, since) == 1
    if change == "disable":
        store.update_user(name, active=False)
    elif change == "demote":
        store.update_user(name, is_admin=False)
    else:
        store.revoke_all(name)
    assert access(app).sessions_of(name, since) == 0  # ended now, not at its next request
    store.update_user(name, active=True, is_admin=True)  # restored rights, before any request: still ended
    assert client.get("/admin/console/").status_code == 401


def test_abandoned_sessions_are_purged_at_the_next_sign_in(app, clock):
    def rows():
        with state(app).store.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(console_sessions)).scalar()

    abandoned = app.test_client()
    abandoned.get(f"/admin/console/login/link/{link(app)}")  # a sign-in begun, never finished
    sign_in(app)
    before = rows()
    clock.offset = timedelta(minutes=16)
    sign_in(app)
    assert rows() == 1  # every older one is past its timeout (this module's other sessions too); the new one stays
    assert before >= 2


def test_signing_out_deletes_the_session(app):
    client = sign_in(app)
    since = utcnow() - timedelta(minutes=1)
    before = access(app).sessions_of("boss", since)
    out = post(client, "/admin/console/logout")
    assert out.status_code == 303
    assert client.get("/admin/console/").status_code == 401
    assert access(app).sessions_of("boss", since) == before - 1
    assert state(app).store.list_audit(action="console.sign_out", limit=1)[0]["actor"] == "boss"


# --- CSRF ---
def test_a_form_without_its_csrf_token_or_from_another_site_is_refused(app):
    client = sign_in(app)
    refused = client.post("/admin/console/users", data={"name": "nocsrf"})
    assert refused.status_code == 403 and "CSRF" in text(refused)
    token = csrf(client.get("/admin/console/users"))
    refused = client.post("/admin/console/users", data={"name": "crosssite", "csrf_token": token},
                          headers={"Sec-Fetch-Site": "cross-site"})
    assert refused.status_code == 403
    other = sign_in(app)  # another session's token is not this one's
    refused = client.post("/admin/console/users", data={"name": "othertoken",
                                                         "csrf_token": csrf(other.get("/admin/console/users"))})
    assert refused.status_code == 403
    users = {u["name"] for u in state(app).store.list_users()}
    assert not users & {"nocsrf", "crosssite", "othertoken"}
    done = client.post("/admin/console/users", data={"name": "withcsrf", "csrf_token": token},
                       headers={"Sec-Fetch-Site": "same-origin"})
    assert done.status_code == 303 and "withcsrf" in {u["name"] for u in state(app).store.list_users()}


# --- what admins do ---
def test_create_a_user_issue_a_token_that_works_then_revoke_it(app):
    client = sign_in(app)
    created = post(client, "/admin/console/users", {"name": "carol", "daily_tokens": "5000",
                                                     "rate_limit": "10/minute"})
    assert created.status_code == 303 and created.headers["Location"].endswith("/admin/console/users/carol")
    user = state(app).store.get_user("carol")
    assert (user["daily_tokens"], user["rate_limit"], user["admin"]) == (5000, "10/minute", False)
    page = client.get("/admin/console/users/carol")
    shown = post(client, "/admin/console/users/carol/tokens", {"label": "notebook", "scope_generate": "on",
                                                               "ttl": "1d"}, page)
    assert shown.status_code == 200
    token = unescape(re.search(r'<textarea id="token"[^>]*>([^<]+)</textarea>', text(shown)).group(1))
    headers = {"Authorization": f"Bearer {token}"}
    me = app.test_client().get("/v1/me", headers=headers)
    assert me.status_code == 200 and me.get_json()["user"] == "carol"
    jti = me.get_json()["token"]["jti"]
    assert token not in text(client.get("/admin/console/users/carol"))  # shown once
    revoked = post(client, f"/admin/console/tokens/{jti}/revoke")
    assert revoked.status_code == 303
    refused = app.test_client().get("/v1/me", headers=headers)
    assert refused.status_code == 401 and refused.get_json()["error"]["code"] == "token_revoked"
    trail = [(e["action"], e["actor"], e["source"]) for e in state(app).store.list_audit(target="carol", limit=10)]
    assert [a for a, actor, _ in trail if actor == "boss"] == ["token.revoke", "token.issue", "user.add"]


def test_rotate_a_token_from_its_row_the_old_one_works_until_the_grace_ends(app, clock):
    client = sign_in(app)
    state(app).store.add_user("rotor")
    old = token_header(app, "rotor")
    jti = app.test_client().get("/v1/me", headers=old).get_json()["token"]["jti"]
    page = client.get("/admin/console/users/rotor")
    assert f'/admin/console/tokens/{jti}/rotate' in text(page)
    bad = post(client, f"/admin/console/tokens/{jti}/rotate", {"grace": "soon"}, page)
    assert bad.status_code == 400 and "bad grace" in unescape(text(bad))
    shown = post(client, f"/admin/console/tokens/{jti}/rotate", {"grace": "2h"}, page)
    assert shown.status_code == 200 and jti in text(shown)
    successor = {"Authorization": "Bearer " + unescape(
        re.search(r'<textarea id="token"[^>]*>([^<]+)</textarea>', text(shown)).group(1))}
    assert app.test_client().get("/v1/me", headers=successor).status_code == 200
    assert app.test_client().get("/v1/me", headers=old).status_code == 200  # in its grace
    listed = text(client.get("/admin/console/users/rotor"))
    assert "works until" in listed and "replaced by" in listed and f"{jti}/rotate" not in listed
    clock.offset = timedelta(hours=2, seconds=1)
    assert app.test_client().get("/v1/me", headers=old).get_json()["error"]["code"] == "token_revoked"
    assert app.test_client().get("/v1/me", headers=successor).status_code == 200
    assert f'data-jti="{jti}"' not in text(client.get("/admin/console/users/rotor"))  # no longer live


def test_a_bad_form_gets_the_admin_apis_message_and_changes_nothing(app):
    client = sign_in(app)
    bad = post(client, "/admin/console/users", {"name": "Bad Name"})
    assert bad.status_code == 400 and "name" in text(bad)
    bad = post(client, "/admin/console/users", {"name": "dave", "daily_tokens": "many"})
    assert bad.status_code == 400 and "daily_tokens" in text(bad)
    assert post(client, "/admin/console/users", {"name": "boss"}).status_code == 409
    missing = post(client, "/admin/console/users/nobody", {"daily_tokens": "5"})
    assert missing.status_code == 404
    bad = post(client, "/admin/console/users/boss/tokens", {"ttl": "forever"})
    assert bad.status_code == 400 and "dave" not in {u["name"] for u in state(app).store.list_users()}


def test_set_limits_allow_lists_and_disable_then_enable(app):
    client = sign_in(app)
    post(client, "/admin/console/users", {"name": "erin", "max_concurrent": "3"})
    fields = Form(text(client.get("/admin/console/users/erin")), "limits").fields
    saved = client.post("/admin/console/users/erin", data={**fields,
        "daily_tokens": "777", "max_concurrent": "", "rate_limit": "5/second", "models": "tiny\n\n",
        "system_prompts": "Be brief.\nVery.\n---\nAnswer in French."})
    assert saved.status_code == 303
    user = state(app).store.get_user("erin")
    assert user["daily_tokens"] == 777 and user["max_concurrent"] is None and user["rate_limit"] == "5/second"
    assert user["models"] == ["tiny"] and user["system_prompts"] == ["Be brief.\nVery.", "Answer in French."]
    page = text(client.get("/admin/console/users/erin"))
    assert "Be brief.\nVery.\n---\nAnswer in French." in unescape(page)  # the form shows what it saves
    assert post(client, "/admin/console/users/erin/active", {"active": "false"}).status_code == 303
    assert state(app).store.get_user("erin")["active"] is False
    assert post(client, "/admin/console/users/erin/active", {"active": "true"}).status_code == 303
    assert state(app).store.get_user("erin")["active"] is True
    trail = state(app).store.list_audit(target="erin", actor="boss", limit=10)
    assert [e["action"] for e in trail] == ["user.enable", "user.disable", "user.update", "user.add"]


class Form(HTMLParser):
    """A page's form #`form_id` as a browser submits it: inputs, checked boxes, textareas (less the newline
    right after their start tag, which HTML drops)."""

    def __init__(self, page, form_id):
        super().__init__()
        self.form_id, self.inside, self.fields, self.area = form_id, False, {}, None
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "form":
            self.inside = attrs.get("id") == self.form_id
        elif self.inside and tag == "input" and attrs.get("name"):
            if attrs.get("type") != "checkbox" or "checked" in attrs:
                self.fields[attrs["name"]] = attrs.get("value", "on" if attrs.get("type") == "checkbox" else "")
        elif self.inside and tag == "textarea":
            self.area = attrs["name"]
            self.fields[self.area] = ""

    def handle_endtag(self, tag):
        if tag == "form":
            self.inside = False
        elif tag == "textarea" and self.area:
            self.fields[self.area] = self.fields[self.area].removeprefix("\n").replace("\n", "\r\n")
            self.area = None

    def handle_data(self, data):
        if self.area:
            self.fields[self.area] += data


def test_saving_one_limit_leaves_every_other_field_as_it_was(app):
    store = state(app).store
    prompts = ["\nStarts with a newline.", "Has a line\n---\ninside, and ends with one\n", "  spaced  "]
    store.add_user("henry", system_prompts=prompts, models=["tiny"], rate_limit="7/minute", max_files=3)
    client = sign_in(app)
    fields = Form(text(client.get("/admin/console/users/henry")), "limits").fields
    assert fields["daily_tokens"] == "" and fields["max_files"] == "3"
    fields["daily_tokens"] = "4242"
    assert client.post("/admin/console/users/henry", data=fields).status_code == 303
    user = store.get_user("henry")
    assert user["daily_tokens"] == 4242 and user["system_prompts"] == prompts and user["models"] == ["tiny"]
    assert (user["rate_limit"], user["max_files"], user["admin"]) == ("7/minute", 3, False)
    assert store.list_audit(target="henry", limit=1)[0]["detail"] == {"daily_tokens": 4242}
    fields = Form(text(client.get("/admin/console/users/henry")), "limits").fields
    assert client.post("/admin/console/users/henry", data=fields).status_code == 303  # nothing changed
    assert "nothing changed for henry" in text(client.get("/admin/console/users/henry"))
    fields["models"], fields["max_files"] = "", ""
    client.post("/admin/console/users/henry", data=fields)
    user = store.get_user("henry")
    assert user["models"] is None and user["max_files"] is None and user["system_prompts"] == prompts


@pytest.mark.parametrize("value", ["--5", "²", "٣", "1e3", "99999999999999999999999"])
def test_a_number_field_that_is_not_a_plain_number_is_refused_by_the_apis_rule(app, value):
    client = sign_in(app)
    fields = Form(text(client.get("/admin/console/users/boss")), "limits").fields
    refused = client.post("/admin/console/users/boss", data={**fields, "daily_tokens": value})
    assert refused.status_code == 400 and "daily_tokens" in text(refused)


def test_a_form_shown_before_someone_else_changed_the_user_is_refused_not_applied(app):
    store = state(app).store
    store.add_user("jack")
    client = sign_in(app)
    fields = Form(text(client.get("/admin/console/users/jack")), "limits").fields
    store.update_user("jack", is_admin=True, daily_tokens=999)  # another admin, or the CLI, meanwhile
    refused = client.post("/admin/console/users/jack", data={**fields, "rate_limit": "1/second"})
    assert refused.status_code == 409 and "reload" in text(refused)
    user = store.get_user("jack")
    assert (user["admin"], user["daily_tokens"], user["rate_limit"]) == (True, 999, None)
    without = {k: v for k, v in fields.items() if k != "version"}
    assert client.post("/admin/console/users/jack", data=without).status_code == 409
    fields = Form(text(client.get("/admin/console/users/jack")), "limits").fields
    partial = {k: fields[k] for k in ("csrf_token", "version", "admin")}  # a text field left out stays
    assert client.post("/admin/console/users/jack", data={**partial, "max_files": "7"}).status_code == 303
    user = store.get_user("jack")
    assert (user["admin"], user["daily_tokens"], user["max_files"]) == (True, 999, 7)


@pytest.mark.parametrize("path", ["/admin/console/usage?user=%00", "/admin/console/usage.csv?user=a%00",
                                  "/admin/console/audit?actor=%00", "/admin/console/audit?target=x%01",
                                  "/admin/console/batches?after=%00", "/admin/console/usage?user=Bad%20Name"])
def test_odd_query_arguments_get_a_400_page(app, path):
    client = sign_in(app)
    refused = client.get(path)
    assert refused.status_code == 400 and refused.mimetype == "text/html"
    assert refused.headers["Content-Security-Policy"] == CSP


def test_errors_outside_the_pages_carry_the_consoles_headers_and_assets_no_session(app):
    client = sign_in(app)
    for answer in (client.get("/admin/console/nope"), client.get("/admin/console/logout")):
        assert answer.status_code in (404, 405) and answer.headers["Content-Security-Policy"] == CSP
        assert answer.headers["Cache-Control"] == "no-store"
    asset = client.get("/admin/console/static/console.js")
    assert "Set-Cookie" not in asset.headers and asset.headers["Cache-Control"] == "public, max-age=86400"
    asset.close()


def test_a_cookie_naming_no_live_session_is_cleared(app):
    client = app.test_client()
    client.set_cookie("console_session", "B" * 43, path="/admin/console/")
    page = client.get("/admin/console/")
    assert page.status_code == 401
    assert any(c.startswith("console_session=;") for c in page.headers.getlist("Set-Cookie"))


def test_a_restored_backup_brings_back_no_session_and_no_link(app):
    client = sign_in(app)
    unused = link(app)
    state(app).store.revoke_again({})  # what a restore runs after putting the backup's rows back
    assert client.get("/admin/console/").status_code == 401
    assert app.test_client().get(f"/admin/console/login/link/{unused}").status_code == 403


def test_an_error_outside_a_view_is_logged_by_route_never_by_path(app, caplog, monkeypatch):
    secret = link(app)
    client = app.test_client()
    client.set_cookie("console_login", "C" * 43, path="/admin/console/login/")

    def down(_sid):
        raise RuntimeError("the database went away")

    monkeypatch.setattr(access(app), "load", down)  # opening the session fails, before any view
    failed = client.get(f"/admin/console/login/link/{secret}")
    assert failed.status_code == 500 and secret not in failed.get_data(as_text=True)
    logged = caplog.text
    assert "GET /admin/console/login/link/<secret>" in logged and "the database went away" in logged
    assert secret not in logged


def test_a_session_deleted_while_a_request_runs_is_not_written_back(app):
    sessions = access(app)
    sessions.create("s" * 43, "auth", state(app).store.get_user("boss")["id"], {"csrf": "x"}, utcnow())
    assert sessions.update("s" * 43, {"csrf": "y"}) and sessions.load("s" * 43)["data"] == {"csrf": "y"}
    sessions.delete("s" * 43)  # signed out, or the admin's sessions ended, while a request held it
    assert not sessions.update("s" * 43, {"csrf": "z"})
    assert sessions.load("s" * 43) is None


def test_revoke_all_from_the_console(app):
    client = sign_in(app)
    store = state(app).store
    store.add_user("frank")
    headers = [token_header(app, "frank") for _ in range(2)]
    assert post(client, "/admin/console/users/frank/revoke-all").status_code == 303
    for h in headers:
        assert app.test_client().get("/v1/me", headers=h).status_code == 401


def test_user_supplied_strings_are_shown_inert(app):
    client = sign_in(app)
    store = state(app).store
    store.add_user("xss", system_prompts=list(XSS))
    for label in XSS:
        token_header(app, "xss")  # a token with a plain label beside
        post(client, "/admin/console/users/xss/tokens", {"label": label, "scope_generate": "on"})
    pages = [text(client.get(p)) for p in ("/admin/console/users/xss", "/admin/console/audit",
                                           "/admin/console/users?q=xss")]
    for page in pages:
        assert "<script>alert" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in pages[0]
    assert "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in pages[0]
    search = text(client.get('/admin/console/users?q="><script>'))
    assert "<script>" not in search.split("</head>")[1].replace('<script src=', '')


def test_every_page_carries_the_security_headers(app):
    client = sign_in(app)
    paths = ["/admin/console/", "/admin/console/users", "/admin/console/users/boss", "/admin/console/usage",
             "/admin/console/teams",
             "/admin/console/usage?user=boss&days=3", "/admin/console/audit?action=user.add",
             "/admin/console/batches", "/admin/console/models", "/admin/console/login/"]
    for path in paths:
        page = client.get(path)
        assert page.status_code == 200, (path, text(page)[:300])
        assert page.headers["Content-Security-Policy"] == CSP, path
        assert page.headers["X-Frame-Options"] == "DENY" and page.headers["Cache-Control"] == "no-store"
        assert page.headers["Referrer-Policy"] == "no-referrer"
        assert page.headers["X-Content-Type-Options"] == "nosniff"
        assert not re.search(r"<script>|<style|<[a-z][^>]*\s(style|on[a-z]+)=", text(page)), path  # nothing inline
    for refused in (app.test_client().get("/admin/console/"), client.post("/admin/console/users")):
        assert refused.headers["Content-Security-Policy"] == CSP
    asset = client.get("/admin/console/static/console.css")
    assert asset.status_code == 200 and "max-age=86400" in asset.headers["Cache-Control"]
    asset.close()


def test_a_team_created_limited_filled_and_removed_from_the_console(app):
    client = sign_in(app)
    store = state(app).store
    for name in ("dev-1", "dev-2"):
        store.add_user(name)
    created = post(client, "/admin/console/teams", {"name": "devs", "daily_tokens": "9000", "rate_limit": ""})
    assert created.status_code == 303 and created.headers["Location"].endswith("/admin/console/teams/devs")
    page = client.get("/admin/console/teams/devs")
    assert '<option>dev-1</option>' in text(page) and '<option>boss</option>' in text(page)
    assert post(client, "/admin/console/teams/devs/members", {"add": "dev-1"}, page).status_code == 303
    assert post(client, "/admin/console/teams/devs/members", {"add": "dev-2"}, page).status_code == 303
    saved = post(client, "/admin/console/teams/devs", {"daily_tokens": "", "max_concurrent": "3",
                                                       "rate_limit": ""}, page)
    assert saved.status_code == 303
    team = store.get_team("devs")
    assert (team["daily_tokens"], team["max_concurrent"], team["members"]) == (None, 3, ["dev-1", "dev-2"])
    bad = post(client, "/admin/console/teams/devs", {"max_concurrent": "0"}, page)
    assert bad.status_code == 400 and "max_concurrent must be an integer" in text(bad)
    user_page = text(client.get("/admin/console/users/dev-1"))
    assert 'in team <a href="/admin/console/teams/devs">devs</a>' in user_page
    assert "devs" in text(client.get("/admin/console/teams")) and "counted against team devs" in text(
        client.get("/admin/console/usage?team=devs"))
    kept = post(client, "/admin/console/teams/devs/transcripts", {"transcripts": "true"}, page)
    assert kept.status_code == 303 and store.get_team("devs")["transcripts"] is True
    assert "kept (encrypted" in text(client.get("/admin/console/teams/devs"))
    removed = post(client, "/admin/console/teams/devs/remove", page=page)
    assert removed.status_code == 303 and store.get_user("dev-1")["team"] is None
    trail = [e["action"] for e in store.list_audit(actor="boss", limit=6)]
    assert trail == ["team.remove", "team.update", "team.update", "team.members", "team.members", "team.add"]


def test_usage_page_charts_and_csv(app):
    client = sign_in(app)
    headers = bearer(app, "grace")
    answer = app.test_client().post("/v1/predict", json={"question": "hi", "max_new_tokens": 4}, headers=headers)
    assert answer.status_code == 200, answer.get_json()
    page = text(client.get("/admin/console/usage"))
    svgs = re.findall(r"<svg .*?</svg>", page, re.S)
    assert len(svgs) == 3
    for svg in svgs:
        ET.fromstring(svg)
    assert re.search(r"<title>grace: \d+</title>", page)  # grace among the top users
    csv_text = client.get("/admin/console/usage.csv?user=grace").get_data(as_text=True)
    lines = csv_text.splitlines()
    assert lines[0].startswith("day,user,requests") and lines[1].split(",")[1:3] == ["grace", "1"]
    assert client.get("/admin/console/usage?user=nobody").status_code == 404
    assert client.get("/admin/console/usage?days=0").status_code == 400


def test_every_users_batches_listed_and_one_cancelled_under_the_admins_name(app):
    owner = BatchUser(app, "ivy")
    batch = owner.submit("/v1/predict", {"question": "hi", "max_new_tokens": 4})
    assert batch["status"] == "in_progress"  # no runner takes it in this app
    client = sign_in(app)
    page = text(client.get("/admin/console/batches"))
    row = page.split(f'data-batch="{batch["id"]}"')[1].split("</tr>")[0]
    assert "<td>ivy</td>" in row and 'class="danger cancel"' in row
    assert post(client, f"/admin/console/batches/{batch['id']}/cancel").status_code == 303
    assert owner.batch(batch["id"])["status"] == "cancelling"
    event = state(app).store.list_audit(action="batch.cancel", limit=1)[0]
    assert (event["actor"], event["target"], event["detail"]) == ("boss", batch["id"], {"owner": "ivy"})
    again = post(client, f"/admin/console/batches/{batch['id']}/cancel")
    assert again.status_code == 303  # cancelling twice is harmless, as in the API, and audited once
    assert len(state(app).store.list_audit(action="batch.cancel", target=batch["id"])) == 1
    assert post(client, "/admin/console/batches/batch_nope/cancel").status_code == 404


def test_without_a_provider_its_sign_in_and_callback_are_404_pages(app):
    for path in ("/admin/console/login/oidc/start", "/admin/console/login/oidc/callback?code=x&state=y"):
        page = app.test_client().get(path)
        assert page.status_code == 404 and "not configured here" in text(page) and page.mimetype == "text/html"
        assert page.headers["Content-Security-Policy"] == CSP
    assert 'id="oidc-sign-in"' not in text(app.test_client().get("/admin/console/login/"))


def test_an_unreachable_provider_gets_a_page_not_an_error(tiny_model, tmp_path):
    port = free_port()  # nothing listens there
    app = make_app(tiny_model, tmp_path, console_oidc_issuer=f"http://127.0.0.1:{port}",
                   console_oidc_client_id="console", console_oidc_client_secret="s3cret",
                   console_url="https://api.example.org")
    try:
        page = app.test_client().get("/admin/console/login/oidc/start")
        assert page.status_code == 503 and "does not answer" in text(page)
        assert page.headers["Content-Security-Policy"] == CSP
    finally:
        stop_app(app)


def test_models_page_shows_health_and_the_served_model(app):
    client = sign_in(app)
    page = text(client.get("/admin/console/models"))
    assert 'id="ready">ready<' in page and state(app).models.default.name in page


# --- pure parts ---
def test_charts_are_valid_svg_and_escape_their_labels():
    svg = charts.bar_chart([(XSS[0], 3), ("b", 0)], XSS[1])
    root = ET.fromstring(str(svg))
    assert root.tag.endswith("svg") and "<script>" not in str(svg)
    assert [t.text for t in root.iter("{http://www.w3.org/2000/svg}title")][1] == f"{XSS[0]}: 3"
    heights = [float(r.get("height")) for r in root.iter("{http://www.w3.org/2000/svg}rect")]
    assert heights[0] > 0 and heights[1] == 0
    line = ET.fromstring(str(charts.line_chart([("d1", 1), ("d2", 4)], "x")))
    points = line.find("{http://www.w3.org/2000/svg}polyline").get("points").split()
    assert len(points) == 2 and float(points[1].split(",")[1]) < float(points[0].split(",")[1])
    assert ET.fromstring(str(charts.line_chart([], "empty"))) is not None
    assert charts._scale(0) == (1, 1) and charts._scale(1) == (1, 1) and charts._scale(66) == (80, 4)
    assert charts._scale(7) == (8, 4) and charts._scale(12345) == (15000, 3)


def test_figures_fill_days_and_rank_users():
    rows = [{"day": "2026-12-05", "user": "a", "total_tokens": 5}, {"day": "2026-12-06", "user": "b", "total_tokens": 7},
            {"day": "2026-12-06", "user": "a", "total_tokens": 1}]
    span = figures.days(date(2026, 12, 6), 3)
    assert span == ["2026-12-04", "2026-12-05", "2026-12-06"]
    assert figures.per_day(rows, "total_tokens", span) == [("12-04", 0), ("12-05", 5), ("12-06", 8)]
    assert figures.top_users(rows, "total_tokens") == [("b", 7), ("a", 6)]
