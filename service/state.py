"""What the app holds for its whole life, through one typed accessor: `state()`.

create_app builds one `State` and attaches it; every module that needs the
settings, the store, the engine or the counters asks `state()` for them, so a
reader sees in one place what lives beside the app (and a typo is an
AttributeError, not a KeyError at request time).
"""

from dataclasses import dataclass
from typing import Any

from flask import current_app

KEY = "vibethinker"


@dataclass
class State:
    """The app's long-lived parts; `engine` is set once its thread has started."""

    settings: Any  # service.settings.Settings
    store: Any  # auth.store.Store
    keys: Any  # auth.keys.KeySet
    policy: Any  # service.inputs.filtering's rules
    started_at: float
    counters: Any = None  # service.admission.counters: budgets and concurrency slots
    limiter: Any = None  # flask_limiter.Limiter
    models: Any = None  # service.api.models.Models: each served model with its engine
    cache: Any = None  # service.api.cache.Cache, or None when the response cache is off
    usage_log: Any = None  # service.records.usagelog.UsageLog: the store's usage rows, by group commit
    batches: Any = None  # service.batches.records.BatchRecords: files and batch jobs
    batch_runner: Any = None  # service.batches.runner.BatchRunner
    documents: Any = None  # service.inputs.documents.Reader: this worker's pool reading PDFs and images


def attach(app, state):
    """Make `state` the app's state."""
    app.extensions[KEY] = state
    return state


def state(app=None):
    """The state of `app`, or of the app serving this request."""
    return (app or current_app).extensions[KEY]
