"""A worker's pool of helper processes (pebble), started on first use: for work that may hang or crash (reading
documents, checking answers), stopped past its time limit without harm to the worker.

Helpers are spawned (a fresh interpreter, never a fork of a worker holding
torch's threads, its keys in memory or its database connections), so they
inherit only the pipe multiprocessing passes them, none of the worker's other
open files. A `bare` pool's processes also start with an empty environment:
the service's settings (a database URL with its password, key paths) are not
in them, not even in /proc/self/environ. Under systemd the reading
processes additionally run in their own unit (systemd/, README).
"""

import atexit
import multiprocessing
import os
import shlex
import shutil
import sys
import tempfile
import threading

# All a helper's environment holds. One thread and two malloc arenas each: a reader's address space is capped
# (RLIMIT_AS), and per-core thread stacks and arenas on a many-core host would spend the cap before the document.
BARE_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
            "MALLOC_ARENA_MAX": "2"}
_launcher = {}  # the bare launcher of this process, made once


class Processes:
    """A lazily started pebble ProcessPool of `workers` spawned processes, each run `initializer(*initargs)`
    first; `bare`: started with an empty environment."""

    def __init__(self, workers, initializer=None, initargs=(), bare=False):
        self.workers, self.initializer, self.initargs, self.bare = workers, initializer, initargs, bare
        self._pool, self._lock = None, threading.Lock()

    def pool(self):
        """The pool, started now if it was not."""
        with self._lock:
            if self._pool is None:
                import pebble  # spawned, never forked from a worker holding torch's threads

                context = multiprocessing.get_context("spawn")
                if self.bare:
                    context.set_executable(bare_launcher())
                self._pool = pebble.ProcessPool(max_workers=self.workers, initializer=self.initializer,
                                                initargs=self.initargs, context=context)
            return self._pool

    def close(self):
        """Stop the processes (a later use starts new ones)."""
        with self._lock:
            if self._pool is not None:
                self._pool.stop()
                self._pool.join(timeout=5)
                self._pool = None


def bare_launcher():
    """A script that runs this Python with BARE_ENV only: multiprocessing's spawn passes the worker's own
    environment, and takes only an executable to change how it starts one. Spawned helpers of this process
    all start through it (the executable is multiprocessing's, per process); sys.path still reaches them
    through spawn's own preparation data."""
    if "path" not in _launcher:
        folder = tempfile.mkdtemp(prefix="vibethinker-helpers-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        path = os.path.join(folder, "python")
        env = " ".join(shlex.quote(f"{name}={value}") for name, value in BARE_ENV.items())
        with open(path, "w") as script:
            script.write(f'#!/bin/sh\nexec /usr/bin/env -i {env} {shlex.quote(sys.executable)} "$@"\n')
        os.chmod(path, 0o700)
        _launcher["path"] = path
    return _launcher["path"]
