"""Two app servers behind one nginx on loopback, sharing one PostgreSQL and one Redis: the cluster of
ansible/site.yml in one process tree (tests/test_deploy_cluster.py deploys the real one, `make
deploy-test-cluster`).

Each server has its own files folder and its own copy of the key set, as on two machines. A file uploaded
to one is read from the other; a user's rate limit is exact across both, and so are a team's budget,
concurrency cap and rate limit shared by members on both; a budget alert reached by both at once arrives once;
killing one server under load fails only the requests it was answering (nginx's JSON 502) and a batch it was
working on completes on the other, every line exactly once.
"""

import json
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
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
from tests.support.webhook import Webhook

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
    webhook = Webhook().__enter__()  # where both servers send budget alerts
    settings = dict(VIBE_DB_URL=postgres.create_db("cluster"), VIBE_RATELIMIT_STORAGE_URI=redis.uri,
                    VIBE_BATCH_LEASE_S=10, VIBE_MAX_BATCH_SIZE=4, VIBE_BATCH_RESERVED_ROWS=1, VIBE_PROXY_FIX_HOPS=1,
                    VIBE_REQUEST_DEADLINE_S=300, VIBE_ALERT_TARGETS=json.dumps([webhook.url]))
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
    yield {"servers": (first, second), "front": f"https://localhost:{https_port}", "cert": str(cert),
           "webhook": webhook}
    webhook.__exit__(None, None, None)
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


def _team(first, team, *options, members=2):
    """A team of `members` users (each with ample limits of their own) and a token for each, issued on `first`."""
    first.cli("teams", "add", team, *options)
    tokens = []
    for i in range(members):
        name = f"{team}-{i}"
        first.cli("users", "add", name, "--rate-limit", "1000/minute", "--max-concurrent", "20")
        first.cli("teams", "members", team, "--add", name)
        tokens.append(first.cli("tokens", "issue", name).stdout.strip().splitlines()[-1])
    return tokens


def _code(response):
    return "ok" if response.status_code == 200 else response.json()["error"]["code"]


def test_a_teams_rate_limit_is_exact_for_members_on_both_servers(cluster):
    first, second = cluster["servers"]
    one, two = _team(first, "paced-team", "--rate-limit", "6/minute")
    answers = [server.post("/v1/predict", {"question": "hi", "max_new_tokens": 1}, token=token)
               for server, token in ((first, one), (second, two)) * 6]
    assert [_code(a) for a in answers].count("ok") == 6, [a.text for a in answers]
    refused = [a.json()["error"] for a in answers if a.status_code != 200]
    assert {e["code"] for e in refused} == {"rate_limit_exceeded"} and len(refused) == 6
    assert all("team paced-team" in e["message"] for e in refused), refused


def test_a_teams_concurrency_cap_is_shared_by_members_on_both_servers(cluster, long_question):
    """Six long answers asked at once by two members on two servers: the team's two slots admit two, however
    the requests fall; the others are refused at once, naming the team."""
    first, second = cluster["servers"]
    one, two = _team(first, "capped-team", "--max-concurrent", "2")
    ask = {"question": long_question, "max_new_tokens": 2048, "temperature": 0}  # seconds of decoding each
    calls = [(first, one), (second, two), (second, one), (first, two), (first, one), (second, two)]
    start = threading.Barrier(len(calls))

    def call(pair):
        start.wait()
        return pair[0].post("/v1/predict", ask, token=pair[1])
    with ThreadPoolExecutor(len(calls)) as pool:
        answers = list(pool.map(call, calls))
    assert sorted(_code(a) for a in answers) == ["concurrency_limit_exceeded"] * 4 + ["ok"] * 2, \
        [a.text[:200] for a in answers]
    assert all("team capped-team" in a.json()["error"]["message"] for a in answers if a.status_code != 200)
    assert _code(second.post("/v1/predict", {"question": "hi", "max_new_tokens": 1}, token=two)) == "ok"  # freed


def test_a_teams_budget_holds_for_members_on_both_servers_and_its_alerts_arrive_once(cluster, long_question):
    """Six requests at once on two servers, five of which fill the team's budget exactly: the sixth is refused
    (the budget refusing raises the 100 % alert, if settled use has not reached it first), and the settles on
    both servers reach 80 % and 100 %; each threshold's alert arrives once."""
    first, second = cluster["servers"]
    ask = {"question": long_question, "max_new_tokens": 8, "temperature": 0}  # never an end token before 8
    probe = first.post("/v1/predict", ask).json()["usage"]
    assert probe["completion_tokens"] == 8, probe
    need = probe["prompt_tokens"] + 8
    one, two = _team(first, "budget-team", "--daily-tokens", str(5 * need), members=2)
    webhook = cluster["webhook"]
    before = len(webhook.received)
    calls = [(first, one), (second, two), (first, two), (second, one), (first, one), (second, two)]
    with ThreadPoolExecutor(len(calls)) as pool:
        answers = list(pool.map(lambda call: call[0].post("/v1/predict", ask, token=call[1]), calls))
    codes = sorted(_code(a) for a in answers)
    assert codes == ["daily_token_quota_exceeded"] + ["ok"] * 5, [a.text for a in answers]
    refused = next(a.json()["error"] for a in answers if a.status_code != 200)
    assert "team budget-team's daily token budget" in refused["message"], refused
    team = first.get("/v1/me", token=one).json()["team"]
    assert team["name"] == "budget-team" and team["limits"]["daily_tokens"] == 5 * need
    assert team["today"]["total_tokens"] == 5 * need, team  # every member's tokens, from both servers
    alerts = webhook.wait_for(before + 2)[before:]
    time.sleep(2)  # a duplicate would come within the poll interval of either server
    alerts = webhook.received[before:]
    assert sorted(a["title"] for a in alerts) == [
        "VibeThinker: team budget-team reached 100% of its daily token budget",
        "VibeThinker: team budget-team reached 80% of its daily token budget"], alerts
    usage = first.get("/admin/usage?by=team&team=budget-team").json()["data"]
    assert usage[0]["team"] == "budget-team" and usage[0]["total_tokens"] == 5 * need


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
