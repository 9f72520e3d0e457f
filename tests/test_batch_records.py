"""Batch records shared by several servers on one database (SQLite and PostgreSQL): files live in the
database, a line is held by one runner at a time, a stopped runner's lines come back, a batch ends once."""

import io
import json
import os
import threading
import time
from datetime import timedelta

import pytest

from service.batches.tables import file_chunks
from auth.store import Store
from service.batches.records import CHUNK, BatchRecords, now
from service.errors import Refusal, status_of


@pytest.fixture
def two_servers(db_url, tmp_path):
    """The batch records of two servers: one database, a files folder each."""
    stores = Store(db_url), Store(db_url, upgrade=False)
    yield BatchRecords(stores[0].engine, tmp_path / "a"), BatchRecords(stores[1].engine, tmp_path / "b")
    for store in stores:
        store.close()


def batch_of(records, count, user="alice"):
    lines = [(f"c{i}", {"ids": [1, 2, i], "max_new_tokens": 4}) for i in range(count)]
    return records.create_batch(user, "/v1/predict", "file-x", "24h", 3600, None, lines, [])["id"]


@pytest.mark.parametrize("size", [0, 5, CHUNK, 2 * CHUNK + 17])
def test_a_file_uploaded_on_one_server_is_read_whole_on_the_other(two_servers, size):
    a, b = two_servers
    data = os.urandom(size)
    meta = a.add_file("alice", "batch", "in.jsonl", io.BytesIO(data), limit=10 * CHUNK)
    assert meta["bytes"] == size
    with b.open(meta["id"]) as handle:
        assert handle.read() == data
    assert b.get_file(meta["id"], "alice", False)["filename"] == "in.jsonl"
    b.delete_file(meta["id"], "alice", False)
    with pytest.raises(Refusal) as gone:
        a.get_file(meta["id"], "alice", False)
    assert status_of(gone.value) == 404


def test_a_file_over_the_limit_is_refused_and_nothing_is_kept(two_servers):
    a, _ = two_servers
    with pytest.raises(Refusal) as refused:
        a.add_file("alice", "batch", "big.jsonl", io.BytesIO(b"x" * 3000), limit=2048)
    assert status_of(refused.value) == 413
    assert a.list_files("alice", False) == []
    assert os.listdir(a.dir) == []  # the spool is gone too


def test_a_file_from_before_files_moved_into_the_database_is_still_read(two_servers):
    a, _ = two_servers
    meta = a._store("file-old", "alice", "batch", "old.jsonl", iter(()), 3)
    with a.engine.begin() as conn:  # as a file written by an earlier release: no pieces, bytes on disk
        conn.execute(file_chunks.delete().where(file_chunks.c.file_id == meta["id"]))
    with open(os.path.join(a.dir, "file-old"), "wb") as old:
        old.write(b"old")
    with a.open("file-old") as handle:
        assert handle.read() == b"old"


def test_two_runners_never_take_the_same_line(two_servers):
    a, b = two_servers
    batch = batch_of(a, 60)
    taken = {"a": [], "b": []}

    def take(records, name):
        while (claimed := records.claim(batch, f"ledger:{name}:1:1")) is not None:
            taken[name].append(claimed[0])

    threads = [threading.Thread(target=take, args=(a, "a")), threading.Thread(target=take, args=(b, "b"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(taken["a"] + taken["b"]) == list(range(60))  # every line once, none twice


def test_only_the_holder_finishes_a_line_and_a_stopped_holders_lines_come_back(two_servers):
    a, b = two_servers
    batch = batch_of(a, 2)
    first, second = a.claim(batch, "ledger:a:1:1"), a.claim(batch, "ledger:a:1:1")
    assert not b.finish_line(batch, first[0], True, {"x": 1}, "ledger:b:1:1")  # not b's line
    later = now() + timedelta(seconds=1)
    assert b.reclaim_stale(now() - timedelta(seconds=60), "ledger:b:1:1") == 0  # a's hold is fresh
    assert b.reclaim_stale(later, "ledger:b:1:1") == 2  # a stopped renewing: both lines are pending again
    assert not a.finish_line(batch, first[0], True, {"late": 1}, "ledger:a:1:1")  # a's late answer is dropped
    retaken = b.claim(batch, "ledger:b:1:1")
    assert retaken[0] == first[0]
    assert b.finish_line(batch, retaken[0], True, {"x": 2}, "ledger:b:1:1")
    assert b.unfinished(batch) == 1 and second is not None


def test_a_lines_answer_and_its_usage_row_are_stored_together_or_not_at_all(two_servers, db_url):
    a, b = two_servers
    batch = batch_of(a, 1)
    line = a.claim(batch, "ledger:a:1:1")[0]
    row = dict(user="alice", route="/v1/batches", status=200, latency_ms=5, request_id=f"{batch}:{line}",
               model="m", prompt_tokens=3, completion_tokens=4, finish_reason="length", cached=False)
    assert not b.finish_line(batch, line, True, {"x": 1}, "ledger:b:1:1", usage=row)  # not b's: neither stored
    store = Store(db_url, upgrade=False)
    try:
        assert store.usage_rows("alice") == []
        assert a.finish_line(batch, line, True, {"x": 2}, "ledger:a:1:1", usage=row)
        stored = store.usage_rows("alice")
        assert [(r["request_id"], r["completion_tokens"]) for r in stored] == [(f"{batch}:{line}", 4)]
        assert not a.finish_line(batch, line, True, {"x": 3}, "ledger:a:1:1", usage=row)  # done: no second row
        assert len(store.usage_rows("alice")) == 1
    finally:
        store.close()


def test_a_beat_keeps_a_runners_lines(two_servers):
    a, b = two_servers
    batch = batch_of(a, 1)
    a.claim(batch, "ledger:a:1:1")
    cutoff = now() + timedelta(milliseconds=50)
    time.sleep(0.1)
    a.beat("ledger:a:1:1")
    assert b.reclaim_stale(cutoff, "ledger:b:1:1") == 0
    assert a.running_owners() == {"ledger:a:1:1"}
    assert b.reclaim("ledger:a:1:1") == 1 and a.running_owners() == set()


def test_a_batch_is_finalized_once_whichever_server_ends_it(two_servers):
    a, b = two_servers
    batch = batch_of(a, 3)
    for records, owner in ((a, "ledger:a:1:1"), (b, "ledger:b:1:1"), (a, "ledger:a:1:1")):
        line, custom_id, _ = records.claim(batch, owner)
        assert records.finish_line(batch, line, True, {"custom_id": custom_id}, owner)
    results = []
    threads = [threading.Thread(target=lambda r=r: results.append(r.finalize(batch, "alice", "completed",
                                                                             "completed_at"))) for r in (a, b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(results) == [False, True]
    done = b.get_batch(batch, "alice", False)
    assert done["status"] == "completed" and done["request_counts"]["completed"] == 3
    with a.open(done["output_file_id"]) as handle:
        assert [json.loads(line)["custom_id"] for line in handle] == ["c0", "c1", "c2"]
    assert [f["purpose"] for f in a.list_files("alice", False)] == ["batch_output"]
