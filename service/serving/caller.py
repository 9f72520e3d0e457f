"""Who a generation is for: the user, their limits and allow-lists, as the edge found them.

A live request's caller comes from its verified token (auth.guard), a batch
line's from its owner's user row read when the line starts, so a line runs
under the owner's rights of that moment. Serving is given the caller; it
never looks it up.
"""

import dataclasses
from dataclasses import dataclass

from auth.transcripts import transcripts_on
from service.admission.budget import Limits, TeamLimits

LIVE_SLOTS = "inflight"  # the concurrency slots of live requests
BATCH_SLOTS = "batch-inflight"  # batch lines': a batch never takes its owner's interactive slots


@dataclass(frozen=True)
class Caller:
    """A user as serving needs them: limits (None: the settings' default) and allow-lists (None: any)."""

    user: str
    daily_tokens: int | None = None
    max_concurrent: int | None = None
    models: tuple | None = None  # the model names or aliases the user may call
    system_prompts: tuple | None = None  # the system prompts the user may send
    slots: str = LIVE_SLOTS
    team: TeamLimits | None = None  # the team whose budget and concurrency cap the user shares
    transcripts: bool = False  # whether this caller's generations are kept (auth.transcripts.transcripts_on)

    @classmethod
    def of_token(cls, token):
        """The caller of a verified token record (auth.store: its user's fields beside it)."""
        return cls._of(token["user"], token)

    @classmethod
    def of_user(cls, user, max_concurrent):
        """A batch line's caller: its owner's row, on the batch slots, `max_concurrent` of them."""
        caller = cls._of(user["name"], user)
        # Lines count against their team's budget; like the owner's own, the team's cap is for live requests.
        team = caller.team and dataclasses.replace(caller.team, max_concurrent=None)
        return dataclasses.replace(caller, max_concurrent=max_concurrent, slots=BATCH_SLOTS, team=team)

    @classmethod
    def _of(cls, name, fields):
        lists = {key: None if fields.get(key) is None else tuple(fields[key]) for key in ("models", "system_prompts")}
        team = fields.get("team") and TeamLimits(fields["team"], fields.get("team_daily_tokens"),
                                                 fields.get("team_max_concurrent"))
        return cls(name, fields.get("daily_tokens"), fields.get("max_concurrent"), **lists, team=team,
                   transcripts=transcripts_on(fields))

    def limits(self, settings):
        """The budgets and concurrency caps this caller is admitted under: their own, and their team's."""
        return Limits(self.daily_tokens or settings.default_daily_tokens,
                      self.max_concurrent or settings.default_max_concurrent, self.team)
