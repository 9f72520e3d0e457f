"""Shared counters for token budgets and concurrency slots, in Redis or (dev only) in memory.

Each operation is one atomic step (one Redis round trip), so two workers (or
two servers on one Redis) never both take the last unit:

- `admit(slots, member, cap, slot_ttl, budget, amount, limit, budget_ttl)`:
  hold one of `cap` slots and add `amount` to the budget, unless either is
  spent (then nothing is taken); a slot expires after `slot_ttl` seconds on
  its own, so a crashed worker cannot leak it.
- `release(slots, member, budget, delta, budget_ttl)`: free the slot and
  settle the budget by `delta` (the real use minus the reservation).
- `resize(slots, member, budget, delta, limit, budget_ttl)`: change a held
  lease's reservation by `delta` (a document's allowance, once its text is
  known), refused when a growth would pass `limit`.

In Redis, each worker also keeps a ledger of the leases it holds (a hash
named after its host, its master's pid and its own pid). When a worker dies
(kill -9, out of memory) gunicorn's master, in `child_exit`, calls
`reclaim` on that worker's ledger before it starts the next worker: the
dead worker's slots are freed and its reservations given back at once,
since nothing it was computing was delivered or recorded. A master that
starts reclaims the ledgers of masters on its host that are gone.

Any storage failure raises StorageUnavailable; the caller decides between
failing closed and failing open.
"""

import logging
import os
import socket
import threading
import time

from auth.cache import DB_CHECK_S

log = logging.getLogger("vibethinker.counters")
PREFIX = "vibethinker:"
EPOCH_KEY = "auth-epoch"  # the access epoch's mirror (auth.cache)

# KEYS: slot set, budget, ledger. ARGV: member, cap, slot ttl, amount, limit, budget ttl.
# {1, total}: admitted; {0, held}: no slot free; {-1, total}: the budget would pass its limit (no slot kept).
ADMIT = """
local now = tonumber(redis.call('TIME')[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZCARD', KEYS[1])
if held >= tonumber(ARGV[2]) then return {0, held} end
local current = tonumber(redis.call('GET', KEYS[2]) or '0')
local amount, limit = tonumber(ARGV[4]), tonumber(ARGV[5])
if current + amount > limit then return {-1, current} end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
local total = redis.call('INCRBY', KEYS[2], amount)
if redis.call('TTL', KEYS[2]) < 0 then redis.call('EXPIRE', KEYS[2], ARGV[6]) end
redis.call('HSET', KEYS[3], ARGV[1], KEYS[1] .. '\\n' .. KEYS[2] .. '\\n' .. ARGV[4])
redis.call('EXPIRE', KEYS[3], ARGV[3])
return {1, total}
"""
# KEYS: slot set, budget, ledger. ARGV: member, delta, budget ttl. Returns today's total.
RELEASE = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
local total = redis.call('INCRBY', KEYS[2], ARGV[2])
if redis.call('TTL', KEYS[2]) < 0 then redis.call('EXPIRE', KEYS[2], ARGV[3]) end
return total
"""
# KEYS: a ledger. Frees each of its slots, gives each reservation back; returns how many leases it held.
RECLAIM = """
local entries = redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  local slot, budget, reserved = string.match(entries[i + 1], '^(.-)\\n(.-)\\n(.*)$')
  redis.call('ZREM', slot, entries[i])
  if redis.call('EXISTS', budget) == 1 then redis.call('DECRBY', budget, reserved) end
end
redis.call('DEL', KEYS[1])
return #entries / 2
"""
# KEYS: slot set, budget, ledger. ARGV: member, delta, limit, budget ttl. A held lease's reservation changed by
# delta (and its ledger entry with it); {1, total}, or {-1, total} when a growth would pass the limit.
RESIZE = """
local current = tonumber(redis.call('GET', KEYS[2]) or '0')
local delta, limit = tonumber(ARGV[2]), tonumber(ARGV[3])
if delta > 0 and current + delta > limit then return {-1, current} end
local total = redis.call('INCRBY', KEYS[2], delta)
if redis.call('TTL', KEYS[2]) < 0 then redis.call('EXPIRE', KEYS[2], ARGV[4]) end
local entry = redis.call('HGET', KEYS[3], ARGV[1])
if entry then
  local slot, budget, reserved = string.match(entry, '^(.-)\\n(.-)\\n(.*)$')
  redis.call('HSET', KEYS[3], ARGV[1], slot .. '\\n' .. budget .. '\\n' .. (tonumber(reserved) + delta))
end
return {1, total}
"""
ADMITTED, NO_SLOT, OVER_BUDGET = 1, 0, -1
# KEYS: the epoch's mirror. ARGV: new value, the value it must still hold ('' for absent).
REPLACE_EPOCH = """
if (redis.call('GET', KEYS[1]) or '') == ARGV[2] then redis.call('SET', KEYS[1], ARGV[1]) return 1 end
return 0
"""
ANY = object()  # set_epoch without a condition: a new epoch, published after its commit


class StorageUnavailable(Exception):
    """The counter storage did not answer."""


def open_counters(uri):
    """Counters for a limits-style storage URI (memory://, redis://..., redis+unix:///path)."""
    if uri.startswith("memory://"):
        return MemoryCounters()
    return RedisCounters(uri)


def ledger_name(master_pid=None, worker_pid=None, host=None):
    """The lease ledger of one worker: by default, this process as a worker of its parent."""
    return (f"ledger:{host or socket.gethostname()}:{master_pid or os.getppid()}:"
            f"{worker_pid or os.getpid()}")


def ledger_parts(name):
    """(host, master pid, worker pid) of a ledger name that ledger_name made."""
    host, master, worker = name.split(":", 1)[1].rsplit(":", 2)
    return host, int(master), int(worker)


def reclaim_worker(uri, worker_pid, warn=log.warning):
    """gunicorn's child_exit: give back what the dead worker `worker_pid` (of this master) held."""
    if uri.startswith("memory://"):
        return 0
    try:
        counters = RedisCounters(uri)
        return counters.reclaim(ledger_name(os.getpid(), worker_pid))
    except StorageUnavailable:
        warn(f"worker {worker_pid} ended, but the counter storage did not answer: its leases expire on "
             "their own after the request deadline")
        return 0


def reclaim_orphans(uri, warn=log.warning):
    """A starting master: give back the leases of workers whose master on this host is gone."""
    if uri.startswith("memory://"):
        return 0
    try:
        counters = RedisCounters(uri)
        count = 0
        for name in counters.ledgers(socket.gethostname()):
            master = ledger_parts(name)[1]
            if master != os.getpid() and not alive(master):
                count += counters.reclaim(name)
        return count
    except StorageUnavailable:
        warn("the counter storage did not answer at start: leases of a previous run expire on their own")
        return 0


def alive(pid):
    """True if process `pid` (on this host) is running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


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

    shared = True  # other processes (workers, servers, the admin CLI) see the same values

    def __init__(self, uri, ledger=None):
        import redis

        self._ledger = PREFIX + (ledger or ledger_name())
        url = uri.removeprefix("redis+") if uri.startswith("redis+unix://") else uri
        self._errors = (redis.exceptions.RedisError, OSError)
        self._redis = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2,
                                           health_check_interval=30)
        self._admit, self._release = self._redis.register_script(ADMIT), self._redis.register_script(RELEASE)
        self._replace_epoch = self._redis.register_script(REPLACE_EPOCH)
        self._reclaim = self._redis.register_script(RECLAIM)
        self._resize = self._redis.register_script(RESIZE)

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except self._errors as exc:
            raise StorageUnavailable(type(exc).__name__) from exc

    def admit(self, slots, member, cap, slot_ttl, budget, amount, limit, budget_ttl):
        status, value = self._call(self._admit, keys=[PREFIX + slots, PREFIX + budget, self._ledger],
                                   args=[member, cap, slot_ttl, amount, limit, budget_ttl])
        return int(status), int(value)

    def release(self, slots, member, budget, delta, budget_ttl):
        return int(self._call(self._release, keys=[PREFIX + slots, PREFIX + budget, self._ledger],
                              args=[member, delta, budget_ttl]))

    def resize(self, slots, member, budget, delta, limit, budget_ttl):
        status, value = self._call(self._resize, keys=[PREFIX + slots, PREFIX + budget, self._ledger],
                                   args=[member, delta, limit, budget_ttl])
        return int(status), int(value)

    def reclaim(self, ledger):
        """Free the slots and give back the reservations of ledger `ledger`; how many leases it held."""
        return int(self._call(self._reclaim, keys=[PREFIX + ledger]))

    def ledgers(self, host):
        """The ledgers of workers on `host`."""
        keys = self._call(lambda: list(self._redis.scan_iter(match=f"{PREFIX}ledger:{host}:*", count=500)))
        return [key.decode().removeprefix(PREFIX) for key in keys]


    def get_epoch(self):
        """The access epoch mirrored here, or None when the key is absent (a new or flushed Redis)."""
        value = self._call(self._redis.get, PREFIX + EPOCH_KEY)
        return value.decode() if value is not None else None

    def set_epoch(self, value, expected=ANY):
        """Mirror `value`; with `expected`, only while the mirror still holds it (None: while it is absent)."""
        if expected is ANY:
            self._call(self._redis.set, PREFIX + EPOCH_KEY, value)
        else:
            self._call(self._replace_epoch, keys=[PREFIX + EPOCH_KEY], args=[value, expected or ""])

    def ping(self):
        return bool(self._call(self._redis.ping))


class MemoryCounters:
    """Counters in this process only: for `make run`'s dev mode, lost on restart."""

    shared = False  # no other process can publish an access epoch here: tokens are never cached

    def __init__(self, clock=time.monotonic):
        self._lock = threading.Lock()
        self._values = {}  # key -> (value, expires_at)
        self._slots = {}  # key -> {member: expires_at}
        self._clock = clock

    def _value(self, key):
        value, expires = self._values.get(key, (0, 0))
        return value if expires > self._clock() else 0

    def admit(self, slots, member, cap, slot_ttl, budget, amount, limit, budget_ttl):
        with self._lock:
            now = self._clock()
            held = {m: t for m, t in self._slots.get(slots, {}).items() if t > now}
            self._slots[slots] = held
            if len(held) >= cap:
                return NO_SLOT, len(held)
            current = self._value(budget)
            if current + amount > limit:
                return OVER_BUDGET, current
            held[member] = now + slot_ttl
            return ADMITTED, self._set(budget, current + amount, budget_ttl)

    def release(self, slots, member, budget, delta, budget_ttl):
        with self._lock:
            self._slots.get(slots, {}).pop(member, None)
            return self._set(budget, self._value(budget) + delta, budget_ttl)

    def resize(self, slots, member, budget, delta, limit, budget_ttl):
        with self._lock:
            current = self._value(budget)
            if delta > 0 and current + delta > limit:
                return OVER_BUDGET, current
            return ADMITTED, self._set(budget, current + delta, budget_ttl)

    def _set(self, key, value, ttl):
        _, expires = self._values.get(key, (0, 0))
        if expires <= self._clock():
            expires = self._clock() + ttl
        self._values[key] = (value, expires)
        return value


    def get_epoch(self):
        return None

    def set_epoch(self, value, expected=ANY):
        pass

    def ping(self):
        return True
