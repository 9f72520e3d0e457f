"""Between routes and the engine: prompt checks, submission, and error mapping.

Plain functions, no Flask: they take the engine and settings and raise
APIError with the right status for every way a generation can be refused.
"""

import time
from dataclasses import dataclass

from service.engine import GenerationRequest, NotReady, QueueFull
from service.errors import APIError
from service.schemas import check_range

# Seconds a client should wait before retrying when the engine is loading or full.
RETRY_LOADING_S = 5
RETRY_FULL_S = 2


@dataclass
class Params:
    """Generation parameters after defaults and bounds are applied."""

    max_new_tokens: int
    temperature: float
    top_p: float
    stop: tuple = ()
    seed: int | None = None


def resolve_params(settings, max_new_tokens=None, temperature=None, top_p=None, stop=(), seed=None,
                   tokens_name="max_new_tokens"):
    """Fill defaults from settings and check bounds; raise APIError 400 when out of range."""
    limit = settings.max_new_tokens_limit
    return Params(
        stop=tuple(stop), seed=seed,
        max_new_tokens=check_range(tokens_name, settings.default_max_new_tokens
                                   if max_new_tokens is None else max_new_tokens, 1, limit, integer=True),
        temperature=float(check_range("temperature", settings.default_temperature
                                      if temperature is None else temperature, 0.0, 2.0)),
        top_p=float(check_range("top_p", settings.default_top_p if top_p is None else top_p, 0.0, 1.0,
                                low_open=True)),
    )


def prompt_ids(engine, messages, settings, max_new_tokens, param="question", tokens_name="max_new_tokens"):
    """Chat-templated token ids; APIError 503 if the model is not loaded, 400 if they do not fit."""
    if not engine.ready:
        raise not_ready(engine)
    ids = engine.model.encode_chat(messages)
    if len(ids) > settings.max_prompt_tokens:
        raise APIError(400, f"prompt is {len(ids)} tokens after the chat template; the limit is "
                       f"{settings.max_prompt_tokens}", "context_length_exceeded", param)
    context = engine.model.context_length
    if len(ids) + max_new_tokens > context:
        raise APIError(400, f"prompt ({len(ids)} tokens) plus {tokens_name} ({max_new_tokens}) exceeds the "
                       f"model's context of {context} tokens", "context_length_exceeded", tokens_name)
    return ids


def submit(engine, ids, params, settings):
    """Queue a generation with the request deadline; the handle, or APIError 503."""
    request = GenerationRequest(ids, params.max_new_tokens, params.temperature, params.top_p,
                                deadline=time.monotonic() + settings.request_deadline_s, stop=params.stop,
                                seed=params.seed)
    try:
        return engine.submit(request)
    except NotReady:
        raise not_ready(engine) from None
    except QueueFull:
        raise APIError(503, "server is at capacity: the generation queue is full; retry shortly",
                       "queue_full", headers={"Retry-After": RETRY_FULL_S}) from None


def complete(engine, ids, params, settings):
    """Generate to the end; the result, or APIError 503/504."""
    handle = submit(engine, ids, params, settings)
    try:
        # The engine stops the request at its deadline; the margin covers one slow step.
        result = handle.result(timeout=settings.request_deadline_s + 30)
    except TimeoutError:
        handle.cancel()
        result = None
    if result is None or result.finish_reason in ("timeout", "cancelled"):
        raise deadline_error(settings, len(ids), result.completion_tokens if result else 0)
    return result


def deadline_error(settings, prompt_tokens, done):
    """APIError 504 for a generation cut by its deadline, carrying what it computed."""
    error = APIError(504, f"generation passed the {settings.request_deadline_s:g} s deadline after {done} "
                     "tokens; ask for fewer tokens", "deadline_exceeded")
    error.tokens_used = prompt_tokens + done  # the compute was spent: it counts against the budget
    return error


def not_ready(engine):
    if engine.state == "failed":
        return APIError(503, "model failed to load; see the service log", "model_failed",
                        headers={"Retry-After": RETRY_LOADING_S * 6})
    return APIError(503, "model is loading; retry shortly", "model_loading",
                    headers={"Retry-After": RETRY_LOADING_S})


def usage(result):
    """OpenAI-style usage counts of a result."""
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}
