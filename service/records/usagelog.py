"""Usage rows by group commit: one writer thread commits every pending row in one transaction.

A request hands its row to `UsageLog.write` and waits until the transaction
holding it has committed, so its response never leaves before its record is
durable (a crash after the answer cannot lose it). Under load, the rows of
many requests share one commit instead of queueing for SQLite's write lock
one by one.
"""

import logging
import queue
import threading

log = logging.getLogger("vibethinker.usage")
MAX_GROUP = 256  # rows in one transaction at most
WAIT_S = 30  # longest a request waits for its commit before it reports the row missing


class UsageLog:
    """The writer thread and its queue; `write` blocks until the row is committed, and raises if it was not."""

    def __init__(self, store):
        self._store = store
        self._queue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread = None

    def write(self, **row):
        """Commit one usage row (with others pending at the same time)."""
        pending = _Pending(row)
        self._ensure_thread()
        self._queue.put(pending)
        if not pending.done.wait(WAIT_S):
            raise TimeoutError(f"usage row not committed within {WAIT_S} s")
        if pending.error is not None:
            raise pending.error

    def _ensure_thread(self):
        with self._lock:
            self._thread = running(self._thread, self._run, "vibethinker-usage")

    def _run(self):
        while True:
            group = next_group(self._queue, MAX_GROUP)
            error = None
            try:
                self._store.record_usage([p.row for p in group])
            except Exception as exc:  # every caller of this group hears of it and logs its own row as missing
                error = exc
            for pending in group:
                pending.error = error
                pending.done.set()


def running(thread, target, name):
    """`thread` if it is alive, else a new daemon thread running `target`, started: a writer is started on first
    use, in the process that serves (gunicorn forks after importing the app module). Call it under a lock."""
    if thread is None or not thread.is_alive():
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
    return thread


def next_group(pending, most):
    """The next item of queue `pending` (waiting for it) and those queued behind it, `most` at most."""
    group = [pending.get()]
    while len(group) < most:
        try:
            group.append(pending.get_nowait())
        except queue.Empty:
            break
    return group


class _Pending:
    __slots__ = ("row", "done", "error")

    def __init__(self, row):
        self.row, self.done, self.error = row, threading.Event(), None
