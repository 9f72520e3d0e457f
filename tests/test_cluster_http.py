"""Two app servers behind one nginx on loopback, sharing one PostgreSQL and one Redis: the cluster of
ansible/site.yml in one process tree (tests/test_deploy_cluster.py deploys the real one, `make
deploy-test-cluster`).

Each server has its own files folder and its own copy of the key set, as on two machines. A file uploaded
to one is read from the other; a user's rate limit is exact across both; killing one server under load fails
only the requests it was answering (nginx's JSON 502) and a batch it was working on completes on the other,
every line exactly once.
"""

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import requests

from service.batches.tables import batch_lines
from auth.store import Store
from tests.support.databases import Redis
from tests.support.load import Load
from tests.support.nginx import Nginx, make_certificate, render
from tests.support.servers import Server, free_port

pytestmark = pytest.mark.slow  # two servers, nginx, PostgreSQL and Redis


class Peer(Server):
    """Another app server on the first one's database and Redis, with its own key folder (a copy) and files."""

    def __init__(self, first, state_dir):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = state_dir / f"gunicorn-{self.port}.log"
        shutil.copytree(first.env["VIBE_JWT_KEY_DIR"], state_dir / "keys")
        self.env = {**first.env, "VIBE_BIND": f"127.0.0.1:{self.port}", "VIBE_JWT_KEY_DIR": str(state_dir / "keys"),
                    "VIBE_FILES_DIR": str(state_dir / "files")}
        self.token, self.proc = first.token, None


@pytest.fixture(scope="module")
def cluster(start_server, postgres, tmp_path_factory):
    redis = Redis(tmp_path_factory.mktemp("redis-cluster")).start()
    settings = dict(VIBE_DB_URL=postgres.create_db("cluster"), VIBE_RATELIMIT_STORAGE_URI=redis.uri,
                    VIBE_BATCH_LEASE_S=10, VIBE_MAX_BATCH_SIZE=4, VIBE_BATCH_RESERVED_ROWS=1, VIBE_PROXY_FIX_HOPS=1,
                    VIBE_REQUEST_DEADLINE_S=300)
    first = start_server(**settings)
    second = Peer(first, tmp_path_factory.mktemp("peer")).start()
    folder = Path(tempfile.mkdtemp(prefix="vibethinker-cluster-"))
    cert, key = make_certificate(folder)
    https_port = free_port()
    nginx = Nginx(folder, render(
        server_name="localhost", http_port=free_port(), https_port=https_port, listen_address="127.0.0.1",
        app_servers=[f"127.0.0.1:{first.port}", f"127.0.0.1:{second.port}"], socket_path="unused",
        cert_path=cert, key_path=key, max_body_bytes=65536, proxy_read_timeout_s=120, req_rate="100r/s",
        req_burst=100, conn_limit=100, metrics_allow=["127.0.0.1"], admin_allow=["127.0.0.1"]))
    checked = nginx.test_config()
    assert checked.returncode == 0, checked.stderr
    nginx.start()
    yield {"servers": (first, second), "front": f"https://localhost:{https_port}", "cert": str(cert)}
    nginx.stop()
    second.stop()
    redis.stop()
    shutil.rmtree(folder, ignore_errors=True)


def through(cluster, method, path, token, **kwargs):
    return requests.request(method, cluster["front"] + path, headers={"Authorization": f"Bearer {token}"},
                            verify=cluster["cert"], timeout=300, **kwargs)


def test_a_file_uploaded_to_one_server_is_read_from_the_other(cluster):
    first, second = cluster["servers"]
    data = b"".join(json.dumps({"custom_id": f"f{i}", "method": "POST", "url": "/v1/predict",
                                "body": {"question": "x" * 1000}}).encode() + b"\n" for i in range(1500))
    uploaded = first.request("POST", "/v1/files", files={"file": ("big.jsonl", data)}, data={"purpose": "batch"})
    assert uploaded.status_code == 200, uploaded.text
    read = second.get(f"/v1/files/{uploaded.json()['id']}/content")
    assert read.status_code == 200 and read.content == data  # more than one stored piece, whole
    assert os.listdir(second.env["VIBE_FILES_DIR"]) == []  # from the database, not a folder


def test_a_users_rate_limit_is_exact_across_both_servers(cluster):
    first, second = cluster["servers"]
    first.cli("users", "add", "paced", "--rate-limit", "4/minute", "--max-concurrent", "20")
    token = second.cli("tokens", "issue", "paced").stdout.strip().splitlines()[-1]
    statuses = [server.post("/v1/predict", {"question": "hi", "max_new_tokens": 1}, token=token).status_code
                for server in (first, second) * 4]
    assert sorted(statuses) == [200] * 4 + [429] * 4, statuses


def test_killing_one_server_fails_only_its_requests_and_its_batch_lines_run_on_the_other(cluster, long_question):
    first, second = cluster["servers"]
    first.cli("users", "add", "steady", "--max-concurrent", "40", "--rate-limit", "1000/minute")
    token = first.cli("tokens", "issue", "steady").stdout.strip().splitlines()[-1]
    lines = b"".join(json.dumps({"custom_id": f"k{i}", "method": "POST", "url": "/v1/predict", "body": {
        "question": long_question, "max_new_tokens": 300, "temperature": 0}}).encode() + b"\n" for i in range(10))
    uploaded = through(cluster, "POST", "/v1/files", token, files={"file": ("k.jsonl", lines)},
                       data={"purpose": "batch"}).json()
    batch = through(cluster, "POST", "/v1/batches", token, json={
        "input_file_id": uploaded["id"], "endpoint": "/v1/predict", "completion_window": "24h"}).json()

    def ask(_session, _request_id):  # sized by the server: never a 400
        return through(cluster, "POST", "/v1/predict", token, json={"question": long_question, "temperature": 0})

    store = Store(first.env["VIBE_DB_URL"], upgrade=False)
    try:
        deadline = time.monotonic() + 60
        while not any(o and o.startswith(f"ledger:{os.uname().nodename}:{second.proc.pid}:")
                      for o in _owners(store, batch["id"])):  # the second server holds some of the lines
            assert time.monotonic() < deadline, "the second server never took a batch line"
            time.sleep(0.05)
        # Clients that ask again and again until the server is dead: requests are in flight on it whatever the speed.
        with Load(6, ask) as load:
            time.sleep(1.5)
            victim = psutil.Process(second.proc.pid)
            for process in [victim, *victim.children(recursive=True)]:
                process.kill()
            second.proc.wait(10)
        kinds = sorted("ok" if status == 200 else json.loads(text)["error"]["code"] if status else text
                       for _, status, text, *_ in load.outcomes)
        assert set(kinds) == {"ok", "bad_gateway"}, load.outcomes  # the killed server's requests failed, as JSON
        after = [through(cluster, "POST", "/v1/predict", token, json={"question": "hi", "max_new_tokens": 2})
                 for _ in range(4)]
        assert [a.status_code for a in after] == [200] * 4, [a.text for a in after]
        deadline = time.monotonic() + 240
        while batch["status"] not in ("completed", "failed", "cancelled", "expired"):
            assert time.monotonic() < deadline, batch
            time.sleep(0.5)
            batch = first.get(f"/v1/batches/{batch['id']}", token=token).json()
        assert batch["status"] == "completed" and batch["request_counts"]["completed"] == 10, batch
        output = first.get(f"/v1/files/{batch['output_file_id']}/content", token=token).text.splitlines()
        assert sorted(json.loads(line)["custom_id"] for line in output) == sorted(f"k{i}" for i in range(10))
        rows = [r["request_id"] for r in store.usage_rows(limit=10_000) if r["request_id"].startswith(batch["id"])]
        assert sorted(rows) == sorted(set(rows)) and len(rows) == 10  # each line answered and counted once
    finally:
        store.close()
        second.start()


def _owners(store, batch_id):
    with store.engine.connect() as conn:
        return {row.owner for row in conn.execute(batch_lines.select().where(batch_lines.c.batch_id == batch_id))}
