"""Between routes and the engines: parameters, prompt checks, the cache, admission, submission, settling.

Every generation goes through the same steps, streamed or not: `cached`
(the response cache: a hit is the answer, and costs no budget), `admit` (a
budget lease, service.admission.budget), `submit` (the served model's
engine queue), and `settle` (the lease released and the request's usage
recorded, both from the GenerationResult; a whole answer is cached).
`answer` does them for a whole answer; service.api.streaming around a
stream. Every way a generation can be refused is an APIError with its status.
"""

import dataclasses
import time
from dataclasses import dataclass

from flask import g

from service.admission import budget
from service.api import cache, client
from service.errors import APIError
from service.inference.engine import GenerationRequest, NotReady, QueueFull
from service.inference.model import PromptError
from service.inputs.schemas import SEED_RANGE, check_range
from service.records import accounting
from service.state import state

# Seconds a client should wait before retrying when the engine is loading or full.
RETRY_LOADING_S = 5
RETRY_FULL_S = 2
DEADLINE_SHARE = 0.8  # of the deadline a sized answer may plan to use: the rest is margin (queue, slower steps)
SIZED_CUT_SHARE = 0.9  # of the deadline at which a server-sized answer ends as "length" if the plan was optimistic
CLIENT_CHECK_S = 0.25  # how often a non-streamed answer looks whether its client is still there
CANCEL_WAIT_S = 30  # for the engine to drop a cancelled row (one decode step)


@dataclass
class Params:
    """Generation parameters after defaults and bounds are applied."""

    max_new_tokens: int
    temperature: float
    top_p: float
    stop: tuple = ()
    seed: int | None = None
    sized: bool = False  # max_new_tokens is the server's choice, sized to the deadline (fit_deadline)


@dataclass
class Prepared:
    """A checked request, ready to answer: the served model, prompt ids, parameters, and the tokens field's
    name and value as the client gave it (None: the server sizes the answer)."""

    served: object  # service.api.models.Served
    ids: list
    params: Params
    tokens_name: str = "max_tokens"
    asked: int | None = None
    hint: str | None = None  # the English hint, when the question is mostly in another script


def resolve_params(settings, max_new_tokens=None, temperature=None, top_p=None, stop=(), seed=None,
                   tokens_name="max_new_tokens"):
    """Fill defaults from settings and check bounds; raise APIError 400 when out of range."""
    limit = settings.max_new_tokens_limit
    return Params(
        stop=tuple(stop), seed=None if seed is None else check_range("seed", seed, *SEED_RANGE, integer=True),
        max_new_tokens=check_range(tokens_name, settings.default_max_new_tokens
                                   if max_new_tokens is None else max_new_tokens, 1, limit, integer=True),
        temperature=float(check_range("temperature", settings.default_temperature
                                      if temperature is None else temperature, 0.0, 2.0)),
        top_p=float(check_range("top_p", settings.default_top_p if top_p is None else top_p, 0.0, 1.0,
                                low_open=True)),
    )


def prompt_ids(engine, messages, settings, max_new_tokens, param="question", tokens_name="max_new_tokens"):
    """Chat-templated token ids for `engine`'s model; APIError 503 if it is not loaded, 400 if they do not
    fit."""
    if not engine.ready:
        raise not_ready(engine)
    try:
        ids = engine.model.encode_chat(messages)
    except PromptError as exc:
        raise APIError(400, f"{exc}; this conversation cannot be encoded", "invalid_value", param) from None
    if len(ids) > settings.max_prompt_tokens:
        raise APIError(400, f"prompt is {len(ids)} tokens after the chat template; the limit is "
                       f"{settings.max_prompt_tokens}", "context_length_exceeded", param)
    context = engine.model.context_length
    if len(ids) + max_new_tokens > context:
        raise APIError(400, f"prompt ({len(ids)} tokens) plus {tokens_name} ({max_new_tokens}) exceeds the "
                       f"model's context of {context} tokens", "context_length_exceeded", tokens_name)
    return ids


def admit(ids, params, deadline_s):
    """The caller's budget lease for this generation (prompt + max_new_tokens), held at most `deadline_s`
    (and a margin); APIError 429 when refused."""
    app, token = state(), g.auth
    lease = budget.admit(app.counters, token["user"], budget.Limits.of(token, app.settings),
                         len(ids) + params.max_new_tokens, deadline_s, fail_open=app.settings.ratelimit_fail_open)
    accounting.current().lease = lease  # admitted: a usage row is written, whatever happens next
    return lease


def cached(served, ids, params):
    """The cached answer of this request (then it is the request's usage, marked cached), or None; either
    way the request's x-cache header says which, when the request could be cached."""
    app, record = state(), accounting.current()
    record.cache_key = cache.key(app.settings, served, g.auth["user"], ids, params) if app.cache else None
    if record.cache_key is None:
        return None
    hit = app.cache.lookup(record.cache_key)
    record.cache = "miss" if hit is None else "hit"
    if hit is not None:
        record.usage = dataclasses.replace(accounting.Usage.of(hit), cached=True)
    return hit


def settle(lease, result):
    """Release the lease to what `result` used (nothing if None), record it as this request's usage, and
    cache a whole answer of a cacheable request."""
    usage = accounting.Usage.of(result)
    budget.release(state().counters, lease, usage.total)
    record = accounting.current()
    record.usage = usage
    if record.cache_key is not None:
        state().cache.store(record.cache_key, result)
    return usage


def answer(served, ids, params):
    """Admit, generate to the end on `served`'s engine and settle: the result, or APIError 429/503/504
    (499: the client left)."""
    engine, settings = served.engine, state().settings
    deadline_s = deadline_left(settings)
    lease, result, left = admit(ids, params, deadline_s), None, False
    try:
        handle = submit(engine, ids, params, deadline_s * SIZED_CUT_SHARE if params.sized else deadline_s)
        # The engine stops the request at its deadline; the margin covers one slow step.
        until = time.monotonic() + deadline_s + 30
        while result is None and time.monotonic() < until:
            try:
                result = handle.result(timeout=CLIENT_CHECK_S)
            except TimeoutError:
                if client.gone():  # nobody will read the answer: free its batch row now
                    handle.cancel()
                    left = True
                    result = handle.result(timeout=CANCEL_WAIT_S)
        if result is None:
            handle.cancel()
    except TimeoutError:  # cancelled, but the engine did not let go in time: count nothing more
        pass
    finally:
        settle(lease, result)
    if left:
        raise APIError(client.CLIENT_GONE, "the client closed the connection before the answer was ready",
                       "client_closed_request")
    if params.sized and result is not None and result.finish_reason == "timeout":
        return dataclasses.replace(result, finish_reason="length")  # the length the server chose
    if result is None or result.finish_reason in ("timeout", "cancelled"):
        raise deadline_error(settings.request_deadline_s, result.completion_tokens if result else 0)
    return result


def submit(engine, ids, params, deadline_s):
    """Queue a generation that must end within `deadline_s`; the handle, or APIError 503."""
    request = GenerationRequest(ids, params.max_new_tokens, params.temperature, params.top_p,
                                deadline=time.monotonic() + deadline_s, stop=params.stop, seed=params.seed)
    try:
        return engine.submit(request)
    except NotReady:
        raise not_ready(engine) from None
    except QueueFull:
        raise APIError(503, "server is at capacity: the generation queue is full; retry shortly",
                       "queue_full", headers={"Retry-After": RETRY_FULL_S}) from None


def deadline_error(deadline_s, done):
    """APIError 504 for a generation cut by its deadline of `deadline_s` after `done` tokens."""
    return APIError(504, f"generation passed the {deadline_s:g} s deadline after {done} tokens; ask for fewer "
                    "tokens, or stream the answer", "deadline_exceeded")


def fit_deadline(engine, settings, params, ids, asked, tokens_name="max_new_tokens"):
    """Size a whole (non-streamed) answer to its deadline at the engine's measured speed.

    Not asked for (`asked` None): the default, lowered to what fits (finish_reason "length" if reached).
    Such a sized answer is also ended as "length" if the deadline comes first (the measured speed was
    optimistic: longer contexts, a busier machine): the server chose its length, so it never 504s.
    Asked for more than fits: APIError 400 at once, saying how many fit, rather than a minute of compute
    thrown away for a 504. Until the engine has measured its speed, lengths are left as they are."""
    fit = engine.tokens_within(deadline_left(settings) * DEADLINE_SHARE, len(ids))
    if asked is None:
        params = dataclasses.replace(params, sized=True)
    if fit is None or params.max_new_tokens <= fit:
        return params
    if asked is None:
        return dataclasses.replace(params, max_new_tokens=max(1, fit))
    rate, _ = engine.speed_now()
    raise APIError(400, f"{tokens_name} {params.max_new_tokens} cannot finish within the "
                   f"{settings.request_deadline_s:g} s deadline of a whole answer at this server's measured speed "
                   f"(about {rate:.1f} tokens/s per request now): at most {fit} fit. Ask for fewer, or stream the "
                   f"answer (/v1/chat/completions with \"stream\": true, up to {settings.stream_deadline_s:g} s)",
                   "exceeds_deadline", tokens_name)


def deadline_left(settings):
    """Seconds of a whole answer's deadline left to its generation: reading its documents took the rest
    (service.api.attachments); at least one."""
    spent = sum(document.seconds for document in accounting.current().documents)
    return max(1.0, settings.request_deadline_s - spent)


def not_ready(engine):
    if engine.state == "failed":
        return APIError(503, f"model {engine.name!r} failed to load; see the service log", "model_failed",
                        headers={"Retry-After": RETRY_LOADING_S * 6})
    return APIError(503, f"model {engine.name!r} is loading; retry shortly", "model_loading",
                    headers={"Retry-After": RETRY_LOADING_S})


def usage(result):
    """OpenAI-style usage counts of a result."""
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}
