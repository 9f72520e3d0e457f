"""Verified tokens, cached in the worker while the access epoch they were checked under is current.

A request's token costs two JWT decodes (flask-jwt-extended reads the claims
unverified to pick the key, then verifies) and a database query. A worker may
skip all three for a token it verified before, provided nothing changed since
that could turn the verdict: every such change (revocation, disable, demotion,
a quota change, a key retirement) replaces the access epoch in the database
in its own transaction (auth.store) and then in the shared mirror (Redis).

Each request reads the mirror once (`begin`); when the epoch moved, this
worker empties its cache. With the mirror unreachable the cache is not used at
all: every request checks the database, as without a cache. The database's
epoch is also read every `db_check_s` seconds, so a change whose mirror write
failed still reaches every worker within that time. Expiry and not-before are
checked on every hit against the token's own claims, and the end of a rotated
token's grace (its scheduled `revoked_at`) against its record: that end moves
no epoch, so no entry may outlive it.
"""

import hashlib
import threading
import time
from collections import OrderedDict

DB_CHECK_S = 5.0  # how stale a worker's epoch may get when a change could not reach the mirror


class TokenCache:
    """Header value -> (claims, token record) of tokens this worker verified under the current epoch."""

    def __init__(self, store, read_mirror, replace_mirror, max_entries=4096, db_check_s=DB_CHECK_S,
                 clock=time.monotonic, wall=time.time):
        # replace_mirror(new, expected): set the mirror to `new` only while it holds `expected` (None: absent)
        self._store, self._read, self._write = store, read_mirror, replace_mirror
        self._max, self._db_check_s, self._clock, self._wall = max_entries, db_check_s, clock, wall
        self._lock = threading.Lock()
        self._entries = OrderedDict()
        self._epoch = None
        self._db_checked = float("-inf")

    def begin(self, read=None):
        """Bring the cache up to the current epoch (one read of the mirror, by `read` when given: a trip the
        request makes anyway that brings it) and return it; None: do not use it."""
        try:
            epoch = (read or self._read)()
        except Exception:  # the mirror is unreachable: nobody could tell us of a revocation
            self.clear()
            return None
        now = self._clock()
        if epoch is None or now - self._db_checked >= self._db_check_s:
            epoch = self._from_database(epoch, now)
        with self._lock:
            if epoch != self._epoch:
                self._entries.clear()
                self._epoch = epoch
        return epoch

    def _from_database(self, mirrored, now):
        """The database's epoch, copied into the mirror when the mirror lacks it or lags behind.

        Only while the mirror still holds what was read (compare and set): a newer epoch published in
        between must never be overwritten by this older read.
        """
        epoch = self._store.epoch()
        self._db_checked = now
        if epoch != mirrored:
            try:
                self._write(epoch, mirrored)
            except Exception:  # the next request reads the mirror again, or skips the cache
                pass
        return epoch

    def get(self, header, epoch=None):
        """(claims, token record) for this Authorization header, or None; expired entries are dropped. With
        `epoch` (what this request's `begin` returned), only an entry checked under that very epoch: another
        thread's slower read of an older epoch must never serve this request a verdict the newer one changed."""
        key = _key(header)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            claims, token, checked = entry
            if epoch is not None and checked != epoch:
                return None
            now = self._wall()
            if not (claims["nbf"] <= now < _end(claims, token)):
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return claims, token

    def put(self, header, claims, token, epoch):
        """Remember a token verified under `epoch` (what `begin` returned), unless the epoch moved since."""
        with self._lock:
            if epoch is None or epoch != self._epoch:  # checked against data a newer epoch may have changed
                return
            self._entries[_key(header)] = (claims, token, epoch)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)

    def clear(self):
        with self._lock:
            self._entries.clear()
            self._epoch = None

    def __len__(self):
        return len(self._entries)


def _end(claims, token):
    """When a cached token stops working: its expiry, or the end of its rotation's grace if sooner."""
    revoked_at = token.get("revoked_at")
    return claims["exp"] if revoked_at is None else min(claims["exp"], revoked_at.timestamp())


def _key(header):
    return hashlib.sha256(header.encode("utf-8", "surrogatepass")).digest()
