"""Who a generation is for: the user, their limits and allow-lists, as the edge found them.

A live request's caller comes from its verified token (auth.guard), a batch
line's from its owner's user row read when the line starts, so a line runs
under the owner's rights of that moment. Serving is given the caller; it
never looks it up.
"""

from dataclasses import dataclass

from auth.transcripts import transcripts_on
from service.admission.budget import Limits

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
    transcripts: bool = False  # whether this caller's generations are kept (auth.transcripts.transcripts_on)

    @classmethod
    def of_token(cls, token):
        """The caller of a verified token record (auth.store: its user's fields beside it)."""
        return cls._of(token["user"], token)

    @classmethod
    def of_user(cls, user, max_concurrent):
        """A batch line's caller: its owner's row, on the batch slots, `max_concurrent` of them."""
        caller = cls._of(user["name"], user)
        return cls(caller.user, caller.daily_tokens, max_concurrent, caller.models, caller.system_prompts,
                   BATCH_SLOTS, caller.transcripts)

    @classmethod
    def _of(cls, name, fields):
        lists = {key: None if fields.get(key) is None else tuple(fields[key]) for key in ("models", "system_prompts")}
        return cls(name, fields.get("daily_tokens"), fields.get("max_concurrent"), **lists,
                   transcripts=transcripts_on(fields))

    def limits(self, settings):
        """The budget and concurrency this caller is admitted under."""
        return Limits.of({"daily_tokens": self.daily_tokens, "max_concurrent": self.max_concurrent}, settings)
