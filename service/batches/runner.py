"""The batch runner: one thread per worker that feeds batch lines to the engine when it has room.

Interactive requests come first: a line is handed to its model's engine
only while nothing waits in that engine's queue and at least
`batch_reserved_rows` rows of its running batch stay free. A line the
response cache can answer is answered from it at once (no budget spent),
and a line's whole answer is cached as a live request's would be. Users take turns: the next line comes from the next
user (in name order) with a batch in progress, so one big batch does not
hold back another user's small one.

Each line is admitted like a live request: it reserves prompt + max tokens
of its owner's daily budget (a line that does not fit fails with the budget
error in the error file) on a concurrency key of its own, so a batch never
takes the owner's interactive slots. Its answer (or error) is stored with
the line, and its usage row written, before the next state change; when
every line is finished the output and error files are written and the batch
completes. Cancelled and expired batches stop taking lines, let the lines
running finish, and end with the files of what was done.
"""

import dataclasses
import logging
import socket
import threading
import time
from datetime import datetime, timedelta, timezone

from service.admission import budget
from service.admission.counters import StorageUnavailable, alive, ledger_name, ledger_parts
from service.api import cache
from service.batches import lines
from service.errors import APIError
from service.inference.engine import GenerationRequest, NotReady, QueueFull
from service.records.accounting import Usage

log = logging.getLogger("vibethinker.batches")
IDLE_S = 0.2  # between looks when there is nothing to do
RUNNING_S = 0.005  # between looks while lines run
ROUTE = "/v1/batches"
BATCH_SLOTS = "batch-inflight"
BEAT_S = 5.0  # how often a runner renews the lines it holds (their claimed_at)


class Running:
    """One line handed to the engine."""

    def __init__(self, batch, line, custom_id, prepared, handle, lease, served, key=None):
        self.batch, self.line, self.custom_id, self.prepared = batch, line, custom_id, prepared
        self.handle, self.lease, self.started = handle, lease, time.monotonic()
        self.served, self.key = served, key  # the model answering, and the line's cache key (None: not cached)

    @property
    def request_id(self):
        return f"{self.batch['id']}:{self.line}"


class BatchRunner:
    """Runs the batches of one app: `start()` once the engine is started."""

    def __init__(self, app, state):
        self.app, self.state = app, state
        self.records = state.batches
        self.owner = ledger_name()  # this runner's name on the lines it holds: host, master and worker pids
        self._beat = 0.0  # when the lines held were last renewed
        self.running = []
        self._turn = None  # the user served last
        self._looked = 0.0  # when the database was last asked for batches
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vibethinker-batches", daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self, timeout=None):
        self._stop.set()
        self._thread.join(timeout)

    def _run(self):
        with self.app.app_context():
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
        active = self.records.active()
        for batch in active:
            moved |= self._maybe_end(batch)
        pending = [b for b in active if b["status"] == "in_progress" and not self._expired(b)]
        while pending and self._room():
            batch = self._next(pending)
            claimed = self.records.claim(batch["id"], self.owner)
            if claimed is None:
                pending.remove(batch)
                continue
            if not self._start(batch, *claimed):
                break
            moved = True
        return moved

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
        self.records.beat(self.owner)
        stale = datetime.now(timezone.utc) - timedelta(seconds=self.state.settings.batch_lease_s)
        taken = self.records.reclaim_stale(stale, self.owner)
        if taken:
            log.warning("batch lines of a runner that stopped run again here", extra={"fields": {"lines": taken}})

    def _room(self, served=None):
        """True while no interactive request waits for `served`'s engine and its running batch has a row to
        spare (None: any served model's)."""
        if served is None:
            return any(self._room(item) for item in self.state.models)
        engine, settings = served.engine, self.state.settings
        joining = sum(1 for r in self.running if r.served is served and r.handle.started is None)  # queued lines
        if not engine.ready or engine.queued() > joining:
            return False
        rows = max(1, settings.max_batch_size - settings.batch_reserved_rows)
        return engine.running + joining < rows

    def _next(self, pending):
        """The oldest batch of the next user after the one served last."""
        users = sorted({b["user"] for b in pending})
        after = [u for u in users if self._turn is None or u > self._turn]
        self._turn = (after or users)[0]
        return next(b for b in pending if b["user"] == self._turn)

    def _start(self, batch, line, custom_id, prepared):
        """Admit and submit one claimed line; False (the line pending again) when the engine or Redis cannot
        take it now."""
        state, settings = self.state, self.state.settings
        params = lines.params_of(prepared)
        ids = prepared["ids"]
        user = self._user(batch["user"])
        if not user.get("active", False):  # disabled (or removed) since the batch was made: no more lines
            self._fail(batch, line, custom_id, 403, f"account {batch['user']!r} is disabled", "account_disabled")
            return True
        served = state.models.get(prepared["model"]) if "model" in prepared else state.models.default
        if served is None:  # the settings changed since the batch was made
            self._fail(batch, line, custom_id, 404, f"model {prepared['model']!r} is no longer served here",
                       "model_not_found")
            return True
        if not self._room(served):
            self.records.release(batch["id"], line, self.owner)
            return False
        key = cache.key(settings, served, batch["user"], ids, params) if state.cache else None
        hit = state.cache.lookup(key) if key is not None else None
        if hit is not None:
            item = Running(batch, line, custom_id, prepared, None, None, served, key)
            self._finish(batch["id"], line, True,
                         lines.answered(custom_id, prepared, hit, item.request_id, served.name))
            self._usage(item, 200, dataclasses.replace(Usage.of(hit), cached=True))
            return True
        limits = budget.Limits(budget.Limits.of(user, settings).daily_tokens, settings.max_batch_size)
        try:
            lease = budget.admit(state.counters, batch["user"], limits, len(ids) + params.max_new_tokens,
                                 settings.stream_deadline_s, fail_open=settings.ratelimit_fail_open,
                                 slots=BATCH_SLOTS)
        except StorageUnavailable:
            self.records.release(batch["id"], line, self.owner)
            return False
        except APIError as exc:  # over the daily budget (or the batch slots are full)
            if exc.code != "daily_token_quota_exceeded":
                self.records.release(batch["id"], line, self.owner)
                return False
            self._fail(batch, line, custom_id, exc.status, exc.message, exc.code)
            return True
        request = GenerationRequest(ids, params.max_new_tokens, params.temperature, params.top_p,
                                    deadline=time.monotonic() + settings.stream_deadline_s, stop=params.stop,
                                    seed=params.seed)
        try:
            handle = served.engine.submit(request)
        except (QueueFull, NotReady):
            budget.release(state.counters, lease, 0)
            self.records.release(batch["id"], line, self.owner)
            return False
        self.running.append(Running(batch, line, custom_id, prepared, handle, lease, served, key))
        return True

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
            usage = Usage.of(result)
            budget.release(self.state.counters, item.lease, usage.total)
            if result is not None and result.finish_reason in ("stop", "length"):
                status = 200
                self._finish(item.batch["id"], item.line, True, lines.answered(
                    item.custom_id, item.prepared, result, item.request_id, item.served.name))
                if item.key is not None:
                    self.state.cache.store(item.key, result)
            elif result is not None and result.finish_reason == "cancelled":
                status = 499
                self._finish(item.batch["id"], item.line, False, lines.refused(
                    item.custom_id, 499, "the batch was cancelled before this line was answered",
                    "batch_cancelled", item.request_id))
            else:
                status = 500 if result is None else 504
                message = "internal error" if result is None else \
                    f"the line passed the {self.state.settings.stream_deadline_s:g} s deadline"
                self._finish(item.batch["id"], item.line, False, lines.refused(
                    item.custom_id, status, message, "internal_error" if result is None else "deadline_exceeded",
                    item.request_id))
            self._usage(item, status, usage)
        return moved

    def _maybe_end(self, batch):
        """End a batch whose lines are all finished, or that was cancelled or expired; True if it ended."""
        batch_id = batch["id"]
        if batch["status"] == "in_progress" and self._expired(batch):
            self.records.fail_pending(batch_id, lambda custom_id: lines.refused(
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

    def _fail(self, batch, line, custom_id, status, message, code):
        self._finish(batch["id"], line, False, lines.refused(custom_id, status, message, code))

    def _finish(self, batch_id, line, ok, result):
        """Store a line's answer, unless its line was given to another runner (this one was thought gone)."""
        if not self.records.finish_line(batch_id, line, ok, result, self.owner):
            log.warning("a batch line finished here after another runner took it over; its answer is dropped",
                        extra={"fields": {"batch": batch_id, "line": line}})

    def _usage(self, item, status, usage):
        try:
            self.state.usage_log.write(user=item.batch["user"], route=ROUTE, status=status,
                                       latency_ms=int((time.monotonic() - item.started) * 1000),
                                       request_id=item.request_id, model=item.served.name, **usage.fields(),
                                       **item.prepared.get("documents", {}))
        except Exception:  # the line's answer is stored; say loudly that its usage row is missing
            log.exception("usage row of a batch line not written")

    def _user(self, name):
        try:
            return self.state.store.get_user(name)
        except Exception:  # a user removed since: no limits of their own
            return {}

    @staticmethod
    def _expired(batch):
        expires = batch["expires_at"]
        expires = expires if expires.tzinfo else expires.replace(tzinfo=timezone.utc)
        return datetime.now(timezone.utc) >= expires
