"""Shared counters for token budgets and concurrency slots, in Redis or (dev only) in memory.

Both operations are atomic check-and-take, so two workers (or two servers on
one Redis) never both take the last unit:

- `reserve(key, amount, limit, ttl)`: add `amount` unless the total would pass
  `limit`; `adjust` later settles the real amount.
- `take_slot(key, member, cap, ttl)`: hold one of `cap` slots; a slot expires
  after `ttl` seconds on its own, so a crashed worker cannot leak it.

Any storage failure raises StorageUnavailable; the caller decides between
failing closed and failing open.
"""

import logging
import threading
import time

from auth.cache import DB_CHECK_S

log = logging.getLogger("vibethinker.counters")
PREFIX = "vibethinker:"
EPOCH_KEY = "auth-epoch"  # the access epoch's mirror (auth.cache)

RESERVE = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local amount, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
if current + amount > limit then return {0, current} end
local total = redis.call('INCRBY', KEYS[1], amount)
if redis.call('TTL', KEYS[1]) < 0 then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
return {1, total}
"""
ADJUST = """
local total = redis.call('INCRBY', KEYS[1], ARGV[1])
if redis.call('TTL', KEYS[1]) < 0 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return total
"""
TAKE_SLOT = """
local now = tonumber(redis.call('TIME')[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZCARD', KEYS[1])
if held >= tonumber(ARGV[2]) then return {0, held} end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return {1, held + 1}
"""


class StorageUnavailable(Exception):
    """The counter storage did not answer."""


def open_counters(uri):
    """Counters for a limits-style storage URI (memory://, redis://..., redis+unix:///path)."""
    if uri.startswith("memory://"):
        return MemoryCounters()
    return RedisCounters(uri)


def epoch_publisher(counters, warn=None):
    """Store(publish=...): mirror a new access epoch here, so every worker drops its cached tokens now.

    A failed write is reported, not raised (the change is committed; workers read the database's epoch
    every few seconds and catch up)."""
    def publish(epoch):
        try:
            counters.set_epoch(epoch)
        except StorageUnavailable:
            (warn or log.warning)("access change stored, but the counter storage did not answer: workers "
                                  f"drop cached tokens within {DB_CHECK_S:g} s instead of at once")
    return publish


class RedisCounters:
    """Counters in Redis: shared by every worker and server, kept across restarts."""

    def __init__(self, uri):
        import redis

        url = uri.removeprefix("redis+") if uri.startswith("redis+unix://") else uri
        self._errors = (redis.exceptions.RedisError, OSError)
        self._redis = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2,
                                           health_check_interval=30)
        self._reserve, self._adjust, self._take_slot = (self._redis.register_script(s)
                                                        for s in (RESERVE, ADJUST, TAKE_SLOT))

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except self._errors as exc:
            raise StorageUnavailable(type(exc).__name__) from exc

    def reserve(self, key, amount, limit, ttl):
        ok, total = self._call(self._reserve, keys=[PREFIX + key], args=[amount, limit, ttl])
        return bool(ok), int(total)

    def adjust(self, key, delta, ttl):
        return int(self._call(self._adjust, keys=[PREFIX + key], args=[delta, ttl]))

    def take_slot(self, key, member, cap, ttl):
        ok, held = self._call(self._take_slot, keys=[PREFIX + key], args=[member, cap, ttl])
        return bool(ok), int(held)

    def free_slot(self, key, member):
        self._call(self._redis.zrem, PREFIX + key, member)

    shared = True  # other processes (workers, servers, the admin CLI) see the same values

    def get_epoch(self):
        """The access epoch mirrored here, or None when the key is absent (a new or flushed Redis)."""
        value = self._call(self._redis.get, PREFIX + EPOCH_KEY)
        return value.decode() if value is not None else None

    def set_epoch(self, value, only_if_absent=False):
        self._call(self._redis.set, PREFIX + EPOCH_KEY, value, nx=only_if_absent)

    def ping(self):
        return bool(self._call(self._redis.ping))


class MemoryCounters:
    """Counters in this process only: for `make run`'s dev mode, lost on restart."""

    def __init__(self, clock=time.monotonic):
        self._lock = threading.Lock()
        self._values = {}  # key -> (value, expires_at)
        self._slots = {}  # key -> {member: expires_at}
        self._clock = clock

    def _value(self, key):
        value, expires = self._values.get(key, (0, 0))
        return value if expires > self._clock() else 0

    def reserve(self, key, amount, limit, ttl):
        with self._lock:
            current = self._value(key)
            if current + amount > limit:
                return False, current
            self._set(key, current + amount, ttl)
            return True, current + amount

    def adjust(self, key, delta, ttl):
        with self._lock:
            return self._set(key, self._value(key) + delta, ttl)

    def _set(self, key, value, ttl):
        _, expires = self._values.get(key, (0, 0))
        if expires <= self._clock():
            expires = self._clock() + ttl
        self._values[key] = (value, expires)
        return value

    def take_slot(self, key, member, cap, ttl):
        with self._lock:
            now = self._clock()
            held = {m: t for m, t in self._slots.get(key, {}).items() if t > now}
            if len(held) >= cap:
                self._slots[key] = held
                return False, len(held)
            held[member] = now + ttl
            self._slots[key] = held
            return True, len(held)

    def free_slot(self, key, member):
        with self._lock:
            self._slots.get(key, {}).pop(member, None)

    shared = False  # no other process can publish an access epoch here: tokens are never cached

    def get_epoch(self):
        return None

    def set_epoch(self, value, only_if_absent=False):
        pass

    def ping(self):
        return True
