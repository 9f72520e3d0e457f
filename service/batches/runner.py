"""The batch runner: one thread per worker that feeds batch lines to the engine when it has room.

Interactive requests come first: a line goes to its model's engine only while nothing waits in that
engine's queue and `batch_reserved_rows` rows of its batch stay free. Users take turns (by name), so one
big batch does not hold back another user's small one.

Each line runs the live pipeline (service.serving.pipeline) for its owner as they are when it starts
(active, allowed the model and its system prompts), once it fits the owner's rate limit
(service.admission.rates: a spent window makes lines wait, never fail, and live requests never wait for
them): the cache, then admission on concurrency slots of the lines' own (a spent budget fails the line
with the live request's error). Its answer (or error) and its usage row are stored with the line in one
transaction (a crash keeps both or neither). When every line is finished the output and error files are
written and the batch completes; cancelled and expired batches take no more lines and end with what was
done. Every PURGE_S the runner also deletes expired files (service.batches.files).
"""

import logging
import socket
import threading
import time
from datetime import datetime, timedelta, timezone

from auth.errors import StoreError
from service.admission.counters import StorageUnavailable, alive, ledger_name, ledger_parts
from service.admission.rates import LineRates
from service.batches import lines
from service.errors import Forbidden, LimitReached, NotFound, OverBudget, Refusal, Unavailable
from service.inputs.filtering import check_allowed_prompt
from service.records import metrics, timing
from service.records.accounting import usage_row
from service.serving import pipeline, transcript
from service.serving.caller import Caller

log = logging.getLogger("vibethinker.batches")
IDLE_S = 0.2  # between looks when there is nothing to do
RUNNING_S = 0.005  # between looks while lines run
ROUTE = "/v1/batches"
BEAT_S = 5.0  # how often a runner renews the lines it holds (their claimed_at)
PURGE_S = 60.0  # how often expired files are deleted


class Running:
    """One line handed to the engine, as its serving job."""

    def __init__(self, batch, line, custom_id, job, handle=None):
        self.batch, self.line, self.custom_id, self.job = batch, line, custom_id, job
        self.handle, self.started = handle, time.monotonic()

    @property
    def served(self):
        return self.job.served

    @property
    def request_id(self):
        return f"{self.batch['id']}:{self.line}"


class BatchRunner:
    """Runs the batches of one app's state (service.state.State): `start()` once the engines are started."""

    def __init__(self, state):
        self.state = state
        self.records = state.batches
        self.owner = ledger_name()  # this runner's name on the lines it holds: host, master and worker pids
        self._beat = 0.0  # when the lines held were last renewed
        self.running = []
        self._turn = None  # the user served last
        self._looked = 0.0  # when the database was last asked for batches
        self._purged = 0.0  # when expired files were last deleted
        self._unreleased = []  # finished lines the database would not take, to put back to pending
        self.rates = LineRates(state.limiter.limiter, state.settings.default_rate_limit,
                               state.settings.ratelimit_fail_open)  # the limiter is bound before the runner starts
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vibethinker-batches", daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self, timeout=None):
        self._stop.set()
        self._thread.join(timeout)

    def _run(self):
        reset = self._reclaim_dead()
        if reset:
            log.warning("batch lines in progress when the last worker ended run again",
                        extra={"fields": {"lines": reset}})
        while not self._stop.is_set():
            try:
                busy = self._tick()
            except Exception:  # a database or engine hiccup: say so, keep going
                log.exception("batch runner step failed")
                busy = False
            if not busy:  # lines running: look again soon (a finished one frees its row); else rest
                self._stop.wait(RUNNING_S if self.running else IDLE_S)

    def _tick(self):
        """One look: collect finished lines, end batches, start lines where there is room; True if any moved.

        The database is asked only when a line finished, or every IDLE_S (new batches, cancels, expiry)."""
        moved = self._collect()
        if not moved and time.monotonic() - self._looked < IDLE_S:
            return False
        self._looked = time.monotonic()
        self._keep_lines()
        self._purge()
        active = self.records.active()
        for batch in active:
            moved |= self._maybe_end(batch)
        pending = [b for b in active if b["status"] == "in_progress" and not self._expired(b)]
        while pending and self._room():
            batch = self._next(pending)
            user = self._user(batch["user"])
            if self.rates.must_wait(user):  # this user's window is spent: others' lines go on
                pending = [b for b in pending if b["user"] != batch["user"]]
                continue
            claimed = self.records.claim(batch["id"], self.owner)
            if claimed is None:
                pending.remove(batch)
                continue
            if not self._start(batch, user, *claimed):
                break
            moved = True
        return moved

    def _purge(self):
        if time.monotonic() - self._purged < PURGE_S:
            return
        self._purged = time.monotonic()
        count = self.records.purge_expired()
        if count:
            log.info("expired files deleted", extra={"fields": {"files": count}})

    def _reclaim_dead(self):
        """Lines held by runners on this host whose worker is gone (a restart, a kill) go back to pending now;
        how many. (Other servers' lines come back when their hold lapses: `_keep_lines`.)"""
        count = 0
        for owner in self.records.running_owners():
            if owner is None:
                count += self.records.reclaim(None)
                continue
            host, _, worker = ledger_parts(owner)
            if host == socket.gethostname() and not alive(worker):
                count += self.records.reclaim(owner)
        return count

    def _keep_lines(self):
        """Every BEAT_S: renew the lines this runner holds, and take back (as pending) the lines of runners on
        any server that stopped renewing theirs for `batch_lease_s`."""
        if time.monotonic() - self._beat < BEAT_S:
            return
        self._beat = time.monotonic()
        for item in self._unreleased[:]:
            self._unreleased.remove(item)
            self._release(item)
        self.records.beat(self.owner)
        stale = datetime.now(timezone.utc) - timedelta(seconds=self.state.settings.batch_lease_s)
        taken = self.records.reclaim_stale(stale, self.owner)
        if taken:
            log.warning("batch lines of a runner that stopped run again here", extra={"fields": {"lines": taken}})

    def _room(self, served=None, n=1):
        """True while no interactive request waits for `served`'s engine and its running batch has `n` rows to
        spare (None: any served model's)."""
        if served is None:
            return any(self._room(item) for item in self.state.models)
        engine, settings = served.engine, self.state.settings
        queued = [r for r in self.running if r.served is served and r.handle.started is None]  # queued lines
        joining = sum(r.job.params.n for r in queued)  # rows: a line asking n choices takes n
        if not engine.ready or engine.queued() > len(queued):
            return False
        rows = max(1, settings.max_batch_size - settings.batch_reserved_rows)
        return engine.running + joining + min(n, rows) <= rows  # more than `rows` choices: alone

    def _next(self, pending):
        """The oldest batch of the next user after the one served last."""
        users = sorted({b["user"] for b in pending})
        after = [u for u in users if self._turn is None or u > self._turn]
        self._turn = (after or users)[0]
        return next(b for b in pending if b["user"] == self._turn)

    def _start(self, batch, user, line, custom_id, prepared):
        """Run one claimed line through the live pipeline under its owner's (`user`'s) current rights; False
        (the line pending again) when the engine or Redis cannot take it now."""
        state = self.state
        try:
            item = Running(batch, line, custom_id, self._job(batch, user, prepared))
        except Refusal as refusal:  # the owner lost the right to it since the batch was made
            self._finish(batch["id"], line, False, lines.refused(custom_id, refusal))
            return True
        if not self._room(item.served, item.job.params.n):
            self.records.release(batch["id"], line, self.owner)
            return False
        hit = pipeline.cached(state, item.job)
        if hit is not None:
            self.rates.count(user)
            self._finish(batch["id"], line, *lines.shaped(state, custom_id, item.job, hit, item.request_id), item)
            return True
        try:
            item.handle = pipeline.start(state, item.job, state.settings.stream_deadline_s)
        except OverBudget as refusal:  # the owner's day is spent: the line fails as a live request would
            self._finish(batch["id"], line, False, lines.refused(custom_id, refusal, item.request_id), 429, item)
            return True
        except (LimitReached, Unavailable, StorageUnavailable):  # full for now: the line waits its turn
            self.records.release(batch["id"], line, self.owner)
            return False
        self.rates.count(user)
        self.running.append(item)
        return True

    def _job(self, batch, user, prepared):
        """The serving job of a stored line, for its owner as they are now: Forbidden when disabled or no
        longer allowed the model or a system prompt, NotFound when the model is no longer served."""
        settings, name = self.state.settings, batch["user"]
        if not user.get("active", False):  # disabled (or removed) since the batch was made: no more lines
            raise Forbidden(f"account {name!r} is disabled", "account_disabled")
        caller = Caller.of_user(user, settings.max_batch_size)
        for text in prepared.get("system_prompts", ()):  # the allow-list as it is now
            check_allowed_prompt(text, caller.system_prompts)
        served = self.state.models.get(prepared["model"]) if "model" in prepared else self.state.models.default
        if served is None:  # the settings changed since the batch was made
            raise NotFound(f"model {prepared['model']!r} is no longer served here", "model_not_found", "model")
        served = self.state.models.pick(served.name, "", caller.models)  # the allow-list as it is now
        return lines.job_of(prepared, caller, served)

    def _collect(self):
        moved = False
        for item in [r for r in self.running if r.handle.done]:
            self.running.remove(item)
            moved = True
            try:
                result = item.handle.result(timeout=0)
            except Exception:  # noqa: BLE001 - the engine failed this line (its error is logged)
                log.exception("batch line failed in the engine")
                result = None
            pipeline.settle(self.state, item.job, result)
            try:
                self._finish(item.batch["id"], item.line,
                             *lines.finished(self.state, item.custom_id, item.job, result, item.request_id), item)
            except Exception:  # noqa: BLE001 - the database did not take it: the line runs again, never hangs
                log.exception("a finished batch line could not be stored; it will run again")
                self._release(item)
            self._keep_lines()  # shaping may take a while (checking an answer): this runner's hold stays fresh
        return moved

    def _maybe_end(self, batch):
        """End a batch whose lines are all finished, or that was cancelled or expired; True if it ended."""
        batch_id = batch["id"]
        if batch["status"] == "in_progress" and self._expired(batch):
            self.records.fail_pending(batch_id, lambda custom_id: lines.failed(
                custom_id, 408, "the batch expired before this line was answered", "batch_expired"))
            self._cancel_running(batch_id)
            ending = ("expired", "expired_at")
        elif batch["status"] == "cancelling":
            self._cancel_running(batch_id)
            ending = ("cancelled", "cancelled_at")
        else:
            ending = ("completed", "completed_at")
        if any(r.batch["id"] == batch_id for r in self.running):
            return False
        if self.records.unfinished(batch_id, ("pending", "running") if ending[0] == "completed" else ("running",)):
            return False  # lines still to answer, or (cancelled, expired) still running on another server
        if not self.records.finalize(batch_id, batch["user"], *ending):
            return False  # another server's runner ended it
        log.info("batch ended", extra={"fields": {"batch": batch_id, "user": batch["user"], "status": ending[0]}})
        return True

    def _cancel_running(self, batch_id):
        for item in self.running:
            if item.batch["id"] == batch_id:
                item.handle.cancel()

    def _release(self, item):
        """Put a line back to pending; while the database refuses, it is tried again at each beat (`_keep_lines`
        would otherwise renew the hold of a line nobody runs)."""
        try:
            self.records.release(item.batch["id"], item.line, self.owner)
        except Exception:  # noqa: BLE001 - still down
            log.exception("a batch line could not be put back; tried again at the next beat")
            self._unreleased.append(item)

    def _finish(self, batch_id, line, ok, result, status=None, item=None):
        """Store a line's answer with its usage row when one is owed (as a live request's: route and request id
        are the batch's), in one transaction; unless the line was given to another runner (this one was
        thought gone): then neither."""
        usage = usage_row(item.job, ROUTE, status, time.monotonic() - item.started, item.request_id) \
            if item is not None and item.job.recorded else None
        if item is not None:
            timing.observe(metrics.PHASES, ROUTE, item.job.timings, item.job.timings.total())
        if not self.records.finish_line(batch_id, line, ok, result, self.owner, usage):
            log.warning("a batch line finished here after another runner took it over; its answer is dropped",
                        extra={"fields": {"batch": batch_id, "line": line}})
        elif usage is not None:  # stored: its transcript too, when its owner's are kept
            error = None if ok else (result["error"]["code"], result["error"]["message"])
            transcript.keep(self.state, item.job, ROUTE, status, item.request_id, error)

    def _user(self, name):
        """The owner's row as it is now; {} (no rights) when they were removed. A database that does not answer
        raises: the look is tried again, no line is refused for it."""
        try:
            return self.state.store.get_user(name)
        except StoreError as error:
            if error.status != 404:
                raise
            return {}

    @staticmethod
    def _expired(batch):
        expires = batch["expires_at"]
        expires = expires if expires.tzinfo else expires.replace(tzinfo=timezone.utc)
        return datetime.now(timezone.utc) >= expires
