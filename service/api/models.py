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
            "description": served.spec.description, "max_tokens": longest(engine)}


def longest(engine):
    """The most new tokens a request may ask this model for now: the settings' limit, the model's context
    and the KV cache's bound, less one prompt token (a request's prompt and its max_tokens must fit both
    together); None while the model is not loaded."""
    settings, model = state().settings, engine.model
    if not engine.ready or model is None:
        return None
    bounds = [settings.max_new_tokens_limit, model.context_length - 1, engine.longest(1)]
    return min(bound for bound in bounds if bound is not None)


def status(served):
    """One model's part of /readyz."""
    engine = served.engine
    rate, rows, depth = engine.speed_now() if engine.ready else (None, 0, 0)
    model = engine.model
    return {"name": served.name, "state": engine.state, "mode": served.mode,
            "device": model.device if model is not None else None,
            "int8_kernel": model.int8_kernel if model is not None else None,
            "load_seconds": round(model.load_seconds, 3) if model is not None else None,
            "queued": engine.queued(), "running": engine.running,
            "decode_tokens_per_s": None if rate is None else round(rate, 2), "decode_batch_size": rows,
            "decode_context_tokens": depth, "decode_tokens_per_s_by_depth": by_depth(engine),
            "kv_cache": cache(engine)}


DEPTHS = (1024, 4096, 16384, 32768)  # tokens of context: where /readyz states one row's decode speed


def by_depth(engine):
    """{depth: tokens/s} of one row alone at each of DEPTHS; {} until the engine has measured its speed."""
    rates = {str(depth): engine.speed.per_row(1, depth) for depth in DEPTHS}
    return {depth: round(rate, 2) for depth, rate in rates.items() if rate is not None}


def cache(engine):
    """The KV cache's bytes (reserved, used, free, bound) and dtype, its bytes per token, and its prefix cache's
    bytes, bound and blocks (None: turned off); None until the model is loaded."""
    model = engine.model
    if not engine.ready or model is None:
        return None
    store = engine.prefixes
    prefixes = None if store is None else {"bytes": store.bytes, "bound": store.bound, "blocks": len(store),
                                           "block_tokens": store.block_tokens}
    return {**engine.cache_bytes(), "dtype": str(model.layout.dtype).removeprefix("torch."),
            "bytes_per_token": model.layout.bytes_per_token, "prefixes": prefixes}


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
