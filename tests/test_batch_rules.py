"""Batches and files under the live rules, in process: rate limits, storage quotas, expiry, admin scope,
safe filenames, the line cap before any preparation.

The app is real (tests.support.inprocess); the rate-limit window moves by a clock injected into limits'
memory storage and the runner's view of it, never by sleeping.
"""

import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import limits.storage.memory
import pytest
from werkzeug.datastructures import FileStorage
from werkzeug.test import encode_multipart

from service.batches.files import now
from service.batches.runner import BatchRunner
from service.serving import pipeline
from service.serving.caller import Caller
from service.state import state
from tests.support.inprocess import BatchUser, bearer, make_app, stop_app

BODY = {"question": "What is 2 + 3?", "max_new_tokens": 2, "temperature": 0}


@pytest.fixture
def app(tiny_model, tmp_path):
    app = make_app(tiny_model, tmp_path)
    yield app
    stop_app(app)


class Clock:
    """time as limits' memory storage reads it, `offset` seconds ahead of the real one."""

    def __init__(self):
        self.offset = 0.0

    def time(self):
        return time.time() + self.offset

    def __getattr__(self, name):
        return getattr(time, name)


def until(check, timeout=60):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)  # under the polling limit (600/minute)


def test_lines_wait_for_the_rate_window_and_never_take_it_from_live_requests(app, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(limits.storage.memory, "time", clock)
    user = BatchUser(app, "five", rate_limit="5/hour")
    batch = user.submit("/v1/predict", *[BODY] * 6)  # the upload and the create: 2 of the hour's 5
    runner = BatchRunner(state(app))
    runner.rates.clock = clock.time
    runner.start()
    try:
        until(lambda: "five" in runner.rates.waiting and user.batch(batch["id"])["request_counts"]["completed"] == 3)
        # The batch took what live requests had left; the user's own live requests still get all 5.
        assert [user.live("/v1/predict", BODY).status_code for _ in range(4)] == [200, 200, 200, 429]
        time.sleep(0.3)  # a few runner looks: no line runs past the limit
        assert user.batch(batch["id"])["request_counts"] == {"total": 6, "completed": 3, "failed": 0}
        clock.offset += 3601  # the window moves: the lines go on
        until(lambda: user.batch(batch["id"])["status"] == "completed")
    finally:
        runner.stop(timeout=30)
    assert user.batch(batch["id"])["request_counts"] == {"total": 6, "completed": 6, "failed": 0}


def test_a_10001_line_file_is_refused_before_any_line_is_prepared(app):
    user = BatchUser(app, "many")
    line = json.dumps({"custom_id": "x", "method": "POST", "url": "/v1/predict", "body": BODY}) + "\n"
    upload = user.upload(line.encode() * 10_001)
    assert upload.status_code == 200
    started = time.monotonic()
    created = user.create(upload.get_json()["id"], "/v1/predict")
    elapsed = time.monotonic() - started
    assert created.status_code == 200 and created.get_json()["status"] == "failed"
    assert [e["code"] for e in created.get_json()["errors"]["data"]] == ["too_many_lines"]
    assert elapsed < 1.0, elapsed


def test_rapid_creates_count_against_the_rate_limit_and_polling_does_not(app):
    user = BatchUser(app, "rapid", rate_limit="10/minute")
    file_id = user.upload(b"not json\n").get_json()["id"]
    answers = [user.create(file_id, "/v1/predict") for _ in range(20)]
    assert [a.status_code for a in answers] == [200] * 9 + [429] * 11  # the upload was the tenth request
    assert answers[0].get_json()["errors"]["data"][0]["code"] == "invalid_json"  # still refused at create
    assert {a.get_json()["error"]["code"] for a in answers[9:]} == {"rate_limit_exceeded"}
    for _ in range(30):  # polling has its own, generous limit
        assert user.client.get(f"/v1/batches/{answers[0].get_json()['id']}", headers=user.headers).status_code \
            == 200


@pytest.mark.parametrize("quota,uploads,code", [
    ({"max_files": 2}, [b"{}\n"] * 3, "file_quota_exceeded"),
    ({"max_stored_bytes": 100}, [b"x" * 60, b"y" * 60], "storage_quota_exceeded"),
])
def test_a_user_past_a_storage_quota_gets_429_naming_it(app, quota, uploads, code):
    user = BatchUser(app, "keeper", **quota)
    answers = [user.upload(content) for content in uploads]
    assert [a.status_code for a in answers] == [200] * (len(uploads) - 1) + [429]
    error = answers[-1].get_json()["error"]
    assert (error["code"], error["param"]) == (code, *quota) and next(iter(quota)) in error["message"]
    me = user.client.get("/v1/me", headers=user.headers).get_json()
    assert me["storage"]["limits"][next(iter(quota))] == quota[next(iter(quota))]
    assert me["storage"]["used"]["files"] == len(uploads) - 1


def test_open_and_daily_batch_quotas_are_admin_settable(app):
    user = BatchUser(app, "opener", daily_batches=2)
    file_id = user.upload(b"not json\n").get_json()["id"]
    assert [user.create(file_id, "/v1/predict").status_code for _ in range(3)] == [200, 200, 429]
    me = user.client.get("/v1/me", headers=user.headers).get_json()
    assert me["storage"]["effective_limits"]["daily_batches"] == 2 and me["storage"]["used"]["batches_today"] == 2
    assert me["storage"]["effective_limits"]["max_open_batches"] == state(app).settings.max_open_batches
    patched = user.client.patch("/admin/users/opener", headers=user.admin, json={"daily_batches": 5})
    assert patched.status_code == 200 and patched.get_json()["daily_batches"] == 5
    assert user.create(file_id, "/v1/predict").status_code == 200


def test_files_expire_as_asked_or_by_default_and_the_purge_deletes_them(app):
    user = BatchUser(app, "brief")
    short = user.upload(b"{}\n", **{"expires_after[anchor]": "created_at", "expires_after[seconds]": "3600"})
    default = user.upload(b"{}\n").get_json()
    assert short.get_json()["expires_at"] - short.get_json()["created_at"] == 3600
    assert default["expires_at"] - default["created_at"] == state(app).settings.file_expiry_s
    bad = user.upload(b"{}\n", **{"expires_after[anchor]": "created_at", "expires_after[seconds]": "5"})
    assert (bad.status_code, bad.get_json()["error"]["param"]) == (400, "expires_after.seconds")
    assert state(app).batches.purge_expired(now() + timedelta(hours=2)) == 1
    file_id = short.get_json()["id"]
    assert user.client.get(f"/v1/files/{file_id}/content", headers=user.headers).status_code == 404
    assert user.client.get(f"/v1/files/{default['id']}/content", headers=user.headers).status_code == 200


def test_an_admins_generate_token_sees_only_its_own_files(app):
    owner = BatchUser(app, "owner")
    theirs = owner.upload(b"{}\n").get_json()["id"]
    narrow = bearer(app, "boss", "generate", is_admin=True)
    client = app.test_client()
    mine = client.post("/v1/files", headers=narrow, content_type="multipart/form-data",
                       data={"purpose": "batch", "file": (io.BytesIO(b"{}\n"), "m.jsonl")})
    for call in (client.get, client.delete):
        assert call(f"/v1/files/{theirs}", headers=narrow).status_code == 404
    assert client.get(f"/v1/files/{theirs}/content", headers=narrow).status_code == 404
    listed = [f["id"] for f in client.get("/v1/files", headers=narrow).get_json()["data"]]
    assert listed == [mine.get_json()["id"]]
    assert client.get(f"/v1/files/{theirs}", headers=owner.admin).status_code == 200  # with the admin scope


def test_a_control_character_in_a_filename_is_refused_and_an_old_one_downloads_safely(app):
    user = BatchUser(app, "namer")
    # A client sends a CR/LF in a name RFC 2231's way (a raw one would break the part's header).
    raw = (b'--B\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--B\r\n'
           b"Content-Disposition: form-data; name=\"file\"; filename*=UTF-8''evil%0D%0ASet-Cookie%3A%20a%3Db.jsonl"
           b"\r\nContent-Type: application/jsonl\r\n\r\n{}\n\r\n--B--\r\n")
    refused = user.client.post("/v1/files", headers=user.headers, data=raw,
                               content_type="multipart/form-data; boundary=B")
    error = refused.get_json()["error"]
    assert (refused.status_code, error["code"], error["param"]) == (400, "control_character", "file")
    records = state(app).batches
    records._store("file-old", "namer", "batch", "evil\r\nSet-Cookie: a=b.jsonl", iter([b"{}\n"]), 3)
    records._store("file-accent", "namer", "batch", 'r\u00e9sum\u00e9 "1".jsonl', iter([b"{}\n"]), 3)
    old = user.client.get("/v1/files/file-old/content", headers=user.headers)
    assert old.status_code == 200 and old.data == b"{}\n" and "Set-Cookie" not in old.headers
    assert old.headers["Content-Disposition"] == \
        "attachment; filename=\"evil__Set-Cookie: a=b.jsonl\"; filename*=UTF-8''evil%0D%0ASet-Cookie%3A%20a%3Db.jsonl"
    accent = user.client.get("/v1/files/file-accent/content", headers=user.headers)
    assert accent.headers["Content-Disposition"] == \
        "attachment; filename=\"r_sum_ _1_.jsonl\"; filename*=UTF-8''r%C3%A9sum%C3%A9%20%221%22.jsonl"
    assert user.upload(b"{}\n", filename="dir/sub/caf\u0065\u0301.jsonl").get_json()["filename"] == "caf\u00e9.jsonl"


def test_concurrent_uploads_and_creates_never_pass_a_quota_together(app):
    user = BatchUser(app, "racer", max_files=3, max_open_batches=1, max_concurrent=10)
    lines = "".join(json.dumps({"custom_id": f"l{i}", "method": "POST", "url": "/v1/predict", "body": BODY}) + "\n"
                    for i in range(4))  # a few lines to prepare: the creates overlap
    file_id = user.upload(lines.encode()).get_json()["id"]

    def create(_):
        return app.test_client().post("/v1/batches", headers=user.headers, json={
            "input_file_id": file_id, "endpoint": "/v1/predict", "completion_window": "24h"})

    def upload(_):
        boundary, body = encode_multipart({"purpose": "batch", "file": FileStorage(io.BytesIO(b"{}\n"), "x.jsonl")})
        return app.test_client().post("/v1/files", headers=user.headers, data=body,
                                      content_type=f"multipart/form-data; boundary={boundary}")

    with ThreadPoolExecutor(6) as pool:
        created = list(pool.map(create, range(6)))
        uploaded = list(pool.map(upload, range(6)))
    assert sorted(r.status_code for r in created) == [200] + [429] * 5, [r.get_json() for r in created]
    assert {r.get_json()["error"]["param"] for r in created if r.status_code == 429} == {"max_open_batches"}
    assert sorted(r.status_code for r in uploaded) == [200] * 2 + [429] * 4  # the input file and two more
    me = user.client.get("/v1/me", headers=user.headers).get_json()["storage"]["used"]
    assert (me["files"], me["open_batches"]) == (3, 1)


def test_a_create_prepares_its_lines_on_one_of_the_users_concurrency_slots(app):
    user = BatchUser(app, "prepper", max_concurrent=1)
    file_id = user.upload(b"not json\n").get_json()["id"]
    with pipeline.preparing(state(app), Caller(user="prepper", max_concurrent=1)):  # the user's one slot, taken
        refused = user.create(file_id, "/v1/predict")
    assert refused.status_code == 429 and refused.get_json()["error"]["code"] == "concurrency_limit_exceeded"
    assert user.create(file_id, "/v1/predict").status_code == 200  # the slot came back
