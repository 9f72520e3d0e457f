"""Admission: a per-user daily token budget and concurrency cap, and the user's team's, held for one generation.

Plain functions over counters (service.admission.counters) and limits, no
Flask, so they are tested without HTTP:

- `admit` takes one of the user's concurrency slots and reserves prompt +
  max_new_tokens of today's budget, and the same of their team's when they
  are in one, in one atomic step; it refuses (NoSlot, OverBudget) when any
  is spent, taking nothing.
- `resize` changes a held reservation (a document's allowance, admitted
  before the document is read, becomes the prompt's real size).
- `release` settles the reservation to what the generation really used and
  frees the slot; a budget that reaches an alert threshold (80 % and 100 %
  by default) raises a budget alert there, once per day (service.records.alerts
  delivers it).

A slot's member is a fresh random id per lease, never anything a client sent.
With the storage down, `admit` raises StorageUnavailable (fail closed), or,
with `fail_open`, returns a lease that holds nothing and limits nothing.
"""

import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from service.admission.counters import NO_SLOT, OVER_BUDGET, Level, StorageUnavailable
from service.errors import NoSlot, OverBudget

log = logging.getLogger("vibethinker.budget")
DAY_S = 86400
SLOT_MARGIN_S = 60  # a slot outlives its request's deadline by this much, then expires on its own
UNBOUNDED = 2**62  # a team limit that is not set: its level counts, and never refuses


@dataclass(frozen=True)
class TeamLimits:
    """The limits a team's members share (None: no team limit of that kind)."""

    name: str
    daily_tokens: int | None = None
    max_concurrent: int | None = None


@dataclass(frozen=True)
class Limits:
    """A user's effective limits: their own where set, else the settings' defaults; and their team's, if any."""

    daily_tokens: int
    max_concurrent: int
    team: TeamLimits | None = None

    def levels(self, user, slots, day):
        """The counters' levels a lease of `user` on `slots` counts against on UTC `day`: the user's own, then
        their team's (a limit the team lacks is unbounded: counted, never refusing)."""
        levels = [Level(f"{slots}:{user}", self.max_concurrent, f"budget:{user}:{day}", self.daily_tokens,
                        f"user:{user}")]
        if self.team is not None:
            team = self.team
            levels.append(Level(f"{slots}:team:{team.name}", team.max_concurrent or UNBOUNDED,
                                f"budget:team:{team.name}:{day}", team.daily_tokens or UNBOUNDED,
                                f"team:{team.name}" if team.daily_tokens else ""))
        return levels


@dataclass
class Lease:
    """What one admitted generation holds: a slot and a reservation at each level (none of either when `held`
    is False). `daily` and `total` are those of the level with the least left (the x-ratelimit-*-tokens
    headers)."""

    user: str
    reserved: int
    daily: int
    total: int  # today's total, after the reservation and then after settling
    reset_s: int
    levels: list = field(default_factory=list)  # service.admission.counters.Level
    day: str = ""
    alerts: tuple = ()  # thresholds (percent) that raise a budget alert when settling reaches them
    member: str = field(default_factory=lambda: uuid.uuid4().hex)
    held: bool = True
    settled: bool = False  # released: a second release (the edge's, after a refusal) does nothing

    def count(self, totals):
        """Each level's total after a step: the tightest one becomes `daily` and `total`."""
        level, total = min(zip(self.levels, totals), key=lambda pair: pair[0].limit - pair[1])
        self.daily, self.total = level.limit, total


def admit(counters, user, limits, need, lease_s, fail_open=False, now=None, slots="inflight", alerts=()):
    """A lease on one of the user's `slots` (batch lines have their own), and their team's, and `need` tokens of
    today's budgets; NoSlot or OverBudget when refused. `alerts`: the thresholds that raise a budget alert."""
    now = now or datetime.now(timezone.utc)
    midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), timezone.utc)
    day = f"{now:%Y-%m-%d}"
    lease = Lease(user, need, limits.daily_tokens, 0, int((midnight - now).total_seconds()) + 1,
                  limits.levels(user, slots, day), day, tuple(alerts))
    try:
        status, level, value = counters.admit(lease.levels, lease.member, int(lease_s) + SLOT_MARGIN_S, need,
                                              2 * DAY_S, (day, lease.alerts) if lease.alerts else None)
    except StorageUnavailable:
        if not fail_open:
            raise
        log.warning("quota storage unreachable: serving %s without budget or concurrency limits", user)
        lease.held = False
        return lease
    if status == NO_SLOT:
        whose = f"{user} already has" if level == 0 else f"team {limits.team.name} (of {user}) already has"
        raise NoSlot(f"{whose} {value} requests running; the limit is {lease.levels[level].cap} at a time",
                     "concurrency_limit_exceeded", retry_after=1)
    if status == OVER_BUDGET:
        raise _over(lease, level, value, f"this request may use up to {need} (prompt + max_new_tokens)")
    lease.count(value)
    return lease


def _over(lease, level, value, asked):
    """OverBudget for the lease's `level` (0: the user's, 1: the team's), which holds `value` today."""
    limit = lease.levels[level].limit
    lease.daily, lease.total = limit, value
    left = max(limit - value, 0)
    team = lease.levels[level].who.removeprefix("team:")  # a team level refuses only when it has a budget
    whose = "daily token budget" if level == 0 else f"team {team}'s daily token budget"
    spent = "is spent" if left == 0 else f"has {left} tokens left"
    return OverBudget(f"{whose} of {limit} {spent}; {asked}; it resets at 00:00 UTC", "daily_token_quota_exceeded",
                      "max_new_tokens", retry_after=lease.reset_s, lease=lease)


def resize(counters, lease, limits, need):
    """Change a held lease's reservation to `need` tokens (a document's allowance, once its text is known);
    OverBudget when the growth would pass today's budget (the lease keeps what it had)."""
    if not lease.held:
        return lease
    try:
        status, level, value = counters.resize(lease.levels, lease.member, need - lease.reserved, 2 * DAY_S)
    except StorageUnavailable:  # the reservation stays as it was: the document's allowance covers the prompt
        log.warning("quota storage unreachable while resizing %s's lease", lease.user)
        return lease
    if status == OVER_BUDGET:
        raise _over(lease, level, value, f"this request may use up to {need} (prompt + max_new_tokens) beside "
                                         "what it holds")
    lease.reserved = need
    lease.count(value)
    return lease


def release(counters, lease, used):
    """Settle the reservation to `used` tokens and free the slots, once; a storage failure is logged, not
    raised."""
    if not lease.held or lease.settled:
        return
    lease.settled = True
    try:
        lease.count(counters.release(lease.levels, lease.member, used - lease.reserved, 2 * DAY_S,
                                     (lease.day, lease.alerts) if lease.alerts else None))
    except StorageUnavailable:  # the slot expires on its own; the reservation stays counted
        log.warning("quota storage unreachable while settling %s's lease", lease.user)
