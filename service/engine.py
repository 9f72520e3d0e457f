"""The engine: one scheduler thread owns the model; requests wait in a bounded queue.

A caller builds a `GenerationRequest`, calls `Engine.submit`, and gets a
`Generation` handle: `result()` blocks for the whole answer, `deltas()` yields
text as it is decoded. Each request carries a deadline and a cancel flag that
a stopping criterion checks between decode steps, so a late or abandoned
request stops consuming compute.

Batching: the engine thread takes everything waiting (up to max_batch) that
can share one sampling configuration and generates it together as a wave
(service.batching); requests that arrive meanwhile wait for the next wave.
"""

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from service import metrics
from service.batching import GREEDY_BELOW, StopText, decode_step, generate_wave, wave_key  # noqa: F401

log = logging.getLogger("vibethinker.engine")

_END = object()


class EngineError(Exception):
    """Base of the engine's refusals; the app maps them to HTTP statuses."""


class QueueFull(EngineError):
    """Too many requests are waiting already."""


class NotReady(EngineError):
    """The model is still loading, or failed to load."""


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

    def __init__(self, request):
        self.request = request
        self.submitted = time.monotonic()
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


class Engine:
    """Owns the model in one thread; everything else talks to it through the queue."""

    def __init__(self, loader, queue_size, torch_threads, max_batch=16):
        self._loader = loader
        self._queue = queue.Queue(maxsize=queue_size)
        self._pending = collections.deque()  # taken from the queue, waiting for a wave of their kind
        self._max_batch = max_batch
        self._torch_threads = torch_threads
        self._thread = threading.Thread(target=self._run, name="vibethinker-engine", daemon=True)
        self._stopping = threading.Event()
        self.model = None
        self.running = 0  # sequences being generated now (the live rows of the wave)
        self.state = "loading"
        self.load_error = None

    def start(self):
        """Start the engine thread; it loads the model, then serves the queue."""
        metrics.WAITING.set_function(self.queued)
        metrics.RUNNING.set_function(lambda: self.running)
        self._thread.start()
        return self

    def stop(self, timeout=None):
        self._stopping.set()
        self._thread.join(timeout)

    @property
    def ready(self):
        return self.state == "ready"

    def queued(self):
        return self._queue.qsize() + len(self._pending)

    def submit(self, request):
        """Queue a request and return its handle; raise NotReady or QueueFull at once."""
        if not self.ready:
            raise NotReady(f"model is {self.state}")
        handle = Generation(request)
        try:
            self._queue.put_nowait(handle)
        except queue.Full:
            raise QueueFull(f"{self._queue.maxsize} requests are already waiting") from None
        return handle

    def _run(self):
        import torch

        torch.set_num_threads(self._torch_threads)  # per thread: a non-main thread starts with one
        try:
            self.model = self._loader()
        except Exception as exc:  # the process stays up to answer /readyz with the reason
            log.exception("model failed to load")
            self.state, self.load_error = "failed", exc
            return
        self.state = "ready"
        metrics.MODEL_LOAD.set(self.model.load_seconds)
        log.info("model loaded", extra={"fields": {"load_seconds": round(self.model.load_seconds, 2)}})
        while not self._stopping.is_set():
            if not self._pending:
                try:
                    self._pending.append(self._queue.get(timeout=0.2))
                except queue.Empty:
                    continue
            while len(self._pending) < self._max_batch:  # everything else already waiting joins
                try:
                    self._pending.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            wave = self._take_wave()
            if wave:
                self._serve(wave)

    def _take_wave(self):
        """Up to max_batch pending requests that can run together (same sampling); skip dead ones."""
        key, wave, rest, now = wave_key(self._pending[0].request), [], collections.deque(), time.monotonic()
        while self._pending:
            handle = self._pending.popleft()
            if handle.cancelled or handle.expired(now):
                reason = "cancelled" if handle.cancelled else "timeout"
                handle._finish(GenerationResult("", [], len(handle.request.prompt_ids), reason,
                                                now - handle.submitted, 0.0))
            elif len(wave) < self._max_batch and wave_key(handle.request) == key:
                wave.append(handle)
            else:
                rest.append(handle)
        self._pending = rest
        return wave

    def _serve(self, wave):
        started = time.monotonic()
        for handle in wave:
            metrics.QUEUE_WAIT.observe(started - handle.submitted)
        try:
            outcomes = generate_wave(self.model, wave, self._set_running)
        except Exception as exc:
            log.exception("generation failed")
            for handle in wave:
                handle._finish(error=exc)
            return
        finally:
            self.running = 0
        for handle, (text, ids, reason) in zip(wave, outcomes):
            result = GenerationResult(text, ids, len(handle.request.prompt_ids), reason,
                                      started - handle.submitted, time.monotonic() - started)
            metrics.PROMPT_TOKENS.inc(result.prompt_tokens)
            metrics.GENERATION_TOKENS.inc(result.completion_tokens)
            metrics.FINISHED.labels(result.finish_reason).inc()
            handle._finish(result)

    def _set_running(self, count):
        self.running = count


