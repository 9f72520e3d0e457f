"""Liveness and readiness, without a token."""

from importlib.metadata import PackageNotFoundError, version

from flask import Blueprint, current_app

from service.access import public
from service.errors import APIError
from service.generate import not_ready

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
    engine = current_app.extensions["vibethinker.engine"]
    if not engine.ready:
        raise not_ready(engine)
    if not _database_answers():
        raise APIError(503, "database is unreachable", "database_unavailable", headers={"Retry-After": 5})
    if not _counters_answer() and not current_app.extensions["vibethinker.settings"].ratelimit_fail_open:
        raise APIError(503, "rate-limit storage is unreachable", "ratelimit_storage_unavailable",
                       headers={"Retry-After": 5})
    settings = current_app.extensions["vibethinker.settings"]
    return {"status": "ready", "version": _version(), "model": settings.model_name, "mode": engine.model.mode,
            "load_seconds": round(engine.model.load_seconds, 3), "queued": engine.queued(), "running": engine.running}


def _database_answers():
    try:
        return current_app.extensions["vibethinker.store"].ping()
    except Exception:  # any driver error means "not ready"; the reason is logged
        current_app.logger.exception("database ping failed")
        return False


def _counters_answer():
    try:
        return current_app.extensions["vibethinker.counters"].ping()
    except Exception:  # StorageUnavailable or a driver error: not ready while generation would be refused
        current_app.logger.warning("rate-limit storage ping failed")
        return False


def _version():
    """The installed build's version: which release is serving, for upgrades."""
    try:
        return version("vibethinker-service")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"
