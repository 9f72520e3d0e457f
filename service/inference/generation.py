"""What a caller hands the engine and gets back: the request, its handle, its result, the refusals.

A caller builds a `GenerationRequest` and gives it to `Engine.submit`
(service.inference.engine), which answers with a `Generation` handle or
refuses with `NotReady`, `TooLarge` or `QueueFull`. The handle is shared by two threads:
the caller blocks on `result()` or iterates `deltas()`, may `cancel()`, and
the engine thread feeds it (`_emit`, `_finish`). Nothing here needs torch,
so a caller that only reads these shapes (the response cache) imports none.
"""

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import NamedTuple

_END = object()
# The smallest repetition penalty: a logit divided by a tiny one overflows float32 to inf, which cannot be
# sampled (5e-324 did, found by the fuzz); this one makes a logit at most 100 times larger.
LEAST_PENALTY = 0.01


class EngineError(Exception):
    """Base of the engine's refusals; the app maps them to HTTP statuses."""


class QueueFull(EngineError):
    """Too many requests are waiting already."""


class NotReady(EngineError):
    """The model is still loading, or failed to load."""


class TooLarge(EngineError):
    """The request's KV cache could never fit the cache's bound, however long it waited."""


@dataclass
class GenerationRequest:
    """What to generate: prompt ids and sampling parameters (temperature 0 is greedy)."""

    prompt_ids: list
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    deadline: float = field(default_factory=lambda: time.monotonic() + 60.0)
    stop: tuple = ()  # strings that end the reply (not included in it)
    seed: int | None = None  # makes sampling repeatable (choice i samples with seed + i)
    top_k: int = 0  # sample among the top_k most likely tokens only; 0: no limit
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one
    repetition_penalty: float = 1.0  # above 1, tokens of the prompt and the reply so far are less likely
    n: int = 1  # choices: rows forked from one prefill of the prompt
    logprobs: int | None = None  # each token's log probability and this many alternatives' (None: none)
    budget: "Budget | None" = None  # how its thinking ends in time (None: never ended early)
    prefix_scope: str = ""  # prefixes of its prompt are shared only with requests of the same scope ("": any)


@dataclass(frozen=True)
class Budget:
    """How a request's thinking is ended early (service.inference.thinking): its budget of thinking tokens
    (None: none), the room kept for the answer after the closing, and what counts as a loop."""

    answer_tokens: int
    tokens: int | None = None
    loop_period: int = 256  # the longest repeated span looked for
    loop_tokens: int = 512  # how far past its first copy a span repeats before it is a loop (0: not looked for)


class Logprob(NamedTuple):
    """One generated token's log probability, its `top` alternatives' (token, log probability), and whether it
    was part of the thinking."""

    token: int
    logprob: float
    top: tuple
    thinking: bool


class Delta(NamedTuple):
    """A piece of one choice's text as it is decoded, and the log probabilities of its tokens (when asked); the
    choice's last one carries its result (`ended`), as each choice ends."""

    index: int
    text: str
    logprobs: tuple = ()
    ended: "GenerationResult | None" = None


@dataclass
class GenerationResult:
    """A finished generation: its first choice, and the others of a request for n (`others`).

    finish_reason is stop, length, timeout or cancelled; `thinking_ended` says why the thinking was ended early
    (service.inference.thinking.REASONS), with its `forced_tokens` (the closing fed in)."""

    text: str
    token_ids: list
    prompt_tokens: int
    finish_reason: str
    queue_seconds: float
    run_seconds: float
    forced_tokens: int = 0
    thinking_ended: str | None = None
    logprobs: list | None = None  # Logprob per token, when asked
    index: int = 0
    others: tuple = ()  # the other choices (GenerationResults of their own, without others)
    cached_tokens: int = 0  # of the prompt's: read from the prefix cache, not prefilled (the request's, once)
    prefill_seconds: float = 0.0  # of run_seconds: from joining the batch to the request's first token

    @property
    def choices(self):
        """Every choice, in index order."""
        return [self, *self.others]

    @property
    def completion_tokens(self):
        """Tokens generated, every choice's together (what a usage row counts)."""
        return sum(len(choice.token_ids) for choice in self.choices)

    @property
    def forced(self):
        """Tokens forced into the thinkings to end them, every choice's together."""
        return sum(choice.forced_tokens for choice in self.choices)


class Generation:
    """The caller's handle on one submitted request."""

    def __init__(self, request, model="model"):
        self.request = request
        self.model = model  # the engine's name: its metrics' label
        self.submitted = time.monotonic()
        self.started = None  # when it joined the batch
        self.first = None  # when its first token was taken
        self._cancelled = threading.Event()
        self._done = threading.Event()
        self._deltas = queue.SimpleQueue()
        self._result = None
        self._error = None
        self._choices = {}  # index -> GenerationResult, until all n are in

    def cancel(self):
        """Ask the engine to stop this request at its next step (or skip it)."""
        self._cancelled.set()

    @property
    def cancelled(self):
        return self._cancelled.is_set()

    def expired(self, now=None):
        return (now or time.monotonic()) >= self.request.deadline

    def result(self, timeout=None):
        """Block until finished; return the GenerationResult or raise the engine's error."""
        if not self._done.wait(timeout):
            raise TimeoutError("generation did not finish in time")
        if self._error is not None:
            raise self._error
        return self._result

    def deltas(self, idle=None):
        """Yield each choice's pieces (Delta) as they are decoded, ending when the generation ends.

        With `idle` seconds, yields None whenever nothing came for that long (a
        stream writes a keep-alive then, which also notices a gone client).
        """
        while True:
            try:
                piece = self._deltas.get(timeout=idle)
            except queue.Empty:
                yield None
                continue
            if piece is _END:
                return
            yield piece

    @property
    def done(self):
        return self._done.is_set()

    def text(self):
        """The first choice's text as it is decoded, to the end (tests, and callers of one choice)."""
        return "".join(delta.text for delta in self.deltas() if delta.index == 0)

    # --- called by the engine thread ---
    def _emit(self, text, index=0, logprobs=()):
        if text or logprobs:
            self._deltas.put(Delta(index, text, tuple(logprobs)))

    def _settle(self, choice):
        """One choice has ended; the generation ends with the last of its n."""
        if self._done.is_set():
            return
        self._choices[choice.index] = choice
        self._deltas.put(Delta(choice.index, "", (), choice))
        if len(self._choices) == self.request.n:
            first, *others = (self._choices[i] for i in range(self.request.n))
            first.others = tuple(others)
            self._finish(first)

    def _finish(self, result=None, error=None):
        if self._done.is_set():  # a request's rows end one by one: the first error ends it
            return
        self._result, self._error = result, error
        self._deltas.put(_END)
        self._done.set()
