"""Continuous batching: one step loop over the model's KV cache.

The running batch holds one row per request: its row of the KV cache and of
the attention mask, its next input token and its position. Between decode
steps, new requests join and finished rows leave (their cache rows are
dropped, then the padding columns no remaining row needs). Joining requests
form a `Filling` group: their prompts, left-padded, are prefilled together in
chunks of columns, one chunk between two decode steps, so a long prompt never
stalls the running rows for more than one chunk (and a row whose deadline or
cancel comes mid-prefill leaves at the next chunk). Once its last chunk is
in, the group's first tokens are chosen and its cache rows merged in. A row
ends at an end token, its max_new_tokens, its deadline, its cancel flag or one
of its stop strings, and hands each token's text to its caller as it is decoded.
Every row samples with its own temperature and top_p, and a seeded row with
its own generator (service.inference.decoding), so any requests can share a step.
"""

import time

import torch
from transformers import DynamicCache

from service.inference.decoding import GREEDY_BELOW, StopText, choose, decode_step, finish_reason
from service.records import metrics

# Prompts prefilled as one group: the longest at most this times the shortest, plus the slack.
SIMILAR_LENGTH, SIMILAR_SLACK = 2, 64


class Row:
    """One request inside the batch: its tokens, its text, its sampler and why it ended."""

    def __init__(self, handle, loaded):
        self.handle, self.loaded, self.request = handle, loaded, handle.request
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
    """Requests whose prompts are being prefilled together, left-padded, a chunk of columns at a time."""

    def __init__(self, handles, loaded):
        self.loaded = loaded
        self.rows = [Row(handle, loaded) for handle in handles]
        self.lengths = torch.tensor([len(row.request.prompt_ids) for row in self.rows], dtype=torch.long)
        width = int(self.lengths.max())
        self.input_ids = torch.full((len(self.rows), width), loaded.pad_id, dtype=torch.long)
        self.mask = torch.zeros((len(self.rows), width), dtype=torch.long)
        for i, row in enumerate(self.rows):  # left padding: every row's next token is in the last column
            self.input_ids[i, width - len(row.request.prompt_ids):] = torch.tensor(row.request.prompt_ids)
            self.mask[i, width - len(row.request.prompt_ids):] = 1
        self.positions = (self.mask.cumsum(-1) - 1).clamp_min(0)
        device = loaded.device
        self.input_ids, self.mask = self.input_ids.to(device), self.mask.to(device)
        self.positions, self.lengths = self.positions.to(device), self.lengths.to(device)
        self.cache = DynamicCache(config=loaded.model.config)
        self.done = 0  # columns prefilled so far
        self.logits = None  # the last column's logits, once every column is in

    def __len__(self):
        return len(self.rows)

    @property
    def remaining(self):
        """Prompt tokens (padding included) still to prefill."""
        return len(self.rows) * (self.input_ids.shape[1] - self.done)

    def advance(self, tokens):
        """Prefill about `tokens` more prompt tokens (at least one column); the number prefilled."""
        columns = max(1, tokens // len(self.rows))
        start, end = self.done, min(self.input_ids.shape[1], self.done + columns)
        with self.loaded.prefill_mode():
            logits = self.loaded.model(
                input_ids=self.input_ids[:, start:end], attention_mask=self.mask[:, :end], cache=self.cache,
                position_ids=self.positions[:, start:end], use_cache=True, logits_to_keep=1).logits
        self.done = end
        if end == self.input_ids.shape[1]:
            self.logits = logits[:, -1, :]
        return len(self.rows) * (end - start)

    def drop_stopped(self):
        """Take out the rows whose caller gave up or whose deadline passed; return them."""
        stopping = [row.should_stop() for row in self.rows]  # once: a deadline can pass between two looks
        gone = [row for row, stop in zip(self.rows, stopping) if stop]
        if gone:
            kept = [i for i, stop in enumerate(stopping) if not stop]
            keep = torch.tensor(kept, dtype=torch.long, device=self.loaded.device)
            self.rows = [self.rows[i] for i in kept]
            if self.rows:
                self.cache.batch_select_indices(keep)
                self.input_ids, self.mask = self.input_ids[keep], self.mask[keep]
                self.positions, self.lengths = self.positions[keep], self.lengths[keep]
        return gone


class Batch:
    """The running rows and their shared KV cache, and the groups prefilling to join them.

    `admit` and `fill` bring requests in, `step` decodes, `evict` takes finished rows out."""

    def __init__(self, loaded):
        self.loaded, self.rows, self.filling = loaded, [], []
        self.empty()

    def __len__(self):
        return len(self.rows)

    def admit(self, handles):
        """Start prefilling `handles`, in groups of similar prompt lengths (a short prompt neither waits for a
        long one nor pays its padding); `fill` advances them."""
        group = []
        for handle in sorted(handles, key=lambda h: len(h.request.prompt_ids)):
            length = len(handle.request.prompt_ids)
            if group and length > SIMILAR_LENGTH * len(group[0].request.prompt_ids) + SIMILAR_SLACK:
                self.filling.append(Filling(group, self.loaded))
                group = []
            group.append(handle)
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
            raise FillError([row.handle for row in group.rows]) from exc
        if group.logits is not None:
            self.filling.remove(group)
            self._join(group)
        return done

    @torch.inference_mode()
    def join(self, handles):
        """Prefill the prompts of `handles` together in one pass, take each one's first token, and join."""
        group = Filling(handles, self.loaded)
        group.advance(group.remaining)
        self._join(group)

    def _join(self, group):
        tokens = choose(group.logits, group.rows)
        # Rows are in the batch before their first token reaches a caller, so whoever sees that token
        # also sees the rows running.
        self._merge(group.rows, group.cache, group.mask, tokens, group.lengths)
        self._hand_out(group.rows, tokens)

    @torch.inference_mode()
    def step(self):
        """One decode step for every row."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        logits = self.loaded.model(input_ids=self.tokens[:, None], attention_mask=self.mask, cache=self.cache,
                                   position_ids=self.positions[:, None], use_cache=True).logits
        self.positions += 1
        self.tokens = choose(logits[:, -1, :], self.rows)
        self._hand_out(self.rows, self.tokens)

    def evict(self):
        """Drop the rows that are done (or whose caller gave up), prefilling ones included; return them."""
        stopped = [row for group in self.filling for row in group.drop_stopped()]
        self.filling = [group for group in self.filling if group.rows]
        return stopped + self._evict_running()

    def _evict_running(self):
        for row in self.rows:
            row.done = row.done or row.should_stop()
        gone = [row for row in self.rows if row.done]
        if gone:
            keep = [i for i, row in enumerate(self.rows) if not row.done]
            self.rows = [self.rows[i] for i in keep]
            if not keep:
                self.empty()
            else:
                index = torch.tensor(keep, dtype=torch.long, device=self.loaded.device)
                self.cache.batch_select_indices(index)
                self.mask, self.tokens, self.positions = self.mask[index], self.tokens[index], self.positions[index]
                self._trim()
        return gone

    def empty(self):
        """Drop every running row and the cache (after an error, or once none is left); return the rows."""
        rows, self.rows = self.rows, []
        self.cache = self.mask = self.tokens = self.positions = None
        return rows

    def _hand_out(self, rows, tokens):
        """Give each row its chosen token (decoding, stop strings, its caller's deltas)."""
        now = time.monotonic()
        metrics.BATCH_SIZE.labels(rows[0].handle.model).observe(len(rows))
        for row, token in zip(rows, tokens.tolist()):
            row.add(token, now)

    def _merge(self, rows, cache, mask, tokens, positions):
        if not self.rows:
            self.rows, self.cache, self.mask, self.tokens, self.positions = rows, cache, mask, tokens, positions
            return
        old, new = self.mask.shape[1], mask.shape[1]
        for ours, theirs in zip(self.cache.layers, cache.layers):  # left-pad the shorter, then stack rows
            ours.keys = torch.cat([_left_pad(ours.keys, new - old), _left_pad(theirs.keys, old - new)])
            ours.values = torch.cat([_left_pad(ours.values, new - old), _left_pad(theirs.values, old - new)])
        self.mask = torch.cat([_left_pad(self.mask, new - old), _left_pad(mask, old - new)])
        self.rows = self.rows + rows
        self.tokens = torch.cat([self.tokens, tokens])
        self.positions = torch.cat([self.positions, positions])

    def _trim(self):
        """Drop the leading columns that are padding in every remaining row."""
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        if start:
            self.mask = self.mask[:, start:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., start:, :], layer.values[..., start:, :]


class FillError(Exception):
    """A prefill chunk failed; `handles` are the requests of the group it took out."""

    def __init__(self, handles):
        super().__init__("prefill failed")
        self.handles = handles


def _left_pad(tensor, columns):
    """`tensor` with `columns` zero columns before its sequence dimension (-2 for KV, -1 for a mask)."""
    if columns <= 0:
        return tensor
    dim = -1 if tensor.dim() == 2 else -2
    shape = list(tensor.shape)
    shape[dim] = columns
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
