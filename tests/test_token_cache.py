"""auth.cache without HTTP: entries live while the epoch stands, and an epoch read before a change never
lets a check made before it into the cache."""

from datetime import datetime, timezone

import pytest

from auth.cache import TokenCache


class Epochs:
    """The database's epoch and its mirror, as plain values (the mirror may fail)."""

    def __init__(self):
        self.db, self.mirror, self.mirror_down = "e1", "e1", False

    def epoch(self):
        return self.db

    def read(self):
        if self.mirror_down:
            raise ConnectionError("down")
        return self.mirror

    def write(self, value, expected):
        if self.mirror == expected:
            self.mirror = value


@pytest.fixture
def clock():
    return {"mono": 100.0, "wall": 1000.0}


@pytest.fixture
def epochs():
    return Epochs()


@pytest.fixture
def cache(epochs, clock):
    return TokenCache(epochs, epochs.read, epochs.write, max_entries=2, db_check_s=5,
                      clock=lambda: clock["mono"], wall=lambda: clock["wall"])


CLAIMS = {"nbf": 900, "exp": 1100}


def test_an_entry_lives_until_the_epoch_moves(cache, epochs):
    epoch = cache.begin()
    cache.put("Bearer a", CLAIMS, {"user": "a"}, epoch)
    assert cache.begin() == "e1" and cache.get("Bearer a") == (CLAIMS, {"user": "a"})
    epochs.db = epochs.mirror = "e2"  # a revocation, published
    assert cache.begin() == "e2" and cache.get("Bearer a") is None


def test_a_request_takes_only_an_entry_checked_under_its_own_epoch(cache, epochs):
    """A slow reader of the old epoch must not bring back, for a request that saw the new one, a check made
    before the change."""
    old = cache.begin()  # request A reads e1 (then stalls before taking the lock)
    epochs.db = epochs.mirror = "e2"  # a revocation, published
    new = cache.begin()  # request C reads e2: the cache is emptied
    epochs.mirror = "e1"
    assert cache.begin() == "e1"  # A's stale read takes the lock after C's: the cache is back at e1...
    cache.put("Bearer a", CLAIMS, {"user": "a"}, old)  # ...and D, checked before the revocation, is kept
    assert cache.get("Bearer a", new) is None  # C does not take it: it checks the database
    assert cache.get("Bearer a", old) == (CLAIMS, {"user": "a"})  # a request that read e1 is older than the change


def test_a_check_made_under_an_older_epoch_is_not_kept(cache, epochs):
    seen = cache.begin()  # request A reads e1, then checks the database...
    epochs.db = epochs.mirror = "e2"  # ...while a revocation commits and publishes...
    cache.begin()  # ...and request B sees e2
    cache.put("Bearer a", CLAIMS, {"user": "a"}, seen)
    assert cache.get("Bearer a") is None


def test_expiry_and_not_before_are_checked_on_every_hit(cache, clock):
    cache.put("Bearer a", CLAIMS, {}, cache.begin())
    clock["wall"] = 1100
    assert cache.get("Bearer a") is None


def test_a_rotated_token_is_cached_only_until_its_grace_ends(cache, clock):
    """The end of a rotation's grace moves no epoch: the entry itself must end there (before its exp)."""
    ends = datetime.fromtimestamp(1050, timezone.utc)
    cache.put("Bearer a", CLAIMS, {"revoked_at": ends}, cache.begin())
    clock["wall"] = 1049
    assert cache.get("Bearer a") == (CLAIMS, {"revoked_at": ends})
    clock["wall"] = 1050
    assert cache.get("Bearer a") is None


def test_mirror_down_means_no_cache(cache, epochs):
    cache.put("Bearer a", CLAIMS, {}, cache.begin())
    epochs.mirror_down = True
    assert cache.begin() is None and len(cache) == 0


def test_a_change_the_mirror_missed_reaches_the_worker_from_the_database(cache, epochs, clock):
    cache.put("Bearer a", CLAIMS, {}, cache.begin())
    epochs.db = "e2"  # committed, but the publish failed
    clock["mono"] += 5
    assert cache.begin() == "e2" and cache.get("Bearer a") is None and epochs.mirror == "e2"


def test_an_empty_mirror_is_filled_from_the_database(cache, epochs):
    epochs.mirror = None  # a new or flushed Redis
    assert cache.begin() == "e1" and epochs.mirror == "e1"


def test_filling_the_mirror_never_overwrites_a_newer_epoch(cache, epochs):
    epochs.mirror = None  # a flushed Redis...
    epochs.epoch = lambda: (setattr(epochs, "mirror", "e2"), "e1")[1]  # ...and a revocation publishes e2 meanwhile
    cache.begin()
    assert epochs.mirror == "e2"


def test_the_cache_is_bounded(cache):
    epoch = cache.begin()
    for name in "abc":
        cache.put(f"Bearer {name}", CLAIMS, {}, epoch)
    assert len(cache) == 2 and cache.get("Bearer a") is None


def test_the_redis_mirror_replaces_only_what_it_was_told_it_holds(redis_server):
    from service.admission.counters import RedisCounters

    mirror = RedisCounters(redis_server.uri)
    mirror._redis.flushall()
    assert mirror.get_epoch() is None
    mirror.set_epoch("a", expected="x")
    assert mirror.get_epoch() is None
    mirror.set_epoch("a", expected=None)
    mirror.set_epoch("b", expected="x")
    assert mirror.get_epoch() == "a"
    mirror.set_epoch("b", expected="a")
    mirror.set_epoch("c")  # a publish after a commit: unconditional
    assert mirror.get_epoch() == "c"
