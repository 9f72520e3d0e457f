"""Liveness, readiness and the metrics, without a token.

/metrics is served without a token too: nginx allows it only from
configured addresses, and gunicorn listens on a unix socket only nginx can
reach.
"""

from importlib import metadata

from flask import Blueprint, Response, current_app
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api import models
from service.api.access import public
from service.errors import Unavailable
from service.serving.pipeline import not_ready
from service.state import state

bp = Blueprint("health", __name__)


@bp.get("/healthz")
@public
def healthz():
    """The process is alive and answering."""
    return {"status": "ok"}


@bp.get("/metrics")
@public
def metrics():
    """The Prometheus text exposition."""
    return Response(generate_latest(), mimetype=CONTENT_TYPE_LATEST)


@bp.get("/readyz")
@public
def readyz():
    """200 once every model is loaded and the database and Redis answer; 503 with Retry-After otherwise.
    The body has each model's state (in a 503 too, beside the error). The top-level model fields are the
    default model's."""
    app = state()
    each = [models.status(served) for served in app.models]
    waiting = next((served.engine for served in app.models if not served.engine.ready), None)
    if waiting is not None:
        error = not_ready(waiting)
        error.extra["models"] = each
        raise error
    if not database_answers():
        raise Unavailable("database is unreachable", "database_unavailable", retry_after=5)
    if not counters_answer() and not app.settings.ratelimit_fail_open:
        raise Unavailable("rate-limit storage is unreachable", "ratelimit_storage_unavailable",
                          retry_after=5)
    default = dict(each[0])
    default["model"] = default.pop("name")
    del default["state"]
    return {"status": "ready", "version": version(), **default, "models": each}


def database_answers():
    """Whether the database answers now (readiness; the console's health)."""
    try:
        return state().store.ping()
    except Exception:  # any driver error means "not ready"; the reason is logged
        current_app.logger.exception("database ping failed")
        return False


def counters_answer():
    """Whether the rate-limit storage answers now (readiness; the console's health)."""
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
