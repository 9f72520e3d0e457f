"""A worker's pool of helper processes (pebble), started on first use: for work that may hang or crash (reading
documents, checking answers), stopped past its time limit without harm to the worker."""

import multiprocessing
import threading


class Processes:
    """A lazily started pebble ProcessPool of `workers` spawned processes, each run `initializer` first."""

    def __init__(self, workers, initializer=None):
        self.workers, self.initializer = workers, initializer
        self._pool, self._lock = None, threading.Lock()

    def pool(self):
        """The pool, started now if it was not."""
        with self._lock:
            if self._pool is None:
                import pebble  # spawned, never forked from a worker holding torch's threads

                self._pool = pebble.ProcessPool(max_workers=self.workers, initializer=self.initializer,
                                                context=multiprocessing.get_context("spawn"))
            return self._pool

    def close(self):
        """Stop the processes (a later use starts new ones)."""
        with self._lock:
            if self._pool is not None:
                self._pool.stop()
                self._pool.join(timeout=5)
                self._pool = None
