"""Transcripts by a background writer: a request hands its transcript over and goes on; never waits, never fails.

Unlike a usage row (service.records.usagelog), a transcript is not worth a
request's time: `keep` puts it on a bounded queue and returns; one writer
thread encrypts and stores what is pending in one transaction (`write`,
auth.transcripts.Transcripts.write, handed in). A full queue or a failed
write is logged (counts and codes, never text) and the transcripts are
dropped. The same thread runs `purge` at its first write and every PURGE_S.
"""

import logging
import queue
import threading
import time

from service.records.usagelog import next_group, running

log = logging.getLogger("vibethinker.transcripts")
MAX_PENDING = 1024  # transcripts waiting for the writer; more are dropped (and logged)
MAX_GROUP = 64  # transcripts in one transaction at most
PURGE_S = 3600.0  # how often the writer deletes transcripts past their retention


class TranscriptLog:
    """The writer thread and its queue: `keep` hands a transcript over, `flush` waits until all are written."""

    def __init__(self, write, purge, purge_every_s=PURGE_S):
        self._write, self._purge, self._purge_every_s = write, purge, purge_every_s
        self._queue = queue.Queue(MAX_PENDING)
        self._lock = threading.Lock()
        self._thread = None
        self._purged = None  # monotonic time of the last purge

    def keep(self, item):
        """Hand one transcript ({user, created_at, model, route, status, request_id, content}) to the writer."""
        self._ensure_thread()
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            log.error("transcript dropped: the writer is behind", extra={"fields": {"user": item.get("user")}})

    def flush(self, timeout=30.0):
        """Wait until every transcript handed over so far is written (or dropped); False if it took too long."""
        until = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < until:
            time.sleep(0.01)
        return not self._queue.unfinished_tasks

    def _ensure_thread(self):
        with self._lock:
            self._thread = running(self._thread, self._run, "vibethinker-transcripts")

    def _run(self):
        while True:
            group = next_group(self._queue, MAX_GROUP)
            try:
                self._write(group)
            except Exception as exc:  # noqa: BLE001 - the requests were answered; only their transcripts are lost
                log.error("transcripts not written", extra={"fields": {"count": len(group),
                                                                       "error": type(exc).__name__}})
            finally:
                self._maybe_purge()
                for _ in group:
                    self._queue.task_done()

    def _maybe_purge(self):
        if self._purged is not None and time.monotonic() - self._purged < self._purge_every_s:
            return
        self._purged = time.monotonic()
        try:
            count = self._purge()
        except Exception as exc:  # noqa: BLE001 - tried again at the next PURGE_S
            log.error("transcripts not purged", extra={"fields": {"error": type(exc).__name__}})
            return
        if count:
            log.info("transcripts past their retention deleted", extra={"fields": {"transcripts": count}})
