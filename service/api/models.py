"""GET /v1/models and /v1/models/<name>, and each model's part of /readyz (service.serving.models holds the
registry)."""

from flask import Blueprint

from service.api.access import caller
from service.errors import NotFound
from service.settings import AUTO
from service.state import state

bp = Blueprint("models", __name__)


def card(served):
    """The OpenAI model object, with what this server adds: readiness, mode, aliases, description."""
    engine = served.engine
    return {"id": served.name, "object": "model", "created": int(state().started_at), "owned_by": "vibethinker",
            "ready": engine.ready, "state": engine.state, "mode": served.mode, "aliases": list(served.spec.aliases),
            "description": served.spec.description}


def status(served):
    """One model's part of /readyz."""
    engine = served.engine
    rate, rows = engine.speed_now() if engine.ready else (None, 0)
    model = engine.model
    return {"name": served.name, "state": engine.state, "mode": served.mode,
            "device": model.device if model is not None else None,
            "load_seconds": round(model.load_seconds, 3) if model is not None else None,
            "queued": engine.queued(), "running": engine.running,
            "decode_tokens_per_s": None if rate is None else round(rate, 2), "decode_batch_size": rows}


@bp.get("/v1/models")
def list_models():
    allowed = caller().get("models")
    permitted = None if allowed is None else state().models.permitted(allowed)
    return {"object": "list", "data": [card(item) for item in state().models
                                       if permitted is None or item.name in permitted]}


@bp.get("/v1/models/<path:model>")
def get_model(model):
    if model.lower() == AUTO:
        raise NotFound(f"{AUTO!r} is not a model: it asks the service to pick one by the question",
                       "model_not_found", "model")
    return card(state().models.pick(model, "", caller().get("models")))
