"""The one pipeline every generation runs, live or a batch line: cache, admit, submit, settle.

- `cached`: the response cache; a hit is the answer and costs no budget.
- `admit`: the caller's budget lease (service.admission.budget) on their
  concurrency slots (a batch line's are its own).
- `submit`: the served model's engine queue.
- `settle`: the lease released to what the result used, the job's usage
  set from it, and a whole answer cached.

`answer` does all four for a whole answer and waits for it; a stream
(service.api.streaming) and the batch runner (service.batches.runner) call
`start` and `settle` around their own waiting. Every refusal is typed
(service.errors); nothing here knows HTTP.
"""

import dataclasses
import time
from contextlib import contextmanager

from service.admission import budget
from service.errors import BadRequest, ClientGone, DeadlineExceeded, PromptTooLong, Unavailable
from service.inference.generation import Budget, GenerationRequest, NotReady, QueueFull, TooLarge
from service.records.accounting import Usage
from service.serving import cache

RETRY_LOADING_S = 5  # seconds a client should wait before retrying while a model loads
RETRY_FULL_S = 2  # ... while the engine's queue is full
DEADLINE_SHARE = 0.8  # of the deadline a sized answer may plan to use: the rest is margin (queue, slower steps)
SIZED_CUT_SHARE = 0.9  # of the deadline at which a server-sized answer ends as "length" if the plan was optimistic
CLIENT_CHECK_S = 0.25  # how often a whole answer looks whether its client is still there
CANCEL_WAIT_S = 30  # for the engine to drop a cancelled row (one decode step)
MARGIN_S = 30  # past its deadline, how long a whole answer waits for the engine to let go


def cached(state, job):
    """The cached answer of `job` (then it is the job's usage, marked cached), or None; the job's `cache` says
    which, when it could be cached."""
    job.cache_key = cache.key(state.settings, job.served, job.caller.user, job.ids, job.params) \
        if state.cache else None
    if job.cache_key is None:
        return None
    hit = state.cache.lookup(job.cache_key)
    job.timings.lap("cache")
    job.cache = "miss" if hit is None else "hit"
    if hit is not None:
        job.usage, job.result = dataclasses.replace(Usage.of(hit), cached=True), hit
    return hit


def admit(state, job, deadline_s):
    """The caller's budget lease for `job` (prompt + max_new_tokens), held at most `deadline_s` (and a
    margin); NoSlot or OverBudget when refused. Admitted, the job owes a usage row whatever happens next. A job
    admitted before its documents were read keeps its slot; its reservation becomes the real need."""
    need = len(job.ids) + job.params.n * job.params.max_new_tokens  # n choices: one prompt, n answers
    if job.lease is not None:
        return budget.resize(state.counters, job.lease, job.caller.limits(state.settings), need)
    job.lease = lease(state, job.caller, need, deadline_s)
    job.usage = Usage()
    return job.lease


def admit_reading(state, job):
    """Admit a live `job` before its first document is read: a slot, and a reservation of the document
    allowance (the longest prompt) plus the default answer length, resized once the prompt is known. So a
    user's documents past their concurrency cap or budget are refused before any parsing, and reading time is
    in a usage row whatever comes of the request."""
    settings = state.settings
    if job.lease is None and job.live:
        job.lease = lease(state, job.caller, settings.max_prompt_tokens + settings.default_max_new_tokens,
                          # whether it will be streamed is not known yet: held for the longer deadline
                          max(settings.request_deadline_s, settings.stream_deadline_s))
        job.usage = Usage()


@contextmanager
def preparing(state, caller):
    """One of `caller`'s concurrency slots (no tokens) while a batch's lines, documents included, are prepared:
    a user's creates read documents no faster than their live requests may. NoSlot when all are taken."""
    held = lease(state, caller, 0, state.settings.request_deadline_s)
    try:
        yield held
    finally:
        budget.release(state.counters, held, 0)


def lease(state, caller, need, deadline_s):
    """`caller`'s budget lease of `need` tokens on one of their concurrency slots, held at most `deadline_s`
    (and a margin); NoSlot or OverBudget when refused."""
    settings = state.settings
    sending = state.alerts is not None and state.alerts.targets  # none usable: raise none (they would pile up)
    return budget.admit(state.counters, caller.user, caller.limits(settings), need, deadline_s,
                        fail_open=settings.ratelimit_fail_open, slots=caller.slots,
                        alerts=settings.alert_thresholds if sending else ())


def let_go(state, job):
    """Release a lease the job still holds (a refusal or a cache hit after admission): nothing was generated.
    Settled leases are left as they are."""
    if job.lease is not None:
        budget.release(state.counters, job.lease, 0)


def submit(state, job, deadline_s):
    """Queue `job` on its model's engine, to end within `deadline_s`; the handle, or Unavailable."""
    engine, params = job.served.engine, job.params
    request = GenerationRequest(job.ids, params.max_new_tokens, params.temperature, params.top_p,
                                deadline=time.monotonic() + deadline_s, stop=params.stop, seed=params.seed,
                                n=params.n, logprobs=params.logprobs, budget=budget_of(state.settings, job),
                                top_k=params.top_k, min_p=params.min_p, repetition_penalty=params.repetition_penalty,
                                prefix_scope=prefix_scope(state.settings, job))
    try:
        return engine.submit(request)
    except NotReady:
        raise not_ready(engine) from None
    except TooLarge as exc:
        raise PromptTooLong(f"this request cannot be served: {exc}", "context_length_exceeded",
                            job.tokens_name) from None
    except QueueFull:
        raise Unavailable("server is at capacity: the generation queue is full; retry shortly", "queue_full",
                          retry_after=RETRY_FULL_S) from None


def prefix_scope(settings, job):
    """Which requests may share the job's prompt prefixes in the engine's prefix cache: any of the model's
    ("", prefix_cache_scope "model"), or only its user's own ("user": the verified caller's name, unique and
    never renamed, so no client-chosen value nor token picks it)."""
    return f"user:{job.caller.user}" if settings.prefix_cache_scope == "user" else ""


def budget_of(settings, job):
    """How the job's thinking ends in time (service.inference.thinking); None for a model that does not think."""
    if not job.served.markers.marked:
        return None
    return Budget(settings.answer_tokens, job.params.thinking_budget, settings.loop_period, settings.loop_tokens)


def start(state, job, deadline_s):
    """Admit and submit `job`: its handle. A refusal after admission settles the lease before it raises."""
    try:
        admit(state, job, deadline_s)
        try:
            return submit(state, job, deadline_s)
        except BaseException:
            job.timings.lap("admission")
            settle(state, job, None)
            raise
    finally:
        job.timings.lap("admission")  # sized to the deadline, leased, queued (or refused)


def settle(state, job, result):
    """Release the job's lease to what `result` used (nothing if None), make it the job's usage, and cache a
    whole answer of a cacheable job."""
    job.timings.engine(result)
    job.usage, job.result = Usage.of(result), result
    budget.release(state.counters, job.lease, job.usage.total)
    if job.cache_key is not None:
        state.cache.store(job.cache_key, result, job.params.max_new_tokens)
    return job.usage


def answer(state, job, gone=lambda: False):
    """Admit, generate to the end and settle: the result, or NoSlot, OverBudget, Unavailable,
    DeadlineExceeded, or ClientGone (when `gone()` says the client left)."""
    deadline_s, settings = deadline_left(state.settings, job), state.settings
    handle = start(state, job, deadline_s * SIZED_CUT_SHARE if job.params.sized else deadline_s)
    result, left = None, False
    try:
        until = time.monotonic() + deadline_s + MARGIN_S  # the engine stops it at its deadline: one slow step
        while result is None and time.monotonic() < until:
            try:
                result = handle.result(timeout=CLIENT_CHECK_S)
            except TimeoutError:
                if gone():  # nobody will read the answer: free its batch row now
                    handle.cancel()
                    left = True
                    result = handle.result(timeout=CANCEL_WAIT_S)
        if result is None:
            handle.cancel()
    except TimeoutError:  # cancelled, but the engine did not let go in time: count nothing more
        pass
    finally:
        settle(state, job, result)
    if left:
        raise ClientGone("the client closed the connection before the answer was ready", "client_closed_request")
    return outcome(job, result, settings.request_deadline_s)


def outcome(job, result, deadline_s):
    """The answer of a finished generation, or DeadlineExceeded when the deadline (or a cancel) cut a choice; a
    server-sized answer cut by its deadline ends as "length" instead: the server chose its length."""
    if result is not None and job.params.sized:
        choices = [dataclasses.replace(choice, finish_reason="length", others=())
                   if choice.finish_reason == "timeout" and choice.token_ids else choice
                   for choice in result.choices]  # (one that never started is a 504)
        result = dataclasses.replace(choices[0], others=tuple(choices[1:]))
    cut = [] if result is None else [c for c in result.choices if c.finish_reason in ("timeout", "cancelled")]
    if result is None or cut:
        raise deadline_error(deadline_s, result.completion_tokens if result else 0)
    return result


def fit_deadline(state, job):
    """Size a whole (non-streamed) answer to its deadline at the engine's measured speed.

    Not asked for (`job.asked` None): the default, lowered to what fits (finish_reason "length" if reached).
    Such a sized answer is also ended as "length" if the deadline comes first (the measured speed was
    optimistic: longer contexts, a busier machine): the server chose its length, so it never 504s.
    Asked for more than fits: BadRequest at once, saying how many fit, rather than a minute of compute
    thrown away for a 504. Until the engine has measured its speed, lengths are left as they are."""
    engine, settings, params = job.served.engine, state.settings, job.params
    fit = engine.tokens_within(deadline_left(settings, job) * DEADLINE_SHARE, len(job.ids), params.n)
    if job.asked is None:
        params = dataclasses.replace(params, sized=True)
    if fit is not None and params.max_new_tokens > fit:
        if job.asked is not None:
            rate = engine.speed_now()[0] or 0.0
            raise BadRequest(
                f"{job.tokens_name} {params.max_new_tokens} cannot finish within the "
                f"{settings.request_deadline_s:g} s deadline of a whole answer at this server's measured speed "
                f"(about {rate:.1f} tokens/s per request now): at most {fit} fit. Ask for fewer, or stream the "
                f"answer (/v1/chat/completions with \"stream\": true, up to {settings.stream_deadline_s:g} s)",
                "exceeds_deadline", job.tokens_name)
        params = dataclasses.replace(params, max_new_tokens=max(1, fit))
    job.params = params
    return job


def deadline_left(settings, job):
    """Seconds of a whole answer's deadline left to its generation: reading its documents took the rest
    (service.serving.attachments); at least one."""
    return max(1.0, settings.request_deadline_s - sum(document.seconds for document in job.documents))


def deadline_error(deadline_s, done):
    """DeadlineExceeded for a generation cut by its deadline of `deadline_s` after `done` tokens."""
    return DeadlineExceeded(f"generation passed the {deadline_s:g} s deadline after {done} tokens; ask for "
                            "fewer tokens, or stream the answer", "deadline_exceeded")


def not_ready(engine):
    """Unavailable for a model that is loading, or failed to load."""
    if engine.state == "failed":
        return Unavailable(f"model {engine.name!r} failed to load; see the service log", "model_failed",
                           retry_after=RETRY_LOADING_S * 6)
    return Unavailable(f"model {engine.name!r} is loading; retry shortly", "model_loading",
                       retry_after=RETRY_LOADING_S)
