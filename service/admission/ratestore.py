"""flask-limiter's Redis storage, with a request's rate-limit hits, their windows and the access epoch in one trip.

limits' own moving-window storage spends a round trip per window hit (a user's
"60/minute;2000/day" is two) and another to read the window back for the
x-ratelimit-* headers, and the token cache (auth.cache) a third to read the
access epoch. Here one script (`FOLD`) does all of it at once: it reads the
epoch, then hits the windows in flask-limiter's order as limits' own
acquire_moving_window.lua does (the same keys, the same lists, so limits'
other readers and `flask limiter` commands see the same state), stopping at
the first breach as flask-limiter does, and returns each window as it is after
the hit.

The guard runs it (`prefetch`) in place of its epoch read, for a token it
holds in its cache, with the windows of that token's limit; flask-limiter
then asks this storage for the same hits and windows, and gets the prefetched
outcomes with no trip (`acquire_entry`, `get_moving_window`). A prefetched hit
flask-limiter did not ask for (the epoch moved and the user's limit with it)
is given back when the request ends (`give_back`), so every hit counted is one
flask-limiter decided. A hit it asks for that was not prefetched (a token this
worker had not cached) runs the same script for that window alone, and still
brings its window back for the headers.
"""

import time

from limits.storage import RedisStorage

from service.admission.counters import EPOCH_KEY, PREFIX

SCHEME = "vibethinker+"

# KEYS: the epoch's key, then each window's list. ARGV: now, then limit, expiry, amount per window.
# Returns the epoch (false when absent), then per window: acquired (1, 0; -1: not tried, after a breach), the
# oldest entry still in the window (as text), and how many entries it holds.
FOLD = """
local now = tonumber(ARGV[1])
local out = {redis.call('GET', KEYS[1])}
local breached = false
for i = 2, #KEYS do
  local at = 2 + (i - 2) * 3
  local limit, expiry, amount = tonumber(ARGV[at]), tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2])
  local acquired = -1
  if not breached then
    acquired = 0
    local entry = redis.call('LINDEX', KEYS[i], limit - amount)
    if amount <= limit and not (entry and tonumber(entry) >= now - expiry) then
      for _ = 1, amount do redis.call('LPUSH', KEYS[i], ARGV[1]) end
      redis.call('LTRIM', KEYS[i], 0, limit - 1)
      redis.call('EXPIRE', KEYS[i], expiry)
      acquired = 1
    else
      breached = true
    end
  end
  local low, high, oldest = 0, limit - 1, nil
  while low <= high do
    local mid = math.floor((low + high) / 2)
    local value = tonumber(redis.call('LINDEX', KEYS[i], mid))
    if value and value >= now - expiry then oldest = mid; low = mid + 1 else high = mid - 1 end
  end
  local count, start = 0, ARGV[1]
  if oldest then count = oldest + 1; start = redis.call('LINDEX', KEYS[i], oldest) end
  table.insert(out, acquired); table.insert(out, start); table.insert(out, count)
end
return out
"""


class FoldedRedisStorage(RedisStorage):
    """limits' Redis storage whose moving-window hits come with their window, and may come prefetched."""

    STORAGE_SCHEME = [f"{SCHEME}redis", f"{SCHEME}rediss", f"{SCHEME}redis+unix"]
    epoch_key = PREFIX + EPOCH_KEY  # the access epoch's mirror (service.admission.counters)
    # The current request's `scratch()`, or None outside a request: the HTTP layer binds it (ratelimit.py).
    request = staticmethod(lambda: None)

    def __init__(self, uri, **options):
        super().__init__(uri.removeprefix(SCHEME), **options)
        self._fold = self.get_connection().register_script(FOLD)

    def fold(self, windows):
        """Hit `windows` [(key, limit, expiry, amount)] in order, stopping at the first breach, and read the
        epoch, in one trip: (epoch or None, [(key, (acquired, window start, entries, now))] of those tried)."""
        now = time.time()
        keys = [self.epoch_key, *(self.prefixed_key(key) for key, *_ in windows)]
        args = [now, *(value for _, *window in windows for value in window)]
        epoch, *rest = self._fold(keys, args)
        tried = []
        for (key, *_), at in zip(windows, range(0, len(rest), 3)):
            acquired, start, count = int(rest[at]), float(rest[at + 1]), int(rest[at + 2])
            if acquired >= 0:
                tried.append((key, (bool(acquired), start, count, now)))
        return (epoch.decode() if epoch is not None else None), tried

    def acquire_entry(self, key, limit, expiry, amount=1):
        scratch = self.request()
        waiting = scratch["prefetched"].get(key) if scratch else None
        if waiting:  # prefetched: the same key twice (a limit written twice) was hit twice, in order
            outcome = waiting.pop(0)
        else:
            [(_, outcome)] = self.fold([(key, limit, expiry, amount)])[1]
        if scratch is not None:
            scratch["windows"][key] = outcome
        return outcome[0]

    def get_moving_window(self, key, limit, expiry):
        scratch = self.request()
        window = scratch["windows"].get(key) if scratch else None
        if window is None:
            return super().get_moving_window(key, limit, expiry)
        return window[1], window[2]

    def prefetch(self, windows):
        """Fold `windows` for this request (flask-limiter's hits to come): the epoch."""
        epoch, tried = self.fold(windows)
        prefetched = self.request()["prefetched"]
        for key, outcome in tried:
            prefetched.setdefault(key, []).append(outcome)
        return epoch

    def give_back(self):
        """Undo this request's prefetched hits that flask-limiter never asked for (one entry each)."""
        left, given = self.request()["prefetched"], 0
        for key, outcomes in list(left.items()):
            for acquired, _, _, now in outcomes:
                if acquired:
                    given += self.get_connection().lrem(self.prefixed_key(key), 1, repr(now))
        left.clear()
        return given


def scratch():
    """A request's scratch for this storage: its prefetched hits not yet asked for (key -> their outcomes, in
    order) and its windows as its hits left them (the x-ratelimit-* headers read them)."""
    return {"prefetched": {}, "windows": {}}
