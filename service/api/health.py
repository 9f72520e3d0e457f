"""Liveness and readiness, without a token."""

from importlib import metadata

from flask import Blueprint, current_app

from service.admission.access import public
from service.errors import APIError
from service.api.generation import not_ready
from service.state import state

bp = Blueprint("health", __name__)


@bp.get("/healthz")
@public
def healthz():
    """The process is alive and answering."""
    return {"status": "ok"}


@bp.get("/readyz")
@public
def readyz():
    """200 once the model is loaded and the database and Redis answer; 503 with Retry-After otherwise."""
    app = state()
    engine = app.engine
    if not engine.ready:
        raise not_ready(engine)
    if not _database_answers():
        raise APIError(503, "database is unreachable", "database_unavailable", headers={"Retry-After": 5})
    if not _counters_answer() and not app.settings.ratelimit_fail_open:
        raise APIError(503, "rate-limit storage is unreachable", "ratelimit_storage_unavailable",
                       headers={"Retry-After": 5})
    rate, rows = engine.speed_now()
    return {"status": "ready", "version": version(), "model": app.settings.model_name, "mode": engine.model.mode,
            "device": engine.model.device, "load_seconds": round(engine.model.load_seconds, 3),
            "queued": engine.queued(), "running": engine.running,
            "decode_tokens_per_s": None if rate is None else round(rate, 2), "decode_batch_size": rows}


def _database_answers():
    try:
        return state().store.ping()
    except Exception:  # any driver error means "not ready"; the reason is logged
        current_app.logger.exception("database ping failed")
        return False


def _counters_answer():
    try:
        return state().counters.ping()
    except Exception:  # StorageUnavailable or a driver error: not ready while generation would be refused
        current_app.logger.warning("rate-limit storage ping failed")
        return False


def version():
    """The installed build's version: which release is serving, for upgrades."""
    try:
        return metadata.version("vibethinker-service")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"
