"""Liveness and readiness, without a token."""

from flask import Blueprint, current_app

from service.access import public
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
    """200 once the model is loaded; 503 with Retry-After before that or if loading failed."""
    engine = current_app.extensions["vibethinker.engine"]
    if not engine.ready:
        raise not_ready(engine)
    return {"status": "ready", "model": current_app.extensions["vibethinker.settings"].model_name,
            "load_seconds": round(engine.model.load_seconds, 3), "queued": engine.queued()}
