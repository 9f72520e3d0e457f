"""Admission: a per-user daily token budget and concurrency cap, held for one generation.

Plain functions over counters (service.admission.counters) and limits, no
Flask, so they are tested without HTTP:

- `admit` takes one of the user's concurrency slots and reserves prompt +
  max_new_tokens of today's budget, in one atomic step; it refuses (NoSlot,
  OverBudget) when either is spent.
- `resize` changes a held reservation (a document's allowance, admitted
  before the document is read, becomes the prompt's real size).
- `release` settles the reservation to what the generation really used and
  frees the slot.

A slot's member is a fresh random id per lease, never anything a client sent.
With the storage down, `admit` raises StorageUnavailable (fail closed), or,
with `fail_open`, returns a lease that holds nothing and limits nothing.
"""

import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from service.admission.counters import NO_SLOT, OVER_BUDGET, StorageUnavailable
from service.errors import NoSlot, OverBudget

log = logging.getLogger("vibethinker.budget")
DAY_S = 86400
SLOT_MARGIN_S = 60  # a slot outlives its request's deadline by this much, then expires on its own


@dataclass(frozen=True)
class Limits:
    """A user's effective limits: their own where set, else the settings' defaults."""

    daily_tokens: int
    max_concurrent: int

    @classmethod
    def of(cls, token, settings):
        return cls(token.get("daily_tokens") or settings.default_daily_tokens,
                   token.get("max_concurrent") or settings.default_max_concurrent)


@dataclass
class Lease:
    """What one admitted generation holds: a slot and a reservation (none of either when `held` is False)."""

    user: str
    reserved: int
    daily: int
    total: int  # today's total, after the reservation and then after settling
    reset_s: int
    budget_key: str = ""
    slot_key: str = ""
    member: str = field(default_factory=lambda: uuid.uuid4().hex)
    held: bool = True
    settled: bool = False  # released: a second release (the edge's, after a refusal) does nothing


def admit(counters, user, limits, need, lease_s, fail_open=False, now=None, slots="inflight"):
    """A lease on one of the user's `slots` (batch lines have their own) and `need` tokens of today's budget;
    NoSlot or OverBudget when refused."""
    now = now or datetime.now(timezone.utc)
    midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), timezone.utc)
    lease = Lease(user, need, limits.daily_tokens, 0, int((midnight - now).total_seconds()) + 1,
                  budget_key=f"budget:{user}:{now:%Y-%m-%d}", slot_key=f"{slots}:{user}")
    try:
        status, value = counters.admit(lease.slot_key, lease.member, limits.max_concurrent,
                                       int(lease_s) + SLOT_MARGIN_S, lease.budget_key, need, limits.daily_tokens,
                                       2 * DAY_S)
    except StorageUnavailable:
        if not fail_open:
            raise
        log.warning("quota storage unreachable: serving %s without budget or concurrency limits", user)
        lease.held = False
        return lease
    if status == NO_SLOT:
        raise NoSlot(f"{user} already has {value} requests running; the limit is "
                     f"{limits.max_concurrent} at a time", "concurrency_limit_exceeded", retry_after=1)
    lease.total = value
    if status == OVER_BUDGET:
        left = max(limits.daily_tokens - value, 0)
        spent = "is spent" if left == 0 else f"has {left} tokens left"
        raise OverBudget(f"daily token budget of {limits.daily_tokens} {spent}; this request may use up to "
                         f"{need} (prompt + max_new_tokens); it resets at 00:00 UTC", "daily_token_quota_exceeded",
                         "max_new_tokens", retry_after=lease.reset_s, lease=lease)
    return lease


def resize(counters, lease, limits, need):
    """Change a held lease's reservation to `need` tokens (a document's allowance, once its text is known);
    OverBudget when the growth would pass today's budget (the lease keeps what it had)."""
    if not lease.held:
        return lease
    try:
        status, value = counters.resize(lease.slot_key, lease.member, lease.budget_key, need - lease.reserved,
                                        limits.daily_tokens, 2 * DAY_S)
    except StorageUnavailable:  # the reservation stays as it was: the document's allowance covers the prompt
        log.warning("quota storage unreachable while resizing %s", lease.budget_key)
        return lease
    if status == OVER_BUDGET:
        left = max(limits.daily_tokens - value, 0)
        raise OverBudget(f"daily token budget of {limits.daily_tokens} has {left} tokens left; this request may "
                         f"use up to {need} (prompt + max_new_tokens) beside what it holds; it resets at 00:00 UTC",
                         "daily_token_quota_exceeded", "max_new_tokens", retry_after=lease.reset_s, lease=lease)
    lease.reserved, lease.total = need, value
    return lease


def release(counters, lease, used):
    """Settle the reservation to `used` tokens and free the slot, once; a storage failure is logged, not
    raised."""
    if not lease.held or lease.settled:
        return
    lease.settled = True
    try:
        lease.total = counters.release(lease.slot_key, lease.member, lease.budget_key, used - lease.reserved,
                                       2 * DAY_S)
    except StorageUnavailable:  # the slot expires on its own; the reservation stays counted
        log.warning("quota storage unreachable while settling %s", lease.budget_key)
