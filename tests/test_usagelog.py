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


def test_a_rows_prefix_cached_tokens_are_written_and_summed_by_day(tmp_path):
    from service.inference.generation import GenerationResult
    from service.records.accounting import Usage, usage_row
    from service.serving.caller import Caller
    from service.serving.job import Job

    store = Store(f"sqlite:///{tmp_path}/db.sqlite")
    usage_log = UsageLog(store)
    first = GenerationResult("a", [1, 2], 10, "stop", 0, 0, cached_tokens=6)
    first.others = (GenerationResult("b", [3], 10, "stop", 0, 0, index=1),)  # choice 0 carries the request's
    for request_id, usage in [("r1", Usage.of(first)), ("r2", Usage.of(GenerationResult("c", [4], 8, "stop", 0, 0,
                                                                                        cached_tokens=3))),
                              ("hit", Usage(10, 3, "stop", cached=True, cached_tokens=10))]:  # response cache
        usage_log.write(**usage_row(Job(Caller("u"), usage=usage), "/v1/chat/completions", 200, 0.1, request_id))
    rows = {r["request_id"]: r for r in store.usage_rows("u")}
    assert {name: row["cached_tokens"] for name, row in rows.items()} == {"r1": 6, "r2": 3, "hit": 10}
    [day] = store.usage_by_day("u")
    assert (day["cached_tokens"], day["prompt_tokens"], day["cached"]) == (9, 18, 1)  # computed requests' only
    store.close()
