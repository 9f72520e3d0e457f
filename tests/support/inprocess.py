"""An app in process (Flask's test client), its users and their one-line batches, run by a fresh runner.

The routes, serving, the batch runner and the store are the real ones; the app's own runner is stopped, so
a test sets the stage (a user disabled, an allow-list narrowed) before a runner takes a line.
"""

import io
import json
import time
from contextlib import contextmanager
from datetime import timedelta

from werkzeug.datastructures import FileStorage
from werkzeug.test import encode_multipart

from auth import keys
from auth.store import utcnow
from auth.tokens import issue_token
from service.app import create_app
from service.batches.runner import BatchRunner
from service.settings import load_settings
from service.state import state


def make_app(tiny_model, tmp_path, **overrides):
    """An app on a fresh SQLite database and memory:// counters, its runner stopped, its models ready."""
    keys.generate(tmp_path / "keys")
    settings = dict(model_path=tiny_model, torch_threads=1, jwt_key_dir=tmp_path / "keys",
                    db_url=f"sqlite:///{tmp_path}/db.sqlite", files_dir=tmp_path / "files", cache="off",
                    max_prompt_tokens=160, ratelimit_storage_uri="memory://")
    app = create_app(load_settings(**{**settings, **overrides}))
    state(app).batch_runner.stop(timeout=10)
    deadline = time.monotonic() + 60
    while not all(served.engine.ready for served in state(app).models) and time.monotonic() < deadline:
        time.sleep(0.05)
    return app


def stop_app(app):
    """Stop what the app started: its engines, its document readers and answer checkers, its database."""
    held = state(app)
    for served in held.models:
        served.engine.stop(timeout=30)
    for pool in (held.documents, held.checker):
        if pool is not None:
            pool.close()
    held.store.close()


class StoreClock:
    """A store's clock (the guard's and the token cache's too), `offset` ahead of the real one."""

    def __init__(self):
        self.offset = timedelta()

    def __call__(self):
        return utcnow() + self.offset


@contextmanager
def moved_clock(app):
    """The app's store on a StoreClock the test moves; its own clock again afterwards."""
    store = state(app).store
    before, store.clock = store.clock, StoreClock()
    try:
        yield store.clock
    finally:
        store.clock = before


def bearer(app, name, scope="generate", **quotas):
    """The Authorization header of a new user `name`'s token of `scope`."""
    state(app).store.add_user(name, **quotas)
    return token_header(app, name, scope)


def token_header(app, name, scope="generate"):
    """The Authorization header of a new token of `scope` for the existing user `name`."""
    store, keyset, settings = state(app).store, state(app).keys, state(app).settings
    token, _ = issue_token(store, keyset, name, scope=scope, issuer=settings.jwt_issuer,
                           audience=settings.jwt_audience)
    return {"Authorization": f"Bearer {token}"}


class BatchUser:
    """A user of the app with a token, who asks live and by batch; an admin (with the admin scope) watches
    the batches (the user may be disabled by then)."""

    def __init__(self, app, name, **quotas):
        self.app, self.client, self.name = app, app.test_client(), name
        self.headers = bearer(app, name, **quotas)
        self.admin = bearer(app, f"{name}-admin", "generate admin", is_admin=True)

    def live(self, endpoint, body):
        return self.client.post(endpoint, json=body, headers=self.headers)

    def upload(self, content, filename="in.jsonl", **fields):
        """POST /v1/files of `content` (bytes): the response. The body is encoded here, in memory (the test
        client would spool a large one to a temporary file it never closes)."""
        boundary, body = encode_multipart({"purpose": "batch", "file": FileStorage(io.BytesIO(content), filename), **fields})
        return self.client.post("/v1/files", headers=self.headers, data=body,
                                content_type=f"multipart/form-data; boundary={boundary}")

    def create(self, file_id, endpoint):
        return self.client.post("/v1/batches", headers=self.headers, json={
            "input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h"})

    def submit(self, endpoint, *bodies):
        """A batch of `bodies` (custom ids "only", or "l0", "l1", ...): the created batch."""
        ids = ["only"] if len(bodies) == 1 else [f"l{i}" for i in range(len(bodies))]
        content = "".join(json.dumps({"custom_id": i, "method": "POST", "url": endpoint, "body": body}) + "\n"
                          for i, body in zip(ids, bodies))
        upload = self.upload(content.encode())
        assert upload.status_code == 200, upload.get_json()
        created = self.create(upload.get_json()["id"], endpoint)
        assert created.status_code == 200, created.get_json()
        return created.get_json()

    def batch(self, batch_id):
        return self.client.get(f"/v1/batches/{batch_id}", headers=self.admin).get_json()

    def run(self, batch, until=lambda b: b["status"] in ("completed", "failed"), runner=None):
        """Run `batch` with a fresh runner (or `runner`) until `until(batch)`: the batch as it is then."""
        runner = runner or BatchRunner(state(self.app)).start()
        try:
            deadline = time.monotonic() + 60
            while not until(batch) and time.monotonic() < deadline:
                time.sleep(0.1)  # under the polling limit (600/minute) however long the batch takes
                batch = self.batch(batch["id"])
        finally:
            runner.stop(timeout=30)
        return batch

    def first_line(self, batch):
        """Run `batch` to its end: its one output or error line."""
        batch = self.run(batch)
        assert batch["status"] == "completed", batch
        return self.lines(batch["output_file_id"] or batch["error_file_id"])[0]

    def lines(self, file_id):
        content = self.client.get(f"/v1/files/{file_id}/content", headers=self.admin).get_data(as_text=True)
        return [json.loads(line) for line in content.splitlines()]

    def rows(self):
        return state(self.app).store.usage_rows(self.name)
