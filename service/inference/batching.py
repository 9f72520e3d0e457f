"""Continuous batching: one forward pass a step, each row with a KV cache of its own (service.inference.kvcache).

The running batch holds one row per choice of a request (service.inference.rows):
its cache, its tokens, its sampler, its thinking. Between steps, new
requests join and finished rows leave; a leaving row's cache is freed and no
other row's is touched. A joining request's first row prefills its prompt
(service.inference.prefill): what the prefix cache holds of it is copied in,
the rest is prefilled a piece at a time. Each step is one forward pass
carrying every running row's next token (with the closing of a thinking
ended early, service.inference.thinking, fed in beside it) and up to a budget
of prompt tokens of the rows prefilling, each row at its own positions and
attending over its own cache: the model's weights are read once for both,
and a long prompt never stalls the running rows for more than its piece of
a step. A request for n choices is prefilled once: its other rows fork from
its first as it joins, each reading the prompt from the first's cache. While
the pass is small, a decode row also carries the tokens drafted to follow
its next one (service.inference.speculate): the pass chooses a token at each
of them as it would have one at a time, and the row keeps the drafts up to
the first that differs, the token chosen there, and nothing past where it
would have ended; its cache forgets the rest. A
row ends at an end token, its max_new_tokens (or its answer's room after a
forced closing), its deadline, its cancel flag or one of its stop strings,
and hands each token's text to its caller as it is decoded.
"""

import contextlib
import time

import torch

from service.inference import layers, speculate
from service.inference.decoding import choose, logprobs_of
from service.inference.kvcache import Pass
from service.inference.kvmemory import CacheMemory
from service.inference.prefill import Filling
from service.inference.rows import Row
from service.records import metrics

# A pass prefilling at least this many prompt tokens runs in the model's prefill mode (float32 matmuls for a
# bfloat16 model on a CPU without bfloat16 instructions): a few tokens beside decode rows do not slow them so.
FLOAT32_PIECE = 64


def forward(loaded, segments, keep):
    """One forward pass of `segments` (row, token ids), packed into one sequence, each row's tokens at its
    own positions and attending over its own cache: the logits at the packed positions `keep`. Qwen2's
    decoder runs in the engine's own loop (service.inference.layers), any other model through transformers'."""
    ids, positions = [], []
    for row, tokens in segments:
        ids += tokens
        positions += range(row.cache.length, row.cache.length + len(tokens))
    step = Pass([(row.cache, len(tokens)) for row, tokens in segments])
    device, model = loaded.device, loaded.model
    ids, positions = torch.tensor(ids, device=device), torch.tensor(positions, device=device)
    keep = torch.tensor(keep, dtype=torch.long, device=device)
    if layers.supported(model):
        logits = layers.forward(model, ids, positions, step, keep)
    else:
        logits = model(input_ids=ids[None], position_ids=positions[None], cache=step, use_cache=True,
                       attention_mask=dict.fromkeys(loaded.layer_types, step), logits_to_keep=keep).logits[0]
    step.commit()
    return logits


class Batch:
    """The running rows, and the rows prefilling to join them; each row with its own cache, reserved from
    `memory` (service.inference.kvmemory.CacheMemory: unbounded when none is given), and the prefix cache
    their prompts share (service.inference.prefixes.PrefixStore; None: none); `speculation` is the
    speculate setting (service.inference.speculate: auto, off or ngram).

    `admit` brings requests in, `step` runs a pass, `evict` takes finished rows out. `pace` is the seconds
    a decode step takes per row, as the engine measured it (None: not yet), for the thinkings' deadlines."""

    def __init__(self, loaded, memory=None, prefixes=None, model="model", speculation="auto"):
        self.loaded, self.rows, self.speculation = loaded, [], speculation
        self.memory = memory or CacheMemory(loaded.layout, device=loaded.device)
        self.filling = Filling(prefixes, model)
        self.pace = None
        self.decoded = 0  # tokens the last pass gave its decode rows: one a row, more where drafts held

    def __len__(self):
        return len(self.rows)

    @staticmethod
    def row_tokens(request):
        """The most tokens one row of a request can hold: its prompt and every token it may generate."""
        return len(request.prompt_ids) + request.max_new_tokens

    @staticmethod
    def tokens_of(request):
        """The most tokens a request's rows hold in memory: the prompt once (its forks read the first row's),
        and every token each choice may generate."""
        return len(request.prompt_ids) + request.max_new_tokens * request.n

    def admit(self, handles):
        """Reserve each request's caches (one row per choice, the forks reading the first's prompt) and start
        prefilling them; `step` advances them. CacheFull (nothing admitted) when the caches do not fit."""
        rows = []
        try:
            for handle in handles:
                request, lead = handle.request, None
                for index in range(request.n):
                    shared = None if lead is None else lead.cache
                    cache = self.memory.allocate(self.row_tokens(request), shared, len(request.prompt_ids))
                    try:
                        row = Row(handle, self.loaded, cache, index)
                    except BaseException:
                        self.memory.release(cache)
                        raise
                    if lead is None:
                        lead = row
                        rows.append(row)
                    else:
                        lead.forks.append(row)
        except BaseException:
            self._free(rows)
            raise
        for row in rows:
            self.filling.add(row)

    @property
    def filling_rows(self):
        """Rows prefilling to join: each request's choices."""
        return self.filling.choices

    def fill(self, tokens):
        """A pass prefilling about `tokens` prompt tokens and decoding nothing; the number prefilled."""
        return self.step(tokens, decode=False)

    @torch.inference_mode()
    def join(self, handles):
        """Prefill the prompts of `handles`, take each one's first token, and join."""
        self.admit(handles)
        while self.filling:
            self.fill(sum(len(handle.request.prompt_ids) for handle in handles))

    @torch.inference_mode()
    def step(self, budget=0, decode=True):
        """One forward pass: every running row's next token (and a closing being forced), and up to `budget`
        prompt tokens of the rows prefilling (at least one while any is ready); a row whose prompt is then
        all in joins, its forks with it. The number of prompt tokens prefilled.

        A failure takes every row of the pass out and raises `PassError` naming them."""
        decoding, pieces = (self.rows if decode else []), []
        try:
            pieces = self.filling.plan(budget) if self.filling else []
            self._pass(decoding, pieces)
        except Exception as exc:
            failed = self._free(decoding + [row for row, _ in pieces])  # with the forks of those joining
            self.rows = [row for row in self.rows if row not in failed]
            self.filling.remove(failed)
            raise PassError(failed) from exc
        prefilled = sum(len(piece) for _, piece in pieces)
        metrics.PREFILL_TOKENS.labels(self.filling.model).inc(prefilled)
        return prefilled

    def _pass(self, decoding, pieces):
        self.decoded = 0
        drafts = speculate.drafts_per_row(self.speculation, len(decoding), bool(pieces))
        segments, keep, ends, guesses, packed = [], [], [], [], 0
        for row in decoding:
            guess = self._guess(row, drafts) if drafts and not (row.forcing or row.cache.shared) else []
            tokens = row.ids[-1:] + (row.forcing or guess)
            segments.append((row, tokens))
            if guess or (row.forcing and row.logprobs is not None):  # each token's logits (or log probability)
                keep += range(packed, packed + len(tokens))
            else:
                keep.append(packed + len(tokens) - 1)
            packed += len(tokens)
            ends.append(len(keep) - 1)
            guesses.append(guess)
        for row, piece in pieces:
            segments.append((row, piece))
            packed += len(piece)
            if row.filled + len(piece) == len(row.request.prompt_ids):  # its last prompt token: its logits
                keep.append(packed - 1)
        if not segments:
            return
        prefilling = sum(len(piece) for _, piece in pieces) >= FLOAT32_PIECE
        with self.loaded.prefill_mode() if prefilling else contextlib.nullcontext():
            logits = forward(self.loaded, segments, keep)
        for row, end in zip(decoding, ends):
            if row.forcing:  # each forced token's log probability from the logits that predicted it, if asked
                row.force(logprobs_of(logits[end - len(row.forcing):end], [row] * len(row.forcing), row.forcing)
                          if row.logprobs is not None else None)
        joining = self.filling.advanced(pieces)
        # What is chosen from: each decode row's last logits, or with a guess the logits at each of its tokens
        # (the drafts before each position assumed taken); then each joining lead's first, for it and its forks.
        at, rows, ahead = [], [], []
        for row, end, guess in zip(decoding, ends, guesses):
            for i in range(len(guess) + 1):
                at.append(end - len(guess) + i)
                rows.append(row)
                ahead.append(guess[:i])
        first = len(keep) - len(joining)
        for i, lead in enumerate(joining):
            for row in (lead, *lead.forks):
                at.append(first + i)
                rows.append(row)
                ahead.append(())
        if not rows:
            return
        chosen, failed = logits[at], {}
        tokens = choose(chosen, rows, ahead, failed)
        logprobs = logprobs_of(chosen, rows, tokens)
        tokens = tokens.tolist()
        # Rows are in the batch before their first token reaches a caller, so whoever sees that token
        # also sees the rows running.
        self.rows = self.rows + [row for lead in joining for row in (lead, *lead.forks)]
        taken, i = [], 0
        for row, guess in zip(decoding, guesses):
            drafted = len(guess)
            accepted = next((j for j in range(drafted) if tokens[i + j] != guess[j] or i + j in failed), drafted)
            taken.append((row, tokens[i:i + accepted + 1], logprobs[i:i + accepted + 1], drafted))
            if i + accepted in failed:  # a position the row reached (past a draft that held, or its first)
                row.fail(failed[i + accepted])
            i += drafted + 1
        taken += [(row, tokens[j:j + 1], logprobs[j:j + 1], 0) for j, row in enumerate(rows[i:], i)]
        for j, row in enumerate(rows[i:], i):
            if j in failed:
                row.fail(failed[j])
        before = sum(len(row.ids) for row in decoding)
        self._hand_out(taken)
        self.decoded = sum(len(row.ids) for row in decoding) - before
        for lead in joining:  # only now: a failure before takes the forks out with their lead (`step`)
            lead.forks = []

    def _guess(self, row, count):
        """Up to `count` tokens drafted to follow `row` (service.inference.speculate): no more than its answer
        and its cache have room for past its next token."""
        if row.drafts is None:
            row.drafts = speculate.Drafts(row.request.prompt_ids)
        cache = row.cache
        room = min(count, row.limit - len(row.ids) - 1, cache.capacity - cache.length - 1)
        return row.drafts.propose(row.ids, room)

    @property
    def context(self):
        """Tokens in the running rows' caches: what a decode step's attention reads."""
        return sum(cache.length for cache in (row.cache for row in self.rows) if cache is not None)  # read
        # by request threads too: a row that left meanwhile has no cache any more

    def evict(self):
        """Drop the rows that are done (or whose caller gave up), prefilling ones included; return them."""
        stopped = self.filling.drop_stopped()
        for row in self.rows:
            row.done = row.done or row.should_stop()
        gone = [row for row in self.rows if row.done]
        self.rows = [row for row in self.rows if not row.done]
        return self._free(stopped + gone)

    def empty(self):
        """Drop every running row (after an error); return them."""
        rows, self.rows = self.rows, []
        return self._free(rows)

    def close(self):
        """Drop every row, prefilling ones included (the engine stops); return them."""
        filling = list(self.filling)
        self.filling.remove(filling)
        return self.empty() + self._free(filling)

    def _free(self, rows):
        """Give back the caches of `rows` (and of their forks not yet joined), which have left; return them."""
        rows = [each for row in rows for each in (row, *row.forks)]
        for row in rows:
            row.forks = []
            if row.cache is not None:
                self.memory.release(row.cache)
                row.cache = None
        return rows

    def _hand_out(self, taken):
        """Give each row its tokens (decoding, stop strings, its caller's deltas), and end the thinkings that
        must end now. `taken` holds (row, its tokens, their log probabilities, tokens drafted for it): a row
        that speculated has its accepted drafts and the token chosen after them, of which it keeps those up
        to where it ends or its thinking must end (what it would have had without them), and its cache
        forgets the rest."""
        now = time.monotonic()
        model = taken[0][0].handle.model
        metrics.BATCH_SIZE.labels(model).observe(len(taken))
        for row, tokens, logprobs, drafted in taken:
            kept = 0
            for token, logprob in zip(tokens, logprobs):
                row.add(token, now, logprob)
                kept += 1
                reason = row.end_thinking(now, self.pace)
                if reason is not None:
                    metrics.THINKING_ENDED.labels(row.handle.model, reason).inc()
                if row.done or row.forcing:
                    break
            if drafted:
                metrics.SPECULATION_DRAFTED.labels(model).inc(drafted)
                metrics.SPECULATION_ACCEPTED.labels(model).observe(kept - 1)
                row.cache.rewind(drafted + 1 - kept)


class PassError(Exception):
    """A forward pass failed; `rows` are the rows it took out (their caches given back)."""

    def __init__(self, rows):
        super().__init__("a forward pass failed")
        self.rows = rows
