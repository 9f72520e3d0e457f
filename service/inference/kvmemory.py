"""What the KV caches may hold: the rows' reservations and the prefix cache's blocks, within one bound.

A row reserves its whole capacity when it is admitted (its prompt and every
token it may generate; a fork only its own part, its lead's prompt staying
reserved until its forks have left), so a running answer never runs out of
memory. The prefix cache (service.inference.prefixes) keeps its blocks in
what the rows leave free and gives them back when a row needs the room.
"""

import threading

from service.inference.kvcache import CacheFull, RowCache


class CacheMemory:
    """The bytes the rows' caches may reserve (`bound`, None for no bound), and what they hold now.

    `allocate` reserves a row's whole capacity when it is admitted and `release` gives it back when it
    leaves (a lead's, once its forks have left too). The prefix cache (service.inference.prefixes) keeps its
    blocks in what the rows leave free (`hold`), and gives them back when a row needs the room (`reclaim`,
    set by it). Read from other threads (`/readyz`, `/metrics`) while the engine thread changes it."""

    def __init__(self, layout, bound=None, device="cpu"):
        self.layout, self.bound, self.device = layout, bound, device
        self._lock = threading.Lock()
        self.reserved = 0  # bytes, by the rows
        self.held = 0  # bytes, by the prefix cache's blocks
        self.reclaim = None  # frees at least the bytes it is given from the prefix cache, if it can
        self._rows = {}  # id(row cache) -> the cache, for the bytes written now

    def need(self, tokens):
        """Bytes a row of `tokens` reserves."""
        return tokens * self.layout.bytes_per_token

    @property
    def capacity_tokens(self):
        """The most tokens one row may hold: the whole bound; None when there is none."""
        return None if self.bound is None else self.bound // self.layout.bytes_per_token

    def fits(self, tokens):
        """Whether a row of `tokens` fits beside the rows there are now (the prefix cache gives way)."""
        with self._lock:
            return self.bound is None or self.reserved + self.need(tokens) <= self.bound

    def allocate(self, tokens, shared=None, offset=0):
        """A row cache with room for `tokens`, its bytes reserved; CacheFull when the bound would be passed.
        A fork's (`shared`: its lead's cache, whose first `offset` tokens it reads) reserves only its own part."""
        need = self.need(tokens - (offset if shared is not None else 0))
        with self._lock:
            if self.bound is not None and self.reserved + need > self.bound:
                raise CacheFull(f"a row of {tokens} tokens does not fit: {self.reserved} of {self.bound} bytes "
                                "are reserved")
            self.reserved += need
            short = 0 if self.bound is None else self.reserved + self.held - self.bound
        try:
            if short > 0 and self.reclaim is not None:
                self.reclaim(short)
            cache = RowCache(self.layout, tokens, self.device, shared, offset)
        except BaseException:
            with self._lock:
                self.reserved -= need
            raise
        with self._lock:
            self._rows[id(cache)] = cache
            if shared is not None:
                shared.holders += 1
        return cache

    def release(self, cache):
        """Give back what the row of `cache` reserved (once: releasing it again does nothing); a lead's only
        once the forks reading its prompt have left."""
        with self._lock:
            if cache.released:
                return
            cache.released = True
        self._drop(cache)

    def _drop(self, cache):
        with self._lock:
            cache.holders -= 1
            last = cache.holders == 0 and self._rows.pop(id(cache), None) is not None
            if last:
                self.reserved -= self.need(cache.own)
        if last and cache.shared is not None:
            self._drop(cache.shared)

    def hold(self, nbytes):
        """Take `nbytes` for the prefix cache if the rows leave them free; whether it could."""
        with self._lock:
            if self.bound is not None and self.reserved + self.held + nbytes > self.bound:
                return False
            self.held += nbytes
            return True

    def unhold(self, nbytes):
        with self._lock:
            self.held -= nbytes

    @property
    def free(self):
        """Bytes a new row could still reserve (the prefix cache's included: it gives way); None when there is
        no bound."""
        with self._lock:
            return None if self.bound is None else max(0, self.bound - self.reserved)

    def depth(self):
        """(rows holding a cache, bytes they have written) now."""
        with self._lock:
            rows = list(self._rows.values())
        return len(rows), sum(cache.length - cache.offset for cache in rows) * self.layout.bytes_per_token
