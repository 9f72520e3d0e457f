"""The engine's decode and prefill speed, as measured while it runs, and how it falls with context.

A decode step gives every row of the batch one token, so a row's speed is
one token per step. A step costs a part that depends on the number of rows
(reading the weights, the Python around them) and a part that grows with the
tokens in the rows' caches (each row's attention reads its whole cache). So
a step is modelled as `base(rows) + per_token * context`: `per_token` starts
from a measurement of the attention itself (`calibrate`, at load) and is
refined by a regression of step times on context within each batch size;
`base` is smoothed per
batch size (exponential moving average) with the context part taken out.
Prefill is timed per prompt token: alone, or beside decode rows (the part of
the pass they alone would not have taken). From these, `tokens_within` says
how many tokens one more request can get in a number of seconds, counting
that every row's context grows as it goes, which sizes a request to its
deadline; `prefill_budget` sizes a step's prompt piece so a step with one
takes MIXED_PACE decode steps; `pace` is a row's seconds per token lately,
those steps included.
"""

import math
import threading

SMOOTHING = 0.2  # weight of the newest step in the moving average of a batch size's step time
SLOPE_SMOOTHING = 0.05  # weight of the newest step in the regression of step time on context
MIN_SPREAD = 64  # tokens of context spread (standard deviation) before the regression is trusted
CHUNK_MIN_TOKENS = 8  # a step's prompt piece is never smaller (up to about 8 rows, a matmul costs what one does)
# A step that prefills beside decode rows takes about this many decode steps: the running streams' tokens come
# about that much slower while a prompt joins, and the prompt fills at nearly its speed alone (a step's fixed
# cost, about a decode step's, is shared by a piece twice its size in time; bench/prefill measures both).
MIXED_PACE = 3
CHUNK_IDLE_TOKENS = 2048  # with nothing decoding, a chunk only bounds how late a deadline or cancel is seen
CHUNK_UNMEASURED_TOKENS = 256  # before the speeds are measured
CHUNK_OBSERVED_TOKENS = 64  # a pass prefilling fewer alone (a prompt's tail past a prefix cache hit) is not timed


class DecodeSpeed:
    """Seconds per decode step by batch size and context, and seconds per prefilled prompt token."""

    def __init__(self):
        self._lock = threading.Lock()
        self._base_s = {}  # rows -> seconds per step with no context
        self._prefill_s = None  # seconds per prompt token
        self.per_token = 0.0  # seconds a step takes per token of context its rows read
        self._means = {}  # rows -> (context, seconds) smoothed: the regression works on deviations from them
        self._var = self._cov = 0.0
        self._recent = None  # seconds a pass with decode rows took lately, prompt pieces included (smoothed)

    def calibrate(self, per_token):
        """Start from `per_token` seconds of attention per cached token (measured at load)."""
        with self._lock:
            self.per_token = max(0.0, per_token)

    def observe_step(self, rows, seconds, context=0):
        with self._lock:
            self._regress(rows, context, seconds)
            base = max(0.0, seconds - self.per_token * context)
            old = self._base_s.get(rows)
            self._base_s[rows] = base if old is None else old + SMOOTHING * (base - old)

    def _regress(self, rows, context, seconds):
        """Step time against context, within each batch size: a larger batch holds more context and also
        costs more for its rows alone, which a regression across batch sizes would take for the context's."""
        if rows not in self._means:
            self._means[rows] = (context, seconds)
            return
        (x, y), a = self._means[rows], SLOPE_SMOOTHING
        dx, dy = context - x, seconds - y
        self._means[rows] = (x + a * dx, y + a * dy)
        self._var += a * (dx * dx - self._var)
        self._cov += a * (dx * dy - self._cov)
        if self._var >= MIN_SPREAD ** 2 and self._cov > 0:
            self.per_token = self._cov / self._var

    def observe_prefill(self, tokens, seconds):
        if tokens <= 0:
            return
        with self._lock:
            per = seconds / tokens
            old = self._prefill_s
            self._prefill_s = per if old is None else old + SMOOTHING * (per - old)

    def step_seconds(self, rows, context=0):
        """Seconds a step of `rows` rows reading `context` cached tokens takes; None before any was measured."""
        with self._lock:
            return self._step(rows, context)

    def _step(self, rows, context):
        if not self._base_s:
            return None
        sizes = sorted(self._base_s)
        larger = [size for size in sizes if size >= rows]
        if larger:  # a step of at least as many rows: as slow or slower, so never optimistic
            base = self._base_s[larger[0]]
        else:  # only smaller batches seen: assume the step grows in proportion
            base = self._base_s[sizes[-1]] * rows / sizes[-1]
        return base + self.per_token * context

    def per_row(self, rows, context=0):
        """Tokens per second of one row in a batch of `rows` rows whose caches hold `context` tokens in all;
        None before any step was measured."""
        step = self.step_seconds(rows, context)
        return None if not step else 1.0 / step

    def tokens_within(self, seconds, rows, prompt_tokens=0, context=0):
        """Tokens one more request can get in `seconds` beside `rows - 1` others holding `context` tokens; None
        when not yet known. Every row's cache grows a token a step, so step i reads about
        context + prompt_tokens + rows * i tokens: the steps' sum is solved for the number of steps."""
        with self._lock:
            first = self._step(rows, context + prompt_tokens)
            prefill = (self._prefill_s or 0.0) * prompt_tokens
            growth = self.per_token * rows  # seconds a step gains per step taken
        if not first:
            return None
        left = seconds - prefill
        if left <= 0:
            return 0
        if growth <= 0:
            return int(left / first)
        # n * first + growth * n^2 / 2 <= left
        return max(0, int((-first + math.sqrt(first * first + 2 * growth * left)) / growth))

    def prefill_tokens_within(self, seconds):
        """Prompt tokens a prefill gets through in `seconds`; None when not yet known."""
        with self._lock:
            per = self._prefill_s
        return None if not per else int(seconds / per)

    def observe_pass(self, rows, context, prefilled, seconds):
        """Learn from a pass of `rows` decode rows holding `context` tokens and `prefilled` prompt tokens: a
        decode step's time for the step model; a pass with prompt tokens, its prefill's part (beside decode
        rows: what they alone would not have taken; alone: the whole, if the piece is large enough that the
        pass's fixed cost does not count for much); every pass with decode rows, for the recent pace."""
        if rows:
            with self._lock:
                old = self._recent
                self._recent = seconds if old is None else old + SMOOTHING * (seconds - old)
        if rows and not prefilled:
            self.observe_step(rows, seconds, context)
        elif rows:
            alone = self.step_seconds(rows, context) or 0.0
            self.observe_prefill(prefilled, max(seconds - alone, seconds / MIXED_PACE))
        elif prefilled >= CHUNK_OBSERVED_TOKENS:
            self.observe_prefill(prefilled, seconds)

    def pace(self, rows, context=0):
        """Seconds a row takes per token now: a decode step's, or the recent steps' when slower (prompt pieces
        beside them); None before any step was measured."""
        step = self.step_seconds(rows, context)
        return None if not step else max(step, self._recent or 0.0)

    def prefill_budget(self, running, context=0, setting=None):
        """Prompt tokens a step of `running` decode rows holding `context` tokens may prefill beside them: the
        `setting`, else what prefills in the time that makes the step take MIXED_PACE decode steps."""
        if not running:
            return CHUNK_IDLE_TOKENS
        if setting:
            return setting
        step = self.step_seconds(running, context)
        fit = None if not step else self.prefill_tokens_within(step * (MIXED_PACE - 1))
        if fit is None:
            return CHUNK_UNMEASURED_TOKENS
        return max(CHUNK_MIN_TOKENS, min(CHUNK_IDLE_TOKENS, fit))
