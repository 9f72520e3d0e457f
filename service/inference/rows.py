"""One choice of a request in the running batch (service.inference.batching): its tokens, its text, its
sampler, its thinking (service.inference.thinking) and why it ended.

A row takes each token the batch chose for it (`add`), or the closing the
batch fed in to end its thinking early (`force`): it decodes them
incrementally, cuts its text at the request's stop strings, keeps their log
probabilities when asked, and hands the text to its caller's handle as it
goes. Every row samples with its own temperature and top_p, and a seeded row
draws each token from a generator seeded with its seed (choice i of a request
with seed + i) and the token's index: any rows can share a step, and a token
drafted ahead (service.inference.speculate) is drawn exactly as it would be
without the draft.
"""

import torch

from service.inference.decoding import GREEDY_BELOW, StopText, decode_step, finish_reason
from service.inference.generation import Logprob
from service.inference.thinking import Loops, Thinking
from service.records import metrics


class Row:
    """One choice of a request inside the batch: its tokens, its text, its sampler, its thinking, why it ended."""

    def __init__(self, handle, loaded, cache, index=0):
        self.handle, self.loaded, self.request, self.index = handle, loaded, handle.request, index
        self.cache = cache  # its keys and values (service.inference.kvcache.RowCache), until it leaves
        self.forks = []  # the other choices of its request, until they join it (reading its prompt's cache)
        self.filled = 0  # prompt tokens in its cache (service.inference.prefill), prefilled or read from the
        self.cached = 0  # prefix cache (these), whose keys for its prompt's blocks are `blocks`, of which it
        self.blocks, self.stored = [], 0  # has stored (or found) those up to `stored`
        self.leader, self.awaits = None, 0  # a row prefilling the same prefix, whose first blocks it waits for
        self.ids, self.prefix, self.read, self.last = [], 0, 0, None
        self.text = StopText(self.request.stop)
        self.done, self.error = False, None
        self.greedy = self.request.temperature < GREEDY_BELOW
        self.seed = None if self.greedy or self.request.seed is None else seed_of(self.request.seed, index)
        self.drafts = None  # its n-gram index, once it speculates (service.inference.speculate.Drafts)
        budget = self.request.budget
        loops = None if budget is None or not budget.loop_tokens else Loops(budget.loop_period, budget.loop_tokens)
        self.thinking = Thinking(loaded.tags, budget and budget.tokens, budget and budget.answer_tokens,
                                 loaded.closing, loops)
        self.forcing = []  # tokens to feed in before its next one: the closing of a thinking ended early
        self.forced = 0
        self.logprobs = [] if self.request.logprobs is not None else None  # those sent
        self.pending = []  # log probabilities of its tokens not sent yet (their text, or their place, unknown)

    @property
    def limit(self):
        """The most tokens it may generate: its max_new_tokens, or less once its thinking was ended early."""
        return self.thinking.limit or self.request.max_new_tokens

    def generator(self, position):
        """The generator drawing its token at `position` (its output's index): seeded from its seed and the
        index when it has a seed, else None (torch's global one)."""
        if self.seed is None:
            return None
        return torch.Generator().manual_seed(token_seed(self.seed, position))

    def fail(self, error):
        """End this row with `error` (its caller gets it); the batch goes on without it."""
        self.error, self.done = error, True

    def add(self, token, now, logprob=None):
        """Take the row's next token: metrics, incremental decoding, stop strings, its thinking, end token."""
        if self.error is not None:
            return
        model = self.handle.model
        metrics.TTFT.labels(model).observe(now - self.handle.submitted) if self.last is None \
            else metrics.INTER_TOKEN.labels(model).observe(now - self.last)
        if self.handle.first is None:
            self.handle.first = now
        self.last = now
        text = self._append(token)
        self._record(logprob, self.thinking.follow(token, self.text.text), text)
        self.done = token in self.loaded.eos_ids or self.should_stop()

    def force(self, logprobs=None):
        """Take the closing fed into the row by the last pass (its tokens' log probabilities, if asked)."""
        tokens, self.forcing = self.forcing, []
        self.forced += len(tokens)
        thinking = self.loaded.closing_thinking
        for i, token in enumerate(tokens):
            self._record(None if logprobs is None else logprobs[i], i < thinking, self._append(token))

    def _append(self, token):
        """Add a token and decode it: the text that may be sent now."""
        self.ids.append(token)
        piece, self.prefix, self.read = decode_step(self.loaded.decode, self.ids, self.prefix, self.read)
        return self.text.feed(piece)

    def _record(self, logprob, thinking, text):
        """Keep the last token's log probability (when asked), and send the text with those not sent yet. A
        token whose place is not known yet (`thinking` None) holds its own and the ones after it back, until
        a token tells: then they all take its place."""
        if logprob is not None and self.logprobs is not None:
            self.pending.append(Logprob(self.ids[-1], logprob[0], logprob[1], thinking))
        if thinking is not None:
            self._place(thinking)
        if thinking is None and self.pending:
            self.handle._emit(text, self.index)
        elif text or (self.pending and self.text.hit):
            self._send(text)

    def _place(self, thinking):
        """The pending log probabilities whose place was not known are the thinking's, or not."""
        if any(entry.thinking is None for entry in self.pending):
            self.pending = [entry._replace(thinking=thinking) if entry.thinking is None else entry
                            for entry in self.pending]

    def _send(self, text):
        self.handle._emit(text, self.index, self.pending)
        if self.logprobs is not None:
            self.logprobs += self.pending
        self.pending = []

    def end_thinking(self, now, seconds_per_token):
        """Whether its thinking must end now (service.inference.thinking); if so, the closing to feed in."""
        if self.done or self.forcing:
            return None
        reason = self.thinking.must_end(len(self.ids), self.request.max_new_tokens,
                                        self.request.deadline - now, seconds_per_token)
        if reason is not None:
            self.forcing = self.thinking.end(reason, len(self.ids), self.request.max_new_tokens)
        return reason

    def should_stop(self):
        return (self.handle.cancelled or self.handle.expired() or self.text.hit
                or len(self.ids) >= self.limit)

    def outcome(self):
        """(text, token ids, finish reason), once the row has left the batch."""
        self._place(False)  # it never said whether it thinks: a text that is not a start tag is an answer
        self._send(self.text.flush())
        if self.text.hit:
            return self.text.text, self.ids, "stop"
        reason = finish_reason(self.ids, self.loaded.eos_ids, self.limit, self.handle)
        return self.loaded.decode(self.ids), self.ids, reason


def seed_of(seed, index):
    """The seed of a request's choice `index`: its seed, plus the index (wrapped into torch's range)."""
    return (seed + index + 2**63) % 2**64 - 2**63


def token_seed(seed, position):
    """The seed of the draw at `position` of a row seeded with `seed`: the two mixed (splitmix64's finaliser),
    so neighbouring seeds and positions draw unrelated streams; in torch's signed 64-bit range."""
    value = (seed + (position + 1) * 0x9E3779B97F4A7C15) % 2**64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) % 2**64
    value ^= value >> 31
    return value - 2**64 if value >= 2**63 else value
