"""Generation parameters: the client's values, the defaults (settings, the model's own), the bounds, as one
`Params`."""

from dataclasses import dataclass

from service.errors import BadRequest
from service.inference.generation import LEAST_PENALTY
from service.inputs.schemas import SEED_RANGE, check_range

MAX_STOPS, MAX_STOP_CHARS = 4, 64
MAX_TOP_LOGPROBS = 20  # OpenAI's bound
MAX_TOP_K = 1000
# The default of a sampling parameter neither the settings nor the model's generation_config.json set.
FALLBACK = {"temperature": 0.6, "top_p": 0.95, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}


@dataclass
class Params:
    """Generation parameters after defaults and bounds are applied."""

    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int = 0  # 0: no limit (a client's -1, vLLM's "off", is stored as 0)
    min_p: float = 0.0
    repetition_penalty: float = 1.0
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
            tokens_name="max_new_tokens", reasoning_format=None, top_k=None, min_p=None, repetition_penalty=None,
            model=None):
    """The client's values checked against their bounds (BadRequest naming the field), and each value the client
    left out filled by its default: the setting, else `model` (the served model's own defaults,
    LoadedModel.defaults), else FALLBACK."""
    limit, model = settings.max_new_tokens_limit, model or {}

    def pick(name, value, low, high, **bounds):
        if value is not None:
            return check_range(name, value, low, high, **bounds)
        setting = getattr(settings, f"default_{name}")
        return setting if setting is not None else model.get(name, FALLBACK[name])

    return Params(
        stop=tuple(stop), reasoning_format=reasoning_format or "auto",
        seed=None if seed is None else check_range("seed", seed, *SEED_RANGE, integer=True),
        max_new_tokens=check_range(tokens_name, settings.default_max_new_tokens
                                   if max_new_tokens is None else max_new_tokens, 1, limit, integer=True),
        temperature=float(pick("temperature", temperature, 0.0, 2.0)),
        top_p=float(pick("top_p", top_p, 0.0, 1.0, low_open=True)),
        top_k=max(0, int(pick("top_k", top_k, -1, MAX_TOP_K, integer=True))),
        min_p=float(pick("min_p", min_p, 0.0, 1.0)),
        repetition_penalty=float(pick("repetition_penalty", repetition_penalty, LEAST_PENALTY, 2.0)),
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


def model_defaults(served):
    """The sampling defaults of `served`'s loaded model ({} while it loads: its request is refused then)."""
    loaded = served.engine.model if served.engine is not None else None
    return getattr(loaded, "defaults", None) or {}


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
