"""The engine: one scheduler thread owns the model; requests wait in a bounded queue.

A caller builds a `GenerationRequest`, calls `Engine.submit`, and gets a
`Generation` handle: `result()` blocks for the whole answer, `deltas()` yields
text as it is decoded. Each request carries a deadline and a cancel flag that
a stopping criterion checks between decode steps, so a late or abandoned
request stops consuming compute. Requests run one at a time for now; the
handle is the interface a batching scheduler keeps.
"""

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from service import metrics

log = logging.getLogger("vibethinker.engine")

_END = object()
# Below this temperature, sampling is greedy decoding: dividing logits by a
# near-zero temperature overflows to inf/NaN (5e-324 did, found by hypothesis).
GREEDY_BELOW = 1e-3


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

    def __init__(self, loader, queue_size, torch_threads):
        self._loader = loader
        self._queue = queue.Queue(maxsize=queue_size)
        self._torch_threads = torch_threads
        self._thread = threading.Thread(target=self._run, name="vibethinker-engine", daemon=True)
        self._stopping = threading.Event()
        self.model = None
        self.running = 0  # requests being generated now (one until batching)
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
        return self._queue.qsize()

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
            try:
                handle = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            self.running = 1
            try:
                self._serve(handle)
            finally:
                self.running = 0

    def _serve(self, handle):
        started = time.monotonic()
        if handle.cancelled or handle.expired(started):
            reason = "cancelled" if handle.cancelled else "timeout"
            handle._finish(GenerationResult("", [], len(handle.request.prompt_ids), reason,
                                            started - handle.submitted, 0.0))
            return
        metrics.QUEUE_WAIT.observe(started - handle.submitted)
        try:
            result = _generate(self.model, handle)
        except Exception as exc:
            log.exception("generation failed")
            handle._finish(error=exc)
            return
        result.queue_seconds = started - handle.submitted
        result.run_seconds = time.monotonic() - started
        metrics.PROMPT_TOKENS.inc(result.prompt_tokens)
        metrics.GENERATION_TOKENS.inc(result.completion_tokens)
        metrics.FINISHED.labels(result.finish_reason).inc()
        handle._finish(result)


def _generate(loaded, handle):
    """Run one request through model.generate with its deadline and streaming."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    req = handle.request

    class Deadline(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            stop = handle.cancelled or handle.expired() or stream.text.hit
            return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

    class Stream(BaseStreamer):
        def __init__(self):
            self.ids, self.prefix, self.read, self.seen_prompt = [], 0, 0, False
            self.last = None
            self.text = StopText(req.stop)

        def put(self, value):
            if not self.seen_prompt:  # generate() first hands over the prompt
                self.seen_prompt = True
                return
            now = time.monotonic()
            if self.last is None:
                metrics.TTFT.observe(now - handle.submitted)
            else:
                metrics.INTER_TOKEN.observe(now - self.last)
            self.last = now
            metrics.BATCH_SIZE.observe(1)  # one sequence per step until batching lands
            self.ids.extend(value.reshape(-1).tolist())
            text, self.prefix, self.read = decode_step(loaded.decode, self.ids, self.prefix, self.read)
            handle._emit(self.text.feed(text))

        def end(self):
            handle._emit(self.text.flush())

    sampling = dict(do_sample=True, temperature=req.temperature, top_p=req.top_p) \
        if req.temperature >= GREEDY_BELOW else dict(do_sample=False)
    input_ids = torch.tensor([req.prompt_ids], dtype=torch.long)
    stream = Stream()
    if req.seed is not None:
        torch.manual_seed(req.seed)  # this thread runs one generation at a time
    with torch.inference_mode():
        out = loaded.model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
            max_new_tokens=req.max_new_tokens, pad_token_id=loaded.pad_id,
            stopping_criteria=StoppingCriteriaList([Deadline()]), streamer=stream, **sampling,
        )
    new_ids = out[0, input_ids.shape[1]:].tolist()
    if stream.text.hit:
        return GenerationResult(stream.text.text, new_ids, len(req.prompt_ids), "stop", 0.0, 0.0)
    return GenerationResult(loaded.decode(new_ids), new_ids, len(req.prompt_ids),
                            finish_reason(new_ids, loaded.eos_ids, req.max_new_tokens, handle), 0.0, 0.0)


def finish_reason(new_ids, eos_ids, max_new_tokens, handle):
    """Why generation ended: an end token, the length budget, the deadline, or a cancel."""
    if new_ids and new_ids[-1] in eos_ids:
        return "stop"
    if len(new_ids) >= max_new_tokens:
        return "length"
    return "cancelled" if handle.cancelled else "timeout"


def decode_step(decode, ids, prefix, read):
    """Incremental detokenisation: the new text since `read`, never a split character.

    Decodes a short window (from `prefix`) rather than the whole sequence, and
    holds text back while it ends in a replacement character (half a UTF-8 sequence).
    """
    before = decode(ids[prefix:read])
    after = decode(ids[prefix:])
    if len(after) > len(before) and not after.endswith("\ufffd"):
        return after[len(before):], read, len(ids)
    return "", prefix, read


class StopText:
    """Generated text, cut at the first stop string; releases only text that cannot start one."""

    def __init__(self, stops):
        self.stops = tuple(s for s in stops if s)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text, self.sent, self.hit = "", 0, False

    def feed(self, piece):
        """Add decoded text; return what may be sent now."""
        if self.hit:
            return ""
        self.text += piece
        start = max(0, self.sent - self.hold)
        found = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if found:
            self.text, self.hit = self.text[:min(found)], True
            return self._release(len(self.text))
        return self._release(max(self.sent, len(self.text) - self.hold))

    def flush(self):
        """What is left to send once generation has ended."""
        return self._release(len(self.text))

    def _release(self, upto):
        piece, self.sent = self.text[self.sent:upto], upto
        return piece
