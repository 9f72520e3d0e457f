"""Continuous batching: one step loop over the model's KV cache.

The running batch holds one row per request: its row of the KV cache and of
the attention mask, its next input token and its position. Between decode
steps, new requests join (their prompts are prefilled together, left-padded,
and their cache rows are merged in) and finished rows leave (their cache rows
are dropped, then the padding columns no remaining row needs). A row ends at
an end token, its max_new_tokens, its deadline, its cancel flag or one of its
stop strings, and hands each token's text to its caller as it is decoded.
Every row samples with its own temperature and top_p, and a seeded row with
its own generator, so any requests can share a step.
"""

import time

import torch
from transformers import DynamicCache

from service.records import metrics

# Below this temperature, sampling is greedy decoding: dividing logits by a
# near-zero temperature overflows to inf/NaN (5e-324 did, found by hypothesis).
GREEDY_BELOW = 1e-3


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
        metrics.TTFT.observe(now - self.handle.submitted) if self.last is None \
            else metrics.INTER_TOKEN.observe(now - self.last)
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


class Batch:
    """The running rows and their shared KV cache; `join`, `step` and `evict` change it."""

    def __init__(self, loaded):
        self.loaded, self.rows = loaded, []
        self.empty()

    def __len__(self):
        return len(self.rows)

    @torch.inference_mode()
    def join(self, handles):
        """Prefill the prompts of `handles` together, take each one's first token, and join the batch."""
        rows = [Row(handle, self.loaded) for handle in handles]
        lengths = [len(row.request.prompt_ids) for row in rows]
        width = max(lengths)
        input_ids = torch.full((len(rows), width), self.loaded.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):  # left padding: every row's next token is in the last column
            input_ids[i, width - lengths[i]:] = torch.tensor(row.request.prompt_ids, dtype=torch.long)
            mask[i, width - lengths[i]:] = 1
        cache = DynamicCache(config=self.loaded.model.config)
        with self.loaded.prefill_mode():
            logits = self.loaded.model(input_ids=input_ids, attention_mask=mask, cache=cache, use_cache=True,
                                       position_ids=(mask.cumsum(-1) - 1).clamp_min(0), logits_to_keep=1).logits
        tokens = choose(logits[:, -1, :], rows)
        # Rows are in the batch before their first token reaches a caller, so whoever sees that token
        # also sees the rows running.
        self._merge(rows, cache, mask, tokens, torch.tensor(lengths, dtype=torch.long))
        self._hand_out(rows, tokens)

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
        """Drop the rows that are done (or whose caller gave up); return them."""
        for row in self.rows:
            row.done = row.done or row.should_stop()
        gone = [row for row in self.rows if row.done]
        if gone:
            keep = [i for i, row in enumerate(self.rows) if not row.done]
            self.rows = [self.rows[i] for i in keep]
            if not keep:
                self.empty()
            else:
                index = torch.tensor(keep, dtype=torch.long)
                self.cache.batch_select_indices(index)
                self.mask, self.tokens, self.positions = self.mask[index], self.tokens[index], self.positions[index]
                self._trim()
        return gone

    def empty(self):
        """Drop every row and the cache (after an error, or once none is left); return the rows."""
        rows, self.rows = self.rows, []
        self.cache = self.mask = self.tokens = self.positions = None
        return rows

    def _hand_out(self, rows, tokens):
        """Give each row its chosen token (decoding, stop strings, its caller's deltas)."""
        now = time.monotonic()
        metrics.BATCH_SIZE.observe(len(rows))
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


def _left_pad(tensor, columns):
    """`tensor` with `columns` zero columns before its sequence dimension (-2 for KV, -1 for a mask)."""
    if columns <= 0:
        return tensor
    dim = -1 if tensor.dim() == 2 else -2
    shape = list(tensor.shape)
    shape[dim] = columns
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def choose(logits, rows):
    """The next token of each row: argmax for greedy rows, a top-p sample for the others.

    A row whose sampling fails is marked failed (its caller gets the error) and the others go on."""
    tokens = logits.argmax(dim=-1)
    for i, row in enumerate(rows):
        if not row.greedy:
            try:
                tokens[i] = sample(logits[i].float(), row.request.temperature, row.request.top_p, row.generator)
            except Exception as exc:  # noqa: BLE001 - any failure of one row is that row's alone
                row.fail(exc)
    return tokens


def sample(logits, temperature, top_p, generator=None):
    """One token id drawn from softmax(logits / temperature), restricted to the top_p nucleus."""
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        probs, order = probs.sort(descending=True)
        keep = (probs.cumsum(-1) - probs) < top_p  # the smallest prefix reaching top_p
        keep[0] = True  # however small top_p is (below float32's smallest, it compares as 0)
        return int(order[torch.multinomial(probs * keep, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


def finish_reason(new_ids, eos_ids, max_new_tokens, handle):
    """Why generation ended: an end token, the length budget, the deadline, or a cancel."""
    if new_ids and new_ids[-1] in eos_ids:
        return "stop"
    if len(new_ids) >= max_new_tokens:
        return "length"
    return "cancelled" if handle.cancelled else "timeout"


def decode_step(decode, ids, prefix, read):
    """Incremental detokenisation: the new text since `read`, never a split character.

    Decodes a short window (from `prefix`) rather than the whole sequence, and
    holds text back while it ends in a replacement character (half a UTF-8 sequence).
    """
    before = decode(ids[prefix:read])
    after = decode(ids[prefix:])
    if len(after) > len(before) and not after.endswith("\ufffd"):
        return after[len(before):], read, len(ids)
    return "", prefix, read


class StopText:
    """Generated text, cut at the first stop string; releases only text that cannot start one."""

    def __init__(self, stops):
        self.stops = tuple(s for s in stops if s)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text, self.sent, self.hit = "", 0, False

    def feed(self, piece):
        """Add decoded text; return what may be sent now."""
        if self.hit:
            return ""
        self.text += piece
        start = max(0, self.sent - self.hold)
        found = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if found:
            self.text, self.hit = self.text[:min(found)], True
            return self._release(len(self.text))
        return self._release(max(self.sent, len(self.text) - self.hold))

    def flush(self):
        """What is left to send once generation has ended."""
        return self._release(len(self.text))

    def _release(self, upto):
        piece, self.sent = self.text[self.sent:upto], upto
        return piece
