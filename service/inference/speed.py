"""The engine's decode and prefill speed, as measured while it runs.

A decode step gives every row of the batch one token, so a row's speed is
one token per step: its rate at a batch size is 1 / (seconds per step at that
size). Steps are timed by the engine thread and smoothed per batch size
(exponential moving average); prefill is timed per prompt token. From these,
`tokens_within` says how many tokens one more request can get in a number of
seconds, which sizes a synchronous request to its deadline.
"""

import threading

SMOOTHING = 0.2  # weight of the newest step in the moving average


class DecodeSpeed:
    """Seconds per decode step by batch size, and seconds per prefilled prompt token."""

    def __init__(self):
        self._lock = threading.Lock()
        self._step_s = {}  # rows -> seconds per step
        self._prefill_s = None  # seconds per prompt token

    def observe_step(self, rows, seconds):
        with self._lock:
            old = self._step_s.get(rows)
            self._step_s[rows] = seconds if old is None else old + SMOOTHING * (seconds - old)

    def observe_prefill(self, tokens, seconds):
        if tokens <= 0:
            return
        with self._lock:
            per = seconds / tokens
            old = self._prefill_s
            self._prefill_s = per if old is None else old + SMOOTHING * (per - old)

    def per_row(self, rows):
        """Tokens per second of one row in a batch of `rows` rows; None before any step was measured."""
        with self._lock:
            if not self._step_s:
                return None
            sizes = sorted(self._step_s)
            larger = [size for size in sizes if size >= rows]
            if larger:  # a step of at least as many rows: as slow or slower, so never optimistic
                return 1.0 / self._step_s[larger[0]]
            largest = sizes[-1]  # only smaller batches seen: assume the step grows in proportion
            return 1.0 / (self._step_s[largest] * rows / largest)

    def tokens_within(self, seconds, rows, prompt_tokens=0):
        """Tokens one more request can get in `seconds` beside `rows - 1` others; None when not yet known."""
        rate = self.per_row(rows)
        if rate is None:
            return None
        with self._lock:
            prefill = (self._prefill_s or 0.0) * prompt_tokens
        return max(0, int((seconds - prefill) * rate))

    def prefill_tokens_within(self, seconds):
        """Prompt tokens a prefill gets through in `seconds`; None when not yet known."""
        with self._lock:
            per = self._prefill_s
        return None if not per else int(seconds / per)
