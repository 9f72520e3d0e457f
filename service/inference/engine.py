"""The engine: one scheduler thread owns the model; requests wait in a bounded queue.

A caller builds a `GenerationRequest`, calls `Engine.submit`, and gets a
`Generation` handle (service.inference.generation): `result()` blocks for the
whole answer, `deltas()` yields text as it is decoded. Each request carries a
deadline and a cancel flag that a stopping criterion checks between decode
steps, so a late or abandoned request stops consuming compute.

Batching is continuous (service.inference.batching): between decode steps, waiting
requests join the running batch (up to max_batch rows) and finished ones
leave it, so a request never waits for another one to end. Each step is
one forward pass carrying the decode rows and a budget of prompt tokens
(the `prefill_step_tokens` setting, else what prefills, at the measured
speeds, in the time that makes the step take speed.MIXED_PACE decode steps), so
the weights are read once for both: a long prompt joining slows the running
streams to about a third of their speed while it fills, never stalls them,
and fills at nearly its speed alone. At low load a decode row also checks
tokens drafted from its own prompt and answer (service.inference.speculate),
so a step may give it several. Every step is timed
(service.inference.speed), with the context it read, so callers can size a
request to its deadline at the speed a long answer really has.

Each row's KV cache is reserved when it joins, for its prompt and every
token it may generate (service.inference.kvcache; a request's n choices hold
its prompt once), within a bound on the cache's bytes: a request that would
pass the bound waits at the head of the queue until rows leave (a full queue
refuses more), and one that could never fit is refused at once (`TooLarge`).
A running answer never runs out of memory. The prefix cache
(service.inference.prefixes) keeps prompts' blocks in what the rows leave
free, within its own bound, and gives them back when a row needs the room.
"""

import contextlib
import logging
import queue
import threading
import time

import torch

from service.inference import kvcache, kvmemory
from service.inference.batching import Batch, PassError
from service.inference.generation import (EngineError, Generation, GenerationResult, NotReady, QueueFull,
                                          TooLarge)
from service.inference.prefixes import PrefixStore
from service.inference.speed import DecodeSpeed
from service.records import metrics

log = logging.getLogger("vibethinker.engine")

PREFIX_UNBOUNDED_BYTES = 512 * 2**20  # the prefix cache's default bound beside a KV cache with no bound


class Turns:
    """The engines of one process take turns at the processor: one load, prefill chunk or decode step at a
    time, first come first served. Two models computing at once would each get half the cores and lose
    more to the contention (two torch thread pools on the same cores run 2-3x slower)."""

    def __init__(self):
        self._changed = threading.Condition()
        self._issued = self._serving = 0

    @contextlib.contextmanager
    def turn(self):
        with self._changed:
            ticket, self._issued = self._issued, self._issued + 1
            self._changed.wait_for(lambda: self._serving == ticket)
        try:
            yield
        finally:
            with self._changed:
                self._serving += 1
                self._changed.notify_all()


class Engine:
    """Owns one model in one thread; everything else talks to it through the queue."""

    def __init__(self, loader, queue_size, torch_threads, max_batch=16, name="model", turns=None, cache_bytes=None,
                 prefix_bytes=None, revision="", step_tokens=None, speculation="auto"):
        self._loader = loader
        self._cache_bytes = cache_bytes  # the bound on the rows' KV caches; None: no bound
        self._prefix_bytes = prefix_bytes  # the prefix cache's bound (0: none; None: a share of the KV cache's)
        self._revision = revision  # the model's files and numeric mode: the prefix cache's keys start from it
        self._step_tokens = step_tokens  # prompt tokens a step may prefill beside decode rows; None: measured
        self._speculation = speculation  # drafting tokens by prompt lookup: auto, off or ngram (speculate)
        self._queue = queue.Queue(maxsize=queue_size)
        self._max_batch = max_batch
        self._torch_threads = torch_threads
        self.name = name  # the served model's name: the `model` label of its metrics, a field of its log lines
        self._turns = turns or Turns()
        self._thread = threading.Thread(target=self._run, name=f"vibethinker-engine-{name}"[:64], daemon=True)
        self._stopping = threading.Event()
        self.model = None
        self._batch = None
        self._held = None  # the queue's head, taken out but waiting for cache memory
        self.memory = None  # the rows' KV cache (kvmemory.CacheMemory), once the model is loaded
        self.prefixes = None  # the prefix cache (prefixes.PrefixStore), once loaded, unless turned off
        self.state = "loading"
        self.speed = DecodeSpeed()

    def start(self):
        """Start the engine thread; it loads the model, then serves the queue."""
        metrics.WAITING.labels(self.name).set_function(self.queued)
        metrics.RUNNING.labels(self.name).set_function(lambda: self.running)
        metrics.DECODE_SPEED.labels(self.name).set_function(lambda: self.speed_now()[0] or 0.0)
        metrics.DECODE_CONTEXT.labels(self.name).set_function(lambda: self.speed_now()[2])
        metrics.PREFIX_BYTES.labels(self.name).set_function(lambda: self.prefixes.bytes if self.prefixes else 0)
        for kind in ("reserved", "used", "free", "bound"):
            metrics.KV_CACHE.labels(self.name, kind).set_function(lambda kind=kind: self.cache_bytes().get(kind) or 0)
        self._thread.start()
        return self

    def stop(self, timeout=None):
        self._stopping.set()
        self._thread.join(timeout)

    @property
    def ready(self):
        return self.state == "ready"

    @property
    def running(self):
        """Sequences being generated now: the rows of the batch, and those prefilling to join it."""
        batch = self._batch
        return len(batch) + batch.filling_rows if batch is not None else 0

    @property
    def decoding(self):
        """The rows a decode step runs now (prefilling ones not yet among them)."""
        return len(self._batch) if self._batch is not None else 0

    def queued(self):
        """Requests waiting: in the queue, and the one at its head held for cache memory."""
        return self._queue.qsize() + (self._held is not None)

    def context(self):
        """Tokens in the running rows' caches now."""
        batch = self._batch
        return batch.context if batch is not None else 0

    def tokens_within(self, seconds, prompt_tokens, n=1):
        """Tokens each choice of a request for `n` submitted now could generate in `seconds`, with the rows it
        would share a batch with and the context they hold; None until the engine has measured its speed."""
        rows = min(self._max_batch, self.running + self.queued() + n)
        return self.speed.tokens_within(seconds, rows, prompt_tokens, self.context())

    def speed_now(self):
        """(tokens/s of one row, rows, mean tokens of context a row holds) at the current batch; the rate is
        None until measured."""
        rows, context = max(1, self.decoding), self.context()
        return self.speed.per_row(rows, context), rows, context // rows

    def cache_bytes(self):
        """The KV cache's bytes: reserved by the rows, written by them, free to reserve, and the bound (None:
        no bound); {} until the model is loaded."""
        memory = self.memory
        if memory is None:
            return {}
        return {"reserved": memory.reserved, "used": memory.depth()[1], "free": memory.free, "bound": memory.bound}

    def longest(self, prompt_tokens=0, n=1):
        """The most tokens each of `n` choices of a request with `prompt_tokens` may generate at the cache's
        bound (each choice's row holds the prompt); None: no bound (or not loaded yet)."""
        memory = self.memory
        capacity = None if memory is None else memory.capacity_tokens
        return None if capacity is None else max(0, (capacity - prompt_tokens) // n)

    def submit(self, request):
        """Queue a request and return its handle; raise NotReady, TooLarge or QueueFull at once."""
        if not self.ready:
            raise NotReady(f"model is {self.state}")
        longest = self.longest(len(request.prompt_ids), request.n)
        if longest is not None and request.max_new_tokens > longest:
            rows = f"{request.n} rows of " if request.n > 1 else ""
            raise TooLarge(f"{rows}its prompt ({len(request.prompt_ids)} tokens) and {request.max_new_tokens} new "
                           f"tokens need more KV cache than its bound holds ({self.memory.capacity_tokens} "
                           f"tokens): at most {longest} new tokens fit")
        handle = Generation(request, self.name)
        try:
            self._queue.put_nowait(handle)
        except queue.Full:
            raise QueueFull(f"{self._queue.maxsize} requests are already waiting") from None
        return handle

    def _run(self):
        torch.set_num_threads(self._torch_threads)  # per thread: a non-main thread starts with one
        try:
            with self._turns.turn():  # one model loads at a time: one peak of memory and of disk reads
                self.model = self._loader()
                self.memory = kvmemory.CacheMemory(self.model.layout, self._bound(), self.model.device)
                bound = prefix_bound(self._prefix_bytes, self.memory.bound)
                if bound:
                    self.prefixes = PrefixStore(self.memory, bound, self._revision, self.name)
                config = self.model.model.config
                self.speed.calibrate(kvcache.attention_cost(self.model.layout, config.num_attention_heads,
                                                            device=self.model.device))
        except Exception:  # the process stays up to answer /readyz; the log has the reason
            log.exception("model failed to load", extra={"fields": {"model": self.name}})
            self.state = "failed"
            return
        self.state = "ready"
        metrics.MODEL_LOAD.labels(self.name).set(self.model.load_seconds)
        log.info("model loaded", extra={"fields": {"model": self.name,
                                                   "load_seconds": round(self.model.load_seconds, 2)}})
        batch = self._batch = Batch(self.model, self.memory, self.prefixes, self.name, self._speculation)
        while not self._stopping.is_set():
            self._finish_rows(batch.evict())  # first, so finished rows make room
            joining = self._dequeue(room=self._max_batch - len(batch) - batch.filling_rows,
                                    wait=not batch and not batch.filling)
            if joining:
                try:
                    batch.admit(joining)
                except Exception as exc:  # their caches could not be had (the bound is checked first)
                    log.exception("admission failed", extra={"fields": {"model": self.name}})
                    for handle in joining:
                        handle._finish(error=exc)
            if batch or batch.filling:
                with self._turns.turn():
                    self._step(batch)
        stopped = EngineError("the engine stopped")
        for row in batch.close():
            row.handle._finish(error=stopped)
        waiting = [self._held] if self._held is not None else []
        while True:
            try:
                waiting.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for handle in waiting:
            handle._finish(error=stopped)

    def _bound(self):
        """The cache's bound: the setting, and on a GPU no more than 90% of its memory free once the weights
        are on it (its slabs are committed when allocated, not as written)."""
        if self.model.device != "cuda":
            return self._cache_bytes
        free = int(torch.cuda.mem_get_info()[0] * 0.9)
        return free if self._cache_bytes is None else min(self._cache_bytes, free)

    def _step(self, batch):
        """One pass: the batch's decode rows and a budget of prompt tokens, its time taught to the speeds. A
        failed pass fails the requests of its rows (anything else failing, every request the batch holds)."""
        rows, context, started = len(batch), batch.context, time.monotonic()
        batch.pace = self.speed.pace(rows, context)
        budget = self.speed.prefill_budget(rows, context, self._step_tokens) if batch.filling else 0
        try:
            prefilled = batch.step(budget)
        except PassError as exc:
            log.error("generation failed", exc_info=exc.__cause__, extra={"fields": {"model": self.name}})
            for row in exc.rows:
                row.handle._finish(error=exc.__cause__)
            return
        except Exception as exc:  # a bug outside the pass: the engine goes on, without the rows it held
            log.exception("engine step failed", extra={"fields": {"model": self.name}})
            for row in batch.close():
                row.handle._finish(error=exc)
            return
        seconds = time.monotonic() - started
        if rows and batch.decoded > rows and not prefilled:  # drafts held: the speeds are per token a row
            seconds *= rows / batch.decoded
        self.speed.observe_pass(rows, context, prefilled, seconds)

    def _dequeue(self, room, wait):
        """Up to `room` queued requests that are still wanted and whose caches fit, first come first served
        (the first that does not fit waits for rows to leave, and the others behind it); waits a little
        when the batch is empty."""
        joining, tokens, rows = [], 0, 0
        while rows < room:
            handle = self._held  # stays held (and counted as queued) until it joins or ends
            if handle is None:
                try:
                    handle = self._queue.get(timeout=0.2) if wait and not joining else self._queue.get_nowait()
                except queue.Empty:
                    break
                self._held = handle
            now = time.monotonic()  # after the wait: a request cannot start before it was submitted
            if handle.cancelled or handle.expired(now):
                self._held = None
                reason = "cancelled" if handle.cancelled else "timeout"
                handle._finish(GenerationResult("", [], len(handle.request.prompt_ids), reason,
                                                now - handle.submitted, 0.0))
                continue
            need = tokens + Batch.tokens_of(handle.request)
            if not self.memory.fits(need) or rows + handle.request.n > room:
                break
            self._held, tokens, rows = None, need, rows + handle.request.n
            handle.started = now
            metrics.QUEUE_WAIT.labels(self.name).observe(now - handle.submitted)
            joining.append(handle)
        return joining

    def _finish_rows(self, rows):
        now = time.monotonic()
        for row in rows:
            handle = row.handle
            if row.error is not None:
                log.error("generation failed for one row", exc_info=row.error)
                handle._finish(error=row.error)
                handle.cancel()  # its other choices end at the next step
                continue
            text, ids, reason = row.outcome()
            result = GenerationResult(text, ids, len(handle.request.prompt_ids), reason,
                                      handle.started - handle.submitted, now - handle.started,
                                      forced_tokens=row.forced, thinking_ended=row.thinking.ended,
                                      logprobs=row.logprobs, index=row.index, cached_tokens=row.cached,
                                      prefill_seconds=(handle.first or now) - handle.started)
            if row.index == 0:
                metrics.PROMPT_TOKENS.labels(self.name).inc(result.prompt_tokens)
            metrics.GENERATION_TOKENS.labels(self.name).inc(len(ids))
            metrics.FINISHED.labels(self.name, result.finish_reason).inc()
            handle._settle(result)


def prefix_bound(setting, kv_bound):
    """The prefix cache's bound in bytes: the setting (0: no prefix cache), else a quarter of the KV cache's
    bound, or PREFIX_UNBOUNDED_BYTES when that has none."""
    if setting is not None:
        return setting
    return PREFIX_UNBOUNDED_BYTES if kv_bound is None else kv_bound // 4
