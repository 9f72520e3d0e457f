"""Admission as plain functions: a concurrency slot and a budget reservation per generation, no Flask."""

import os
import subprocess
from datetime import datetime, timezone

import pytest

from service.admission import budget
from service.admission.counters import MemoryCounters, RedisCounters, StorageUnavailable
from service.errors import Refusal, headers_of, status_of, token_headers

NOW = datetime(2026, 12, 1, 23, 0, tzinfo=timezone.utc)


@pytest.fixture(params=["memory", "redis"])
def counters(request):
    if request.param == "memory":
        return MemoryCounters()
    redis = request.getfixturevalue("redis_server")
    store = RedisCounters(redis.uri)
    store._redis.flushall()
    return store


def admit(counters, need=100, daily=1000, cap=2, **kwargs):
    return budget.admit(counters, "u", budget.Limits(daily, cap), need, lease_s=60, now=NOW, **kwargs)


def test_a_lease_reserves_then_settles_to_what_was_used(counters):
    lease = admit(counters, need=300)
    assert lease.held and lease.total == 300 and lease.reset_s == 3601
    assert token_headers(lease) == {"x-ratelimit-limit-tokens": 1000, "x-ratelimit-remaining-tokens": 700,
                               "x-ratelimit-reset-tokens": "3601s"}
    budget.release(counters, lease, used=120)
    assert lease.total == 120
    assert admit(counters, need=880).total == 1000  # exactly what is left


def test_the_budget_refuses_what_could_pass_it_and_holds_no_slot(counters):
    admit(counters, need=900)
    with pytest.raises(Refusal) as refused:
        admit(counters, need=200)
    assert status_of(refused.value) == 429 and refused.value.code == "daily_token_quota_exceeded"
    assert "has 100 tokens left" in refused.value.message and headers_of(refused.value)["x-should-retry"] == "false"
    admit(counters, need=100)  # the refused request took no slot: the second one is free


def test_the_concurrency_cap_counts_leases_not_client_ids(counters):
    first, second = admit(counters, need=1), admit(counters, need=1)
    assert first.member != second.member  # a random member per lease, never a request id a client chose
    with pytest.raises(Refusal) as refused:
        admit(counters, need=1)
    assert refused.value.code == "concurrency_limit_exceeded" and "2 requests running" in refused.value.message
    budget.release(counters, first, used=1)
    admit(counters, need=1)


class Down:
    """Counters whose storage does not answer."""

    def __getattr__(self, name):
        def fail(*args, **kwargs):
            raise StorageUnavailable("ConnectionError")
        return fail


def test_storage_down_fails_closed_or_open():
    with pytest.raises(StorageUnavailable):
        admit(Down())
    lease = admit(Down(), fail_open=True)
    assert not lease.held and token_headers(lease) == {}
    budget.release(Down(), lease, used=5)  # nothing held, nothing to settle


def test_a_release_while_the_storage_is_down_does_not_raise(counters):
    lease = admit(counters)
    budget.release(Down(), lease, used=5)
    assert lease.total == 100  # unchanged: the reservation stays counted, the slot expires on its own


def test_a_dead_workers_ledger_gives_back_its_slots_and_reservations(redis_server):
    from service.admission.counters import ledger_name, reclaim_worker

    dead = RedisCounters(redis_server.uri, ledger=ledger_name(master_pid=os.getpid(), worker_pid=999_999))
    alive = RedisCounters(redis_server.uri, ledger=ledger_name(master_pid=os.getpid(), worker_pid=1))
    dead._redis.flushall()
    settled = admit(dead, need=100)
    budget.release(dead, settled, used=40)  # finished before the crash: counted, off the ledger
    admit(dead, need=300)
    kept = admit(alive, need=200, cap=3)
    with pytest.raises(Refusal):  # the cap of 2 is full: one lease of each worker
        admit(alive, need=1)
    assert reclaim_worker(redis_server.uri, 999_999) == 1
    assert admit(alive, need=1, daily=241).total == 241  # 40 used + 200 held by the live worker + 1
    assert reclaim_worker(redis_server.uri, 999_999) == 0  # once only
    budget.release(alive, kept, used=200)


def test_a_master_that_starts_reclaims_the_ledgers_of_masters_that_are_gone(redis_server):
    from service.admission.counters import ledger_name, reclaim_orphans

    gone = subprocess.Popen(["true"])
    gone.wait()
    orphan = RedisCounters(redis_server.uri, ledger=ledger_name(master_pid=gone.pid, worker_pid=5))
    live = RedisCounters(redis_server.uri, ledger=ledger_name(master_pid=os.getpid(), worker_pid=6))
    orphan._redis.flushall()
    admit(orphan, need=500)
    admit(live, need=100)
    assert reclaim_orphans(redis_server.uri) == 1
    assert admit(live, need=900, cap=2).total == 1000  # the orphan's 500 are back, the live 100 are not


def test_a_reservation_made_before_a_document_is_read_is_resized_to_the_real_prompt(counters):
    lease = admit(counters, need=600)  # the document allowance: the prompt is not known yet
    assert budget.resize(counters, lease, budget.Limits(1000, 2), 150).total == 150  # the slot is kept
    with pytest.raises(Refusal) as refused:  # growing past the budget is refused; the lease keeps what it had
        budget.resize(counters, lease, budget.Limits(1000, 2), 1200)
    assert refused.value.code == "daily_token_quota_exceeded" and lease.reserved == 150
    budget.release(counters, lease, used=100)
    budget.release(counters, lease, used=100)  # a second release (the edge's, after a refusal) does nothing
    assert admit(counters, need=900).total == 1000


def test_a_dead_workers_resized_reservation_is_given_back_as_resized(redis_server):
    from service.admission.counters import ledger_name, reclaim_worker

    dead = RedisCounters(redis_server.uri, ledger=ledger_name(master_pid=os.getpid(), worker_pid=999_998))
    dead._redis.flushall()
    budget.resize(dead, admit(dead, need=600), budget.Limits(1000, 2), 250)
    assert reclaim_worker(redis_server.uri, 999_998) == 1
    assert admit(dead, need=1000).total == 1000  # all of the 250 came back, and only that


def team_admit(counters, user, need=100, team_daily=1000, team_cap=2, **kwargs):
    limits = budget.Limits(10_000, 10, budget.TeamLimits("squad", team_daily, team_cap))
    return budget.admit(counters, user, limits, need, lease_s=60, now=NOW, **kwargs)


def test_members_of_a_team_share_its_cap_and_its_budget_beside_their_own(counters):
    first, second = team_admit(counters, "a", need=300), team_admit(counters, "b", need=300)
    with pytest.raises(Refusal) as refused:  # the team's two slots are held, by two members
        team_admit(counters, "c", need=1)
    assert refused.value.code == "concurrency_limit_exceeded" and "team squad (of c)" in refused.value.message
    budget.release(counters, first, used=300)
    with pytest.raises(Refusal) as refused:  # 600 of 1000 counted: 500 more would pass the team's budget
        team_admit(counters, "c", need=500)
    assert refused.value.code == "daily_token_quota_exceeded"
    assert "team squad's daily token budget of 1000 has 400 tokens left" in refused.value.message
    third = team_admit(counters, "c", need=400)  # refusals took nothing: exactly what is left fits
    assert third.total == 1000 and third.daily == 1000  # the tightest level's figures (the headers')
    budget.release(counters, second, used=100)
    budget.release(counters, third, used=400)
    assert third.total == 800
    own = budget.admit(counters, "a", budget.Limits(350, 10), 50, lease_s=60, now=NOW)  # no team: own budget only
    assert own.total == 350 and len(own.levels) == 1


def test_an_unset_team_limit_counts_and_never_refuses(counters):
    leases = [team_admit(counters, f"u{i}", need=10, team_daily=None, team_cap=None) for i in range(12)]
    assert all(lease.held for lease in leases) and leases[-1].levels[1].limit == budget.UNBOUNDED
    with pytest.raises(Refusal) as refused:  # a budget set later finds today's 120 counted already
        team_admit(counters, "z", need=10, team_daily=125, team_cap=None)
    assert "has 5 tokens left" in refused.value.message


def test_a_dead_workers_team_lease_is_given_back_at_every_level(redis_server):
    from service.admission.counters import PREFIX, ledger_name, reclaim_worker

    dead = RedisCounters(redis_server.uri, ledger=ledger_name(master_pid=os.getpid(), worker_pid=999_997))
    dead._redis.flushall()
    budget.resize(dead, team_admit(dead, "a", need=600), budget.Limits(10_000, 10), 250)
    # A lease written before teams (slot, budget, reserved) is given back as well.
    dead._redis.zadd(PREFIX + "inflight:old", {"m": 2**40})
    dead._redis.set(PREFIX + "budget:old:2026-12-01", 70)
    dead._redis.hset(PREFIX + ledger_name(os.getpid(), 999_997), "m",
                     f"{PREFIX}inflight:old\n{PREFIX}budget:old:2026-12-01\n70")
    assert reclaim_worker(redis_server.uri, 999_997) == 2
    assert int(dead._redis.get(PREFIX + "budget:old:2026-12-01")) == 0
    assert dead._redis.zcard(PREFIX + "inflight:old") == 0
    assert team_admit(dead, "b", need=1000, team_cap=1).total == 1000  # the 250 came back at the team's level too


def test_a_threshold_reached_on_two_servers_at_once_raises_one_alert(redis_server):
    """Two counters (as on two servers) settle leases together; each threshold is reached once a day."""
    import threading

    servers = [RedisCounters(redis_server.uri, ledger=f"ledger:host:1:{i}") for i in (1, 2)]
    servers[0]._redis.flushall()
    # Nothing reserved up front (as a lease before its need is known): the settles alone move the total across
    # 80 % (the 8th) and 100 % (the 10th), whichever server's comes then.
    leases = [team_admit(servers[i % 2], f"m{i}", need=0, team_cap=20, alerts=(80, 100)) for i in range(10)]
    start = threading.Barrier(len(leases))

    def settle(i):
        start.wait()
        budget.release(servers[i % 2], leases[i], used=100)
    threads = [threading.Thread(target=settle, args=(i,)) for i in range(len(leases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    alerts = servers[0].take_alerts() + servers[1].take_alerts()
    assert sorted((a["who"], a["threshold"]) for a in alerts) == [("team:squad", 80), ("team:squad", 100)]
    assert all(a["day"] == "2026-12-01" and a["limit"] == 1000 for a in alerts)
    budget.release(servers[0], team_admit(servers[0], "late", need=0, alerts=(80, 100)), used=0)
    assert servers[1].take_alerts() == []  # once per day: settling past it again raises nothing


def test_memory_counters_raise_each_alert_once_too():
    counters = MemoryCounters()
    for user, need in (("a", 400), ("b", 400), ("c", 200)):
        budget.release(counters, team_admit(counters, user, need=need, team_cap=5, alerts=(80, 100)), used=need)
    taken = counters.take_alerts()
    assert [(a["who"], a["threshold"]) for a in taken] == [("team:squad", 80), ("team:squad", 100)]
    counters.return_alerts(taken[1:])  # a worker that stops gives back what it did not deliver
    assert counters.take_alerts() == taken[1:]


def test_a_budget_that_refuses_a_request_raises_its_100_alert_once(counters):
    """Reservations keep use from ever reaching 100 % exactly: the refusal is the budget spent."""
    held = team_admit(counters, "a", need=700, alerts=(80, 100))
    budget.release(counters, held, used=700)  # 70 %: no alert yet
    assert counters.take_alerts() == []
    for _ in range(2):
        with pytest.raises(Refusal):
            team_admit(counters, "b", need=400, alerts=(80, 100))
    [alert] = counters.take_alerts()
    assert (alert["who"], alert["threshold"], int(alert["total"]), int(alert["refused"])) == \
        ("team:squad", 100, 700, 400)
    budget.release(counters, team_admit(counters, "c", need=150, alerts=(80, 100)), used=150)
    assert [(a["who"], a["threshold"]) for a in counters.take_alerts()] == [("team:squad", 80)]  # 85 % settled
