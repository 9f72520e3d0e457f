"""Group commit of usage rows: many requests share a transaction, and each waits for its own row's commit."""

import threading

import pytest

from auth.store import Store
from service.records.usagelog import UsageLog


def row(i):
    return {"user": "u", "route": "/v1/predict", "status": 200, "prompt_tokens": i, "completion_tokens": 1,
            "latency_ms": 3, "finish_reason": "length", "request_id": f"r{i}"}


def test_concurrent_writes_are_each_committed_before_they_return(db_url):
    store = Store(db_url)
    usage_log, seen, errors = UsageLog(store), {}, []

    def request(i):
        try:
            usage_log.write(**row(i))
            seen[i] = any(r["request_id"] == f"r{i}" for r in store.usage_rows(limit=1000))  # visible already
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=request, args=(i,)) for i in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(seen) == 64 and all(seen.values())
    assert sorted(r["prompt_tokens"] for r in store.usage_rows(limit=1000)) == list(range(64))
    store.close()


def test_a_failed_commit_is_reported_to_every_writer_of_its_group(tmp_path):
    store = Store(f"sqlite:///{tmp_path}/db.sqlite")
    usage_log = UsageLog(store)
    with pytest.raises(Exception):
        usage_log.write(**{**row(1), "user": None})  # NOT NULL: the transaction fails
    usage_log.write(**row(2))  # the writer thread goes on
    assert [r["request_id"] for r in store.usage_rows()] == ["r2"]
