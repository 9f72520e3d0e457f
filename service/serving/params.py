"""Generation parameters: the client's values, the settings' defaults, the bounds, as one `Params`."""

from dataclasses import dataclass

from service.errors import BadRequest
from service.inputs.schemas import SEED_RANGE, check_range

MAX_STOPS, MAX_STOP_CHARS = 4, 64
MAX_TOP_LOGPROBS = 20  # OpenAI's bound


@dataclass
class Params:
    """Generation parameters after defaults and bounds are applied."""

    max_new_tokens: int
    temperature: float
    top_p: float
    stop: tuple = ()
    seed: int | None = None
    sized: bool = False  # max_new_tokens is the server's choice, sized to the deadline (pipeline.fit_deadline)
    reasoning_format: str = "auto"  # "none": the thinking stays in the content (service.serving.reasoning)
    thinking_budget: int | None = None  # thinking tokens before it is ended early (None: no budget)
    n: int = 1  # choices, prefilled once
    logprobs: int | None = None  # alternatives per token when log probabilities are asked for (None: not)
    vote: bool = False  # a majority vote over the choices' final answers

    @classmethod
    def stored(cls, values):
        """Params from their stored (JSON) form: a batch line's."""
        return cls(**{**values, "stop": tuple(values.get("stop") or ())})


def resolve(settings, max_new_tokens=None, temperature=None, top_p=None, stop=(), seed=None,
            tokens_name="max_new_tokens", reasoning_format=None):
    """Fill defaults from settings and check bounds; BadRequest when out of range."""
    limit = settings.max_new_tokens_limit
    return Params(
        stop=tuple(stop), reasoning_format=reasoning_format or "auto",
        seed=None if seed is None else check_range("seed", seed, *SEED_RANGE, integer=True),
        max_new_tokens=check_range(tokens_name, settings.default_max_new_tokens
                                   if max_new_tokens is None else max_new_tokens, 1, limit, integer=True),
        temperature=float(check_range("temperature", settings.default_temperature
                                      if temperature is None else temperature, 0.0, 2.0)),
        top_p=float(check_range("top_p", settings.default_top_p if top_p is None else top_p, 0.0, 1.0,
                                low_open=True)),
    )


def thinking_budget(settings, budget=None, effort=None):
    """The thinking budget a request asks for: its thinking_token_budget, else its reasoning_effort's (settings'
    reasoning_effort_budgets), else None (no budget: the thinking still ends in time for an answer)."""
    if budget is not None:
        return check_range("thinking_token_budget", budget, 0, settings.max_new_tokens_limit, integer=True)
    return None if effort is None else settings.reasoning_effort_budgets.get(effort)


def choices(settings, n=None, logprobs=None, top_logprobs=None):
    """(n, logprobs) of a chat request: n within max_n (and the batch's rows), top_logprobs up to
    MAX_TOP_LOGPROBS and only with logprobs; BadRequest otherwise."""
    most = min(settings.max_n, settings.max_batch_size)
    n = 1 if n is None else check_range("n", n, 1, most, integer=True)
    if top_logprobs is not None and not logprobs:
        raise BadRequest("top_logprobs needs logprobs: true", "invalid_value", "top_logprobs")
    if not logprobs:
        return n, None
    return n, 0 if top_logprobs is None else check_range("top_logprobs", top_logprobs, 0, MAX_TOP_LOGPROBS,
                                                            integer=True)


def stops(stop):
    """Chat's `stop` (a string, a list of them, or None) as a list; BadRequest past its bounds."""
    given = [stop] if isinstance(stop, str) else list(stop or [])
    if len(given) > MAX_STOPS or any(not s or len(s) > MAX_STOP_CHARS for s in given):
        raise BadRequest(f"stop must be at most {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} "
                         "characters", "invalid_value", "stop")
    return given


# OpenAI fields its clients send by default: accepted at the value that asks for nothing more (None: absent).
NEUTRAL = {"presence_penalty": (0, "penalties are not implemented here (repetition_penalty is)"),
           "frequency_penalty": (0, "penalties are not implemented here (repetition_penalty is)")}
SERVICE_TIERS = ("auto", "default")


def refuse_unsupported(body):
    """BadRequest naming the first OpenAI field of a chat request that asks for what the service cannot do."""
    for name, (neutral, why) in NEUTRAL.items():
        value = getattr(body, name)
        if value is not None and value != neutral:
            raise BadRequest(f"{name} must be {str(neutral).lower()} or absent: {why}", "unsupported_value", name)
    if body.tools:
        raise BadRequest("tools are not supported here: this model calls no functions", "unsupported_value", "tools")
    if body.tool_choice not in (None, "none"):
        raise BadRequest('tool_choice must be "none" or absent: this model calls no functions',
                         "unsupported_value", "tool_choice")
    if body.service_tier is not None and body.service_tier not in SERVICE_TIERS:
        raise BadRequest(f"service_tier must be one of {list(SERVICE_TIERS)}: this server has one tier",
                         "unsupported_value", "service_tier")
