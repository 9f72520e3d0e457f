"""What the app holds for its whole life, through one typed accessor: `state()`.

create_app builds one `State` and attaches it; every route that needs the
settings, the store, the models or the counters asks `state()` for them, so
a reader sees in one place what lives beside the app (and a typo is an
AttributeError, not a KeyError at request time). Below the HTTP layer
nothing calls `state()`: serving and the batch runner are handed the State.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from flask import current_app

if TYPE_CHECKING:  # names for the fields' types only: importing them here would load torch and Redis clients
    from flask_limiter import Limiter

    from auth.keys import KeySet
    from auth.store import Store
    from auth.transcripts import Transcripts
    from service.admission.counters import MemoryCounters, RedisCounters
    from service.batches.records import BatchRecords
    from service.batches.runner import BatchRunner
    from service.inputs.documents import Reader
    from service.inputs.filtering import Rule
    from service.records.alerts import Alerts
    from service.records.transcriptlog import TranscriptLog
    from service.records.usagelog import UsageLog
    from service.serving.answers import Checker
    from service.serving.cache import Cache
    from service.serving.models import Models
    from service.settings import Settings

KEY = "vibethinker"


@dataclass
class State:
    """The app's long-lived parts; `models` is set once their engine threads have started."""

    settings: Settings
    store: Store
    keys: KeySet
    policy: tuple[Rule, ...]  # the content policy's rules
    started_at: float
    counters: RedisCounters | MemoryCounters | None = None  # budgets and concurrency slots
    limiter: Limiter | None = None
    models: Models | None = None  # each served model with its engine
    cache: Cache | None = None  # None when the response cache is off
    usage_log: UsageLog | None = None  # the store's usage rows, by group commit
    batches: BatchRecords | None = None  # files and batch jobs
    batch_runner: BatchRunner | None = None
    documents: Reader | None = None  # this worker's pool reading PDFs and images
    checker: Checker | None = None  # this worker's pool checking final answers against expected ones
    alerts: Alerts | None = None  # this worker's delivery of budget alerts
    transcripts: Transcripts | None = None  # kept generations (encrypted), read by admins
    transcript_log: TranscriptLog | None = None  # their background writer


def attach(app, state):
    """Make `state` the app's state."""
    app.extensions[KEY] = state
    return state


def state(app=None):
    """The state of `app`, or of the app serving this request."""
    return (app or current_app).extensions[KEY]
