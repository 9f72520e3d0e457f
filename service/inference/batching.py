"""Continuous batching: one step loop, each row with a KV cache of its own (service.inference.kvcache).

The running batch holds one row per request: its cache, its tokens, its
sampler. Between decode steps, new requests join and finished rows leave; a
leaving row's cache is freed and no other row's is touched. Joining requests
form a `Filling` group: their prompts are prefilled together in chunks of
columns (each row's next tokens, packed without padding into one forward
pass), one chunk between two decode steps, so a long prompt never stalls the
running rows for more than one chunk (and a row whose deadline or cancel
comes mid-prefill leaves at the next chunk). Once its last chunk is in, the
group's first tokens are chosen and its rows join. A decode step packs every
row's one token into one forward pass; each row attends over its own cache.
A row ends at an end token, its max_new_tokens, its deadline, its cancel flag
or one of its stop strings, and hands each token's text to its caller as it
is decoded. Every row samples with its own temperature and top_p, and a
seeded row with its own generator (service.inference.decoding), so any
requests can share a step.
"""

import time

import torch

from service.inference.decoding import GREEDY_BELOW, StopText, choose, decode_step, finish_reason
from service.inference.kvcache import CacheMemory, Pass
from service.records import metrics

# Prompts prefilled as one group: the longest at most this times the shortest, plus the slack.
SIMILAR_LENGTH, SIMILAR_SLACK = 2, 64


class Row:
    """One request inside the batch: its tokens, its text, its sampler and why it ended."""

    def __init__(self, handle, loaded, cache):
        self.handle, self.loaded, self.request = handle, loaded, handle.request
        self.cache = cache  # its keys and values (service.inference.kvcache.RowCache), until it leaves
        self.first = None  # the logits of its prompt's last token, once prefilled
        self.ids, self.prefix, self.read, self.last = [], 0, 0, None
        self.text = StopText(self.request.stop)
        self.done, self.error = False, None
        self.greedy = self.request.temperature < GREEDY_BELOW
        self.generator = None
        if not self.greedy and self.request.seed is not None:
            self.generator = torch.Generator().manual_seed(self.request.seed)

    def fail(self, error):
        """End this row with `error` (its caller gets it); the batch goes on without it."""
        self.error, self.done = error, True

    def add(self, token, now):
        """Take the row's next token: metrics, incremental decoding, stop strings, end token."""
        if self.error is not None:
            return
        model = self.handle.model
        metrics.TTFT.labels(model).observe(now - self.handle.submitted) if self.last is None \
            else metrics.INTER_TOKEN.labels(model).observe(now - self.last)
        self.last = now
        self.ids.append(token)
        piece, self.prefix, self.read = decode_step(self.loaded.decode, self.ids, self.prefix, self.read)
        self.handle._emit(self.text.feed(piece))
        self.done = token in self.loaded.eos_ids or self.should_stop()

    def should_stop(self):
        return (self.handle.cancelled or self.handle.expired() or self.text.hit
                or len(self.ids) >= self.request.max_new_tokens)

    def outcome(self):
        """(text, token ids, finish reason), once the row has left the batch."""
        self.handle._emit(self.text.flush())
        if self.text.hit:
            return self.text.text, self.ids, "stop"
        reason = finish_reason(self.ids, self.loaded.eos_ids, self.request.max_new_tokens, self.handle)
        return self.loaded.decode(self.ids), self.ids, reason


class Filling:
    """Rows whose prompts are being prefilled together, a chunk of columns at a time (no padding: a row whose
    prompt is shorter adds nothing once it is in)."""

    def __init__(self, rows, loaded):
        self.loaded, self.rows = loaded, rows
        self.width = max(len(row.request.prompt_ids) for row in rows)
        self.done = 0  # columns prefilled so far
        self.logits = None  # each row's last prompt token's logits, once every column is in

    def __len__(self):
        return len(self.rows)

    @property
    def remaining(self):
        """Prompt tokens still to prefill."""
        return sum(max(0, len(row.request.prompt_ids) - self.done) for row in self.rows)

    def advance(self, tokens):
        """Prefill about `tokens` more prompt tokens (at least one column); the number prefilled."""
        columns = max(1, tokens // len(self.rows))
        start, end = self.done, min(self.width, self.done + columns)
        segments, keep, ending, packed = [], [], [], 0
        for row in self.rows:
            prompt = row.request.prompt_ids
            piece = prompt[start:end]
            if piece:
                segments.append((row, piece))
                packed += len(piece)
                if len(prompt) <= end:  # its last prompt token is in this chunk
                    keep.append(packed - 1)
                    ending.append(row)
        if segments:  # none when the rows still in the group all have their prompts in already
            with self.loaded.prefill_mode():
                logits = forward(self.loaded, segments, keep)
            for row, row_logits in zip(ending, logits):
                row.first = row_logits
        self.done = max(self.done, end)
        if self.done >= self.width:
            self.logits = torch.stack([row.first for row in self.rows])
        return packed

    def drop_stopped(self):
        """Take out the rows whose caller gave up or whose deadline passed; return them."""
        stopping = [row.should_stop() for row in self.rows]  # once: a deadline can pass between two looks
        self.rows, gone = ([row for row, stop in zip(self.rows, stopping) if not stop],
                           [row for row, stop in zip(self.rows, stopping) if stop])
        if self.rows:  # the longest prompt may have left
            self.width = max(len(row.request.prompt_ids) for row in self.rows)
        return gone


def forward(loaded, segments, keep):
    """One forward pass of `segments` (row, token ids), packed into one sequence, each row's tokens at its
    own positions and attending over its own cache: the logits at the packed positions `keep`."""
    ids, positions = [], []
    for row, tokens in segments:
        ids += tokens
        positions += range(row.cache.length, row.cache.length + len(tokens))
    step = Pass([(row.cache, len(tokens)) for row, tokens in segments])
    device = loaded.device
    logits = loaded.model(input_ids=torch.tensor([ids], device=device),
                          position_ids=torch.tensor([positions], device=device),
                          attention_mask=dict.fromkeys(loaded.layer_types, step), cache=step, use_cache=True,
                          logits_to_keep=torch.tensor(keep, dtype=torch.long, device=device)).logits
    step.commit()
    return logits[0]


class Batch:
    """The running rows, and the groups prefilling to join them; each row with its own cache, reserved from
    `memory` (service.inference.kvcache.CacheMemory: unbounded when none is given).

    `admit` and `fill` bring requests in, `step` decodes, `evict` takes finished rows out."""

    def __init__(self, loaded, memory=None):
        self.loaded, self.rows, self.filling = loaded, [], []
        self.memory = memory or CacheMemory(loaded.layout, device=loaded.device)

    def __len__(self):
        return len(self.rows)

    @staticmethod
    def tokens_of(request):
        """The most tokens a request's row can hold: its prompt and every token it may generate."""
        return len(request.prompt_ids) + request.max_new_tokens

    def admit(self, handles):
        """Reserve each request's cache and start prefilling them, in groups of similar prompt lengths (a
        short prompt neither waits for a long one nor is packed beside it for long); `fill` advances them.
        CacheFull (nothing admitted) when the caches do not fit."""
        rows = []
        try:
            for handle in sorted(handles, key=lambda h: len(h.request.prompt_ids)):
                cache = self.memory.allocate(self.tokens_of(handle.request))
                try:
                    rows.append(Row(handle, self.loaded, cache))
                except BaseException:
                    self.memory.release(cache)
                    raise
        except BaseException:
            self._free(rows)
            raise
        group = []
        for row in rows:
            length = len(row.request.prompt_ids)
            if group and length > SIMILAR_LENGTH * len(group[0].request.prompt_ids) + SIMILAR_SLACK:
                self.filling.append(Filling(group, self.loaded))
                group = []
            group.append(row)
        if group:
            self.filling.append(Filling(group, self.loaded))

    @property
    def filling_rows(self):
        return sum(len(group) for group in self.filling)

    @torch.inference_mode()
    def fill(self, tokens):
        """Prefill about `tokens` prompt tokens of the group closest to done (a short prompt does not wait
        behind a long one); a group whose last chunk is in joins the batch. The number prefilled.

        A failure of its forward pass takes that group out and re-raises (`FillError` names its handles)."""
        group = min(self.filling, key=lambda g: g.remaining)
        try:
            done = group.advance(tokens)
        except Exception as exc:
            self.filling.remove(group)
            self._free(group.rows)
            raise FillError([row.handle for row in group.rows]) from exc
        if group.logits is not None:
            self.filling.remove(group)
            self._join(group)
        return done

    @torch.inference_mode()
    def join(self, handles):
        """Prefill the prompts of `handles` each group in one pass, take each one's first token, and join."""
        self.admit(handles)
        while self.filling:
            self.fill(len(handles) * max(len(handle.request.prompt_ids) for handle in handles))

    def _join(self, group):
        tokens = choose(group.logits, group.rows)
        for row in group.rows:
            row.first = None
        # Rows are in the batch before their first token reaches a caller, so whoever sees that token
        # also sees the rows running.
        self.rows = self.rows + group.rows
        self._hand_out(group.rows, tokens)

    @torch.inference_mode()
    def step(self):
        """One decode step for every row: each row's last token, packed into one forward pass."""
        logits = forward(self.loaded, [(row, row.ids[-1:]) for row in self.rows], list(range(len(self.rows))))
        self._hand_out(self.rows, choose(logits, self.rows))

    @property
    def context(self):
        """Tokens in the running rows' caches: what a decode step's attention reads."""
        return sum(cache.length for cache in (row.cache for row in self.rows) if cache is not None)  # read
        # by request threads too: a row that left meanwhile has no cache any more

    def evict(self):
        """Drop the rows that are done (or whose caller gave up), prefilling ones included; return them."""
        stopped = [row for group in self.filling for row in group.drop_stopped()]
        self.filling = [group for group in self.filling if group.rows]
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
        filling, self.filling = [row for group in self.filling for row in group.rows], []
        return self.empty() + self._free(filling)

    def _free(self, rows):
        """Give back the caches of `rows`, which have left; return them."""
        for row in rows:
            if row.cache is not None:
                self.memory.release(row.cache)
                row.cache = None
        return rows

    def _hand_out(self, rows, tokens):
        """Give each row its chosen token (decoding, stop strings, its caller's deltas)."""
        now = time.monotonic()
        metrics.BATCH_SIZE.labels(rows[0].handle.model).observe(len(rows))
        for row, token in zip(rows, tokens.tolist()):
            row.add(token, now)


class FillError(Exception):
    """A prefill chunk failed; `handles` are the requests of the group it took out."""

    def __init__(self, handles):
        super().__init__("prefill failed")
        self.handles = handles
