"""Batch lines under their owner's request rate limit, in the same storage as flask-limiter's live counts.

A live request is counted by flask-limiter (service.admission.ratelimit) under
`user:<name>` and the shared scope `generate`. A batch line is counted under
the same user and its own scope, and starts only while the user's live count
plus line count in the window still fit the user's limit: a batch never gets
more than the live requests left over, and since flask-limiter never sees
the lines' count, a user's live requests are never refused because their own
batch spent the window. A member of a team with a rate limit is held to the
team's the same way (the team's live count plus its lines' count). A line
that does not fit waits for the window to move; it is never failed for it.
Plain `limits` calls: no Flask here.
"""

import logging
import time

from limits import parse_many

log = logging.getLogger("vibethinker.ratelimit")

LIVE_SCOPE = "generate"  # flask-limiter's shared scope of generations, uploads and batch creates
LINE_SCOPE = "batch-lines"
TEAM_SCOPE = "team-generate"  # the same requests, counted against the team's rate limit (under the team's key)
TEAM_LINE_SCOPE = "team-batch-lines"
MIN_WAIT_S = 0.5  # the least a waiting user's lines rest before the window is looked at again
MAX_WAIT_S = 30.0  # the most: an admin may have raised the limit meanwhile
STORAGE_WAIT_S = 1.0  # how long lines wait when the storage cannot be read (and fail_open is off)


def user_key(user):
    """The counters' identity of a user: their name from the store, never client input."""
    return f"user:{user}"


def team_key(team):
    """The counters' identity of a team: its name from the store."""
    return f"team:{team}"


class LineRates:
    """The line-side view of users' rate limits over a `limits` strategy (flask-limiter's `Limiter.limiter`)."""

    def __init__(self, strategy, default_rate, fail_open=False, clock=time.time):
        self.strategy, self.default_rate, self.fail_open = strategy, default_rate, fail_open
        self.clock = clock  # the storage's
        self.waiting = {}  # user -> the time before which their lines wait for their window

    def must_wait(self, row):
        """True while the lines of the user of store row `row` must wait for their window to move (looked at
        again once it may have); never for a disabled or removed user, whose lines are refused at once."""
        if not row.get("active", False):
            return False
        user = row["name"]
        if self.clock() < self.waiting.get(user, 0.0):
            return True
        try:
            wait = max(self.wait_s(user, row.get("rate_limit") or self.default_rate),
                       self.wait_s(row["team"], row["team_rate_limit"], team=True) if _team_rate(row) else 0.0)
        except Exception:  # noqa: BLE001 - the storage is unreachable (Redis's own errors included)
            if self.fail_open:
                return False
            log.warning("rate-limit storage unreachable: batch lines wait")
            wait = STORAGE_WAIT_S
        if wait:
            self.waiting[user] = self.clock() + wait
            return True
        self.waiting.pop(user, None)
        return False

    def count(self, row):
        """`hit` for the user of store row `row`, best effort: a line that started runs even when the storage
        just went away."""
        try:
            self.hit(row["name"], row.get("rate_limit") or self.default_rate)
            if _team_rate(row):
                self.hit(row["team"], row["team_rate_limit"], team=True)
        except Exception:  # noqa: BLE001 - the next look at the window waits instead
            log.warning("rate-limit storage unreachable: a batch line went uncounted")

    def wait_s(self, name, rate_limit, team=False):
        """0.0 when one more line of user `name` (or team, with `team`) fits every window of `rate_limit`; else
        seconds to wait."""
        key, live_scope, line_scope = _counted(name, team)
        wait = None
        for item in parse_many(rate_limit):
            live_reset, live_left = self.strategy.get_window_stats(item, key, live_scope)
            line_reset, line_left = self.strategy.get_window_stats(item, key, line_scope)
            if (item.amount - live_left) + (item.amount - line_left) < item.amount:
                continue
            resets = [at for at, left in ((live_reset, live_left), (line_reset, line_left)) if left < item.amount]
            wait = max(wait or 0.0, min(resets) - self.clock())
        return 0.0 if wait is None else min(MAX_WAIT_S, max(MIN_WAIT_S, wait))

    def hit(self, name, rate_limit, team=False):
        """Count one line of user `name` (or team, with `team`) in every window of `rate_limit`."""
        key, _, line_scope = _counted(name, team)
        for item in parse_many(rate_limit):
            self.strategy.hit(item, key, line_scope)


def _counted(name, team):
    """(key, live requests' scope, lines' scope) of user `name`'s windows, or of team `name`'s with `team`."""
    return (team_key(name), TEAM_SCOPE, TEAM_LINE_SCOPE) if team else (user_key(name), LIVE_SCOPE, LINE_SCOPE)


def _team_rate(row):
    """True when the user of store row `row` is in a team with a rate limit."""
    return bool(row.get("team") and row.get("team_rate_limit"))
