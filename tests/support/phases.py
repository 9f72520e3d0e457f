"""Named phases of long tests, timed; conftest prints the durations at the end of the run."""

import contextlib
import time

PHASES = []


@contextlib.contextmanager
def phase(name):
    """Time a named phase of a long test; the durations are printed at the end of the run."""
    start = time.monotonic()
    try:
        yield
    finally:
        PHASES.append((name, time.monotonic() - start))
