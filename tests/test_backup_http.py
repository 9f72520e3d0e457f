"""Backup of a live service under load with the real CLI, the database damaged, restored, and everything back:
users, tokens, the revocation, usage and audit rows, the batch job and its output."""

import json
import sqlite3
import threading

import openai
import pytest
import requests

from tests.support.batches import chat_line, jsonl, wait
from tests.support.tokens import user_token

pytestmark = pytest.mark.slow
TABLES = ("users", "tokens", "audit", "usage", "files", "batches", "batch_lines")


def table_rows(db_path):
    with sqlite3.connect(db_path) as conn:
        return {table: set(conn.execute(f"SELECT * FROM {table}").fetchall()) for table in TABLES}


def test_a_live_backup_restores_everything_after_the_database_is_damaged(start_server, tmp_path):
    server = start_server()
    db_path = server.env["VIBE_DB_URL"].removeprefix("sqlite:///")
    alice = user_token(server, "alice", "--rate-limit", "100000/minute", "--max-concurrent", 10)
    bob = user_token(server, "bob")
    bob_jti = json.loads(server.cli("--json", "tokens", "list", "--user", "bob").stdout)[0]["jti"]
    server.cli("tokens", "revoke", bob_jti)
    client = openai.OpenAI(base_url=server.url("/v1"), api_key=alice, max_retries=0, timeout=60)
    uploaded = client.files.create(file=("lines.jsonl", jsonl([chat_line(i) for i in range(3)])), purpose="batch")
    batch, _ = wait(client, client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                                  completion_window="24h").id)
    assert batch.status == "completed"
    output = client.files.content(batch.output_file_id).text

    stop, answered = threading.Event(), []

    def load():
        while not stop.is_set():
            response = requests.post(server.url("/v1/predict"), headers=server.auth(alice), timeout=60,
                                     json={"question": "What is 2 + 2?", "max_new_tokens": 2})
            answered.append(response.status_code)
    threads = [threading.Thread(target=load) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        while len(answered) < 5:  # the load is on
            threading.Event().wait(0.05)
        before = table_rows(db_path)
        saved = tmp_path / "live.backup"
        made = json.loads(server.cli("--json", "db", "backup", saved).stdout)
        during = len(answered)
        while len(answered) < during + 5:  # and went on through the backup
            threading.Event().wait(0.05)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert set(answered) == {200} and made["kind"] == "sqlite" and made["bytes"] > 0

    server.stop()
    with open(db_path, "r+b") as handle:  # damaged: its header and first pages overwritten
        handle.write(b"\xde\xad\xbe\xef" * 4096)
    assert server.cli("users", "list", check=False).returncode != 0
    restored = server.cli("db", "restore", saved)
    assert "restored the sqlite database" in restored.stdout
    server.start()

    after = table_rows(db_path)
    for table in TABLES:
        assert before[table] <= after[table], table  # every row the service had committed before the backup
    assert requests.post(server.url("/v1/predict"), headers=server.auth(alice), timeout=60,
                         json={"question": "Still here?", "max_new_tokens": 2}).status_code == 200
    refused = requests.post(server.url("/v1/predict"), headers=server.auth(bob), timeout=60,
                            json={"question": "And me?", "max_new_tokens": 2})
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "token_revoked"
    again = client.batches.retrieve(batch.id)
    assert again.status == "completed" and client.files.content(again.output_file_id).text == output
    actions = [row["action"] for row in json.loads(server.cli("--json", "audit", "--limit", "5").stdout)]
    assert actions[0] == "db.restore"
