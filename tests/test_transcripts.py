"""Opt-in transcripts: kept only for users an admin turned them on for, encrypted at rest, read by admins only
(audited), exported as fine-tuning JSONL, purged past their retention, deleted with their user."""

import base64
import json
import re
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from openai.types.chat import (
    ChatCompletionAssistantMessageParam, ChatCompletionSystemMessageParam, ChatCompletionUserMessageParam)
from pydantic import TypeAdapter

from auth import backup, keys
from auth.store import Store
from auth.transcripts import Transcripts, TranscriptUnreadable
from service.console.parts import KEY
from service.serving.export import lines
from service.state import state
from tests.support.inprocess import BatchUser, bearer, make_app, stop_app
from tests.support.servers import admin_cli, state_env

SECRET_QUESTION = "zebra quartz lantern 4417: what is 6 * 7?"
SECRET_SYSTEM = "You are a careful tutor named Orrin-5521."
ROLES = {"system": ChatCompletionSystemMessageParam, "user": ChatCompletionUserMessageParam,
         "assistant": ChatCompletionAssistantMessageParam}


@pytest.fixture(scope="module")
def app(tiny_model, tmp_path_factory):
    app = make_app(tiny_model, tmp_path_factory.mktemp("transcripts"))
    yield app
    stop_app(app)


@pytest.fixture(scope="module")
def people(app):
    """An admin, `alice` (transcripts on, set through the admin API) and `bob` (left off), with their tokens."""
    admin = bearer(app, "boss", "generate admin", is_admin=True)
    alice, bob = bearer(app, "alice"), bearer(app, "bob")
    client = app.test_client()
    changed = client.patch("/admin/users/alice", json={"transcripts": True}, headers=admin)
    assert changed.status_code == 200 and changed.get_json()["transcripts"] is True
    return {"admin": admin, "alice": alice, "bob": bob}


def ask(app, headers, question=SECRET_QUESTION):
    client = app.test_client()
    predicted = client.post("/v1/predict", headers=headers, json={
        "question": question, "system_prompt": SECRET_SYSTEM, "max_new_tokens": 12, "temperature": 0,
        "expected_answer": "42"})
    chat = client.post("/v1/chat/completions", headers=headers, json={
        "model": "auto", "messages": [{"role": "user", "content": question}], "max_tokens": 8, "n": 2,
        "temperature": 0.8, "seed": 7})
    assert predicted.status_code == 200 and chat.status_code == 200, (predicted.get_json(), chat.get_json())
    assert state(app).transcript_log.flush()
    return predicted.get_json(), chat.get_json()


def listed(app, admin, **query):
    response = app.test_client().get("/admin/transcripts", headers=admin, query_string=query)
    assert response.status_code == 200, response.get_json()
    return response.get_json()["data"]


def test_only_opted_in_users_are_kept_encrypted_and_reads_are_audited(app, people):
    client = app.test_client()
    assert client.get("/v1/me", headers=people["alice"]).get_json()["transcripts"] is True
    assert client.get("/v1/me", headers=people["bob"]).get_json()["transcripts"] is False
    prediction, _ = ask(app, people["alice"])
    ask(app, people["bob"], "bob's own question 9981")
    rows = listed(app, people["admin"])
    assert {row["user"] for row in rows} == {"alice"} and len(rows) == 2
    assert {row["route"] for row in rows} == {"/v1/predict", "/v1/chat/completions"}

    kept = {row["route"]: row for row in rows}["/v1/predict"]
    read = client.get(f"/admin/transcripts/{kept['id']}", headers=people["admin"]).get_json()
    assert read["messages"] == [{"role": "system", "content": SECRET_SYSTEM}, {"role": "user", "content": SECRET_QUESTION}]
    assert read["choices"][0]["text"] == prediction["response"] and read["expected_answer"] == "42"
    assert read["status"] == 200 and read["params"]["max_new_tokens"] == 12 and "decode" in read["phases"]
    assert "Bearer" not in json.dumps(read)
    chat = client.get(f"/admin/transcripts/{listed(app, people['admin'], user='alice')[0]['id']}",
                      headers=people["admin"]).get_json()
    assert [c["index"] for c in chat["choices"]] == [0, 1]
    audit = state(app).store.list_audit(action="transcript.read")
    assert audit[-1]["target"] == kept["id"] and audit[-1]["actor"] == "boss"

    # The database holds no text of them: the file and its write-ahead log, byte by byte (read by another
    # process: closing a file of the database here would drop this process's SQLite locks on it).
    database = state(app).settings.db_url.removeprefix("sqlite:///")
    stored = subprocess.run(["cat", *(p for p in (database, f"{database}-wal") if Path(p).exists())],
                            capture_output=True, check=True).stdout
    copy = backup.backup(state(app).settings.db_url, Path(database).parent / "backup.sqlite")
    stored += Path(copy["path"]).read_bytes()  # a backup too: the key folder is not in it
    for text in (SECRET_QUESTION, SECRET_SYSTEM, prediction["response"]):
        assert len(text) >= 12 and text.encode() not in stored, text


def test_a_token_without_the_admin_scope_reads_nothing(app, people):
    client = app.test_client()
    for path in ("/admin/transcripts", "/admin/transcripts/0123", "/admin/users/bob"):
        response = (client.delete if path.endswith("bob") else client.get)(path, headers=people["alice"])
        assert response.status_code == 403 and response.get_json()["error"]["code"], path
    assert client.get("/admin/transcripts/nope", headers=people["admin"]).get_json()["error"]["code"] == \
        "transcript_not_found"


def test_a_wrong_key_fails_loudly(app, people, tmp_path):
    kept = listed(app, people["admin"], user="alice")[0]
    held = state(app)
    other = tmp_path / "keys"
    other.mkdir(mode=0o700)
    path = other / f"transcripts-{kept['kid']}.key"
    path.write_bytes(base64.b64encode(b"\x01" * 32))
    path.chmod(0o600)
    with pytest.raises(TranscriptUnreadable):
        Transcripts(held.store, other).read(kept["id"])
    path.unlink()
    with pytest.raises(Exception, match="no transcripts key"):
        Transcripts(held.store, other).read(kept["id"])


def test_the_export_is_fine_tuning_jsonl_and_is_audited(app, people, tmp_path):
    held = state(app)
    out = tmp_path / "train.jsonl"
    env = state_env(tmp_path, VIBE_DB_URL=held.settings.db_url, VIBE_JWT_KEY_DIR=held.settings.jwt_key_dir,
                    VIBE_RATELIMIT_STORAGE_URI="memory://")
    admin_cli(env, "transcripts", "export", "--since", "2000-01-01", "--format", "chat", "--output", out)
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    examples = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(examples) == 3  # a prediction, and a chat of n=2: one example per choice
    for example in examples:
        assert set(example) == {"messages"} and example["messages"][-1]["role"] == "assistant"
        for message in example["messages"]:
            TypeAdapter(ROLES[message["role"]]).validate_python(message)
            assert isinstance(message["content"], str)
    assert any(m["content"] == SECRET_SYSTEM for e in examples for m in e["messages"])
    audit = held.store.list_audit(action="transcript.export")[0]
    assert audit["detail"]["count"] == 2 and audit["actor"].startswith("cli:")

    found = held.transcripts.export(datetime(2000, 1, 1, tzinfo=timezone.utc), "alice")
    scored = list(lines(found, "eval"))
    assert {line["question"] for line in scored} == {SECRET_QUESTION}
    assert [line["expected_answer"] for line in scored if "expected_answer" in line] == ["42"]


def test_the_chat_format_puts_the_reasoning_in_think_tags():
    transcript = {"status": 200, "messages": [{"role": "user", "content": "2+2?"}], "choices": [
        {"index": 0, "reasoning": "two and two ", "answer": " \\boxed{4}", "final_answer": "4"},
        {"index": 1, "reasoning": None, "answer": "4", "final_answer": None}]}
    failed = {**transcript, "status": 504}
    chat = list(lines([transcript, failed], "chat"))
    assert [line["messages"][-1]["content"] for line in chat] == ["<think>\ntwo and two\n</think>\n\n\\boxed{4}", "4"]


def test_batch_lines_are_kept_as_live_requests_are(app, people):
    user = BatchUser(app, "carol")
    state(app).store.update_user("carol", transcripts=True)
    batch = user.submit("/v1/predict", {"question": "a batch question", "max_new_tokens": 4})
    assert user.first_line(batch)["response"]["status_code"] == 200
    assert state(app).transcript_log.flush()
    rows = listed(app, people["admin"], user="carol")
    assert [(row["route"], row["status"]) for row in rows] == [("/v1/batches", 200)]
    assert rows[0]["request_id"].startswith(batch["id"])

    # Removing carol: refused while she stores files, then her tokens, sessions and transcripts go.
    client = app.test_client()
    refused = client.delete("/admin/users/carol", headers=people["admin"])
    assert refused.status_code == 409 and refused.get_json()["error"]["code"] == "user_has_data"
    for item in client.get("/v1/files", headers=user.headers).get_json()["data"]:
        assert client.delete(f"/v1/files/{item['id']}", headers=user.headers).status_code == 200
    removed = client.delete("/admin/users/carol", headers=people["admin"])
    assert removed.status_code == 200, removed.get_json()
    assert removed.get_json()["transcripts"] == 1 and removed.get_json()["tokens"] == 1
    assert listed(app, people["admin"], user="carol") == []
    assert client.get("/v1/me", headers=user.headers).status_code == 401
    assert state(app).store.usage_rows("carol")  # accounting stays
    assert state(app).store.list_audit(action="user.remove")[0]["target"] == "carol"


def test_the_purge_removes_what_is_past_retention(tmp_path):
    now = [datetime(2026, 3, 1, tzinfo=timezone.utc)]
    store = Store(f"sqlite:///{tmp_path}/db.sqlite", clock=lambda: now[0])
    store.add_user("dora")
    kept = Transcripts(store, tmp_path / "keys")
    item = {"user": "dora", "model": "m", "route": "/v1/predict", "status": 200, "content": {"messages": []}}
    kept.write([{**item, "created_at": now[0] - timedelta(days=days), "request_id": f"r{days}"}
                for days in (40, 31, 29, 0)])
    keys.transcript_kids(tmp_path / "keys")  # made on first need, 0600
    assert oct((next((tmp_path / "keys").glob("transcripts-*.key")).stat().st_mode) & 0o777) == "0o600"
    assert kept.purge(timedelta(days=30)) == 2
    assert sorted(row["request_id"] for row in kept.list()) == ["r0", "r29"]
    now[0] += timedelta(days=2)
    assert kept.purge(timedelta(days=30)) == 1 and [row["request_id"] for row in kept.list()] == ["r0"]
    store.close()


def csrf(page):
    return re.search(r'name="csrf_token" value="([^"]+)"', page.get_data(as_text=True)).group(1)


def test_the_console_turns_them_on_shows_them_audited_and_removes_users(app, people):
    client = app.test_client()
    secret = app.extensions[KEY].access.issue_link("boss", timedelta(minutes=5))
    page = client.get(f"/admin/console/login/link/{secret}")
    assert client.post(f"/admin/console/login/link/{secret}", data={"csrf_token": csrf(page)}).status_code == 303
    user_page = client.get("/admin/console/users/bob")
    assert "not kept" in user_page.get_data(as_text=True)
    on = client.post("/admin/console/users/bob/transcripts", data={"csrf_token": csrf(user_page),
                                                                   "transcripts": "true"})
    assert on.status_code == 303 and state(app).store.get_user("bob")["transcripts"] is True

    listing = client.get("/admin/console/transcripts?user=alice")
    kept = listed(app, people["admin"], user="alice")[-1]
    assert listing.status_code == 200 and kept["id"] in listing.get_data(as_text=True)
    before = len(state(app).store.list_audit(action="transcript.read"))
    view = client.get(f"/admin/console/transcripts/{kept['id']}")
    assert view.status_code == 200 and SECRET_QUESTION in view.get_data(as_text=True)
    assert len(state(app).store.list_audit(action="transcript.read")) == before + 1

    bearer(app, "eve")
    page = client.get("/admin/console/users/eve")
    removed = client.post("/admin/console/users/eve/remove", data={"csrf_token": csrf(page)})
    assert removed.status_code == 303 and "eve" not in {u["name"] for u in state(app).store.list_users()}


def test_a_teams_flag_keeps_its_members_transcripts_and_the_export_filters_by_team(app, people):
    store = state(app).store
    store.add_team("kept-team", transcripts=True)
    carol = bearer(app, "carol")  # her own flag is off
    store.set_members("kept-team", add=["carol"])
    client = app.test_client()
    assert client.get("/v1/me", headers=carol).get_json()["transcripts"] is True  # she is told
    ask(app, carol, "carol's team question 5150")
    rows = listed(app, people["admin"], team="kept-team")
    assert {(row["user"], row["team"]) for row in rows} == {("carol", "kept-team")} and len(rows) == 2
    exported = state(app).transcripts.export(datetime(2020, 1, 1, tzinfo=timezone.utc), team="kept-team")
    assert {t["user"] for t in exported} == {"carol"}
    assert store.list_audit(action="transcript.export", limit=1)[0]["target"] == "team:kept-team"
    store.update_team("kept-team", transcripts=False)
    ask(app, carol, "after the team's flag is off 6160")
    assert len(listed(app, people["admin"], team="kept-team")) == 2  # nothing more kept
    assert client.get("/v1/me", headers=carol).get_json()["transcripts"] is False
