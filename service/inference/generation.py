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
    seed: int | None = None  # makes sampling repeatable
    top_k: int = 0  # sample among the top_k most likely tokens only; 0: no limit
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one
    repetition_penalty: float = 1.0  # above 1, tokens of the prompt and the reply so far are less likely


@dataclass
class GenerationResult:
    """A finished generation; finish_reason is stop, length, timeout or cancelled."""

    text: str
    token_ids: list
    prompt_tokens: int
    finish_reason: str
    queue_seconds: float
    run_seconds: float

    @property
    def completion_tokens(self):
        return len(self.token_ids)


class Generation:
    """The caller's handle on one submitted request."""

    def __init__(self, request, model="model"):
        self.request = request
        self.model = model  # the engine's name: its metrics' label
        self.submitted = time.monotonic()
        self.started = None  # when it joined the batch
        self._cancelled = threading.Event()
        self._done = threading.Event()
        self._deltas = queue.SimpleQueue()
        self._result = None
        self._error = None

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
        """Yield text pieces as they are decoded, ending when the generation ends.

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

    # --- called by the engine thread ---
    def _emit(self, text):
        if text:
            self._deltas.put(text)

    def _finish(self, result=None, error=None):
        self._result, self._error = result, error
        self._deltas.put(_END)
        self._done.set()
