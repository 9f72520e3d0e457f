"""Continuous batching: one step loop, each row with a KV cache of its own (service.inference.kvcache).

The running batch holds one row per choice of a request (service.inference.rows):
its cache, its tokens, its sampler, its thinking. Between decode steps, new
requests join and finished rows leave; a leaving row's cache is freed and no
other row's is touched. Joining requests form a `Filling` group: their
prompts are prefilled together in chunks of columns (each row's next tokens,
packed without padding into one forward pass), one chunk between two decode
steps, so a long prompt never stalls the running rows for more than one
chunk (and a row whose deadline or cancel comes mid-prefill leaves at the
next chunk). A request for n choices is prefilled once: its other rows fork
from its first (the prompt's cache copied) as the group's first tokens are
chosen and its rows join. A decode step packs every row's one token into one
forward pass, with the closing of a thinking ended early (service.inference.thinking)
fed in beside it; each row attends over its own cache. A row ends at an end
token, its max_new_tokens (or its answer's room after a forced closing), its
deadline, its cancel flag or one of its stop strings, and hands each token's
text to its caller as it is decoded.
"""

import time

import torch

from service.inference.decoding import choose, logprobs_of
from service.inference.kvcache import CacheMemory, Pass
from service.inference.rows import Row
from service.records import metrics

# Prompts prefilled as one group: the longest at most this times the shortest, plus the slack.
SIMILAR_LENGTH, SIMILAR_SLACK = 2, 64


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
        """Take out the rows whose caller gave up or whose deadline passed; return them (their forks with them:
        Batch._free)."""
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


def fork(lead):
    """Copy `lead`'s prefilled cache into the caches of the other choices of its request (`lead.forks`)."""
    length = lead.cache.length
    for row in lead.forks:
        row.cache.keys[:, :, :length].copy_(lead.cache.keys[:, :, :length])
        row.cache.values[:, :, :length].copy_(lead.cache.values[:, :, :length])
        row.cache.length = length


class Batch:
    """The running rows, and the groups prefilling to join them; each row with its own cache, reserved from
    `memory` (service.inference.kvcache.CacheMemory: unbounded when none is given).

    `admit` and `fill` bring requests in, `step` decodes, `evict` takes finished rows out. A request for n
    choices is prefilled once, by its first row; the others fork from it as it joins. `pace` is the seconds
    a decode step takes per row, as the engine measured it (None: not yet), for the thinkings' deadlines."""

    def __init__(self, loaded, memory=None):
        self.loaded, self.rows, self.filling = loaded, [], []
        self.memory = memory or CacheMemory(loaded.layout, device=loaded.device)
        self.pace = None

    def __len__(self):
        return len(self.rows)

    @staticmethod
    def row_tokens(request):
        """The most tokens one row of a request can hold: its prompt and every token it may generate."""
        return len(request.prompt_ids) + request.max_new_tokens

    @staticmethod
    def tokens_of(request):
        """The most tokens a request's rows can hold: a row's, per choice."""
        return Batch.row_tokens(request) * request.n

    def admit(self, handles):
        """Reserve each request's caches (one row per choice) and start prefilling them, in groups of similar
        prompt lengths (a short prompt neither waits for a long one nor is packed beside it for long); `fill`
        advances them. CacheFull (nothing admitted) when the caches do not fit."""
        rows = []
        try:
            for handle in sorted(handles, key=lambda h: len(h.request.prompt_ids)):
                request, lead = handle.request, None
                for index in range(request.n):
                    cache = self.memory.allocate(self.row_tokens(request))
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
        """Rows prefilling to join: each request's choices."""
        return sum(row.request.n for group in self.filling for row in group.rows)

    @torch.inference_mode()
    def fill(self, tokens):
        """Prefill about `tokens` prompt tokens of the group closest to done (a short prompt does not wait
        behind a long one); a group whose last chunk is in joins the batch. The number prefilled.

        A failure of its forward pass takes that group out and re-raises (`FillError` names its handles)."""
        group = min(self.filling, key=lambda g: g.remaining)
        try:
            done = group.advance(tokens)
            if group.logits is not None:
                self._join(group)  # (its rows are in the batch only once its first tokens are chosen)
                self.filling.remove(group)
        except Exception as exc:
            handles = [row.handle for row in group.rows]
            joined = [row for row in self.rows if row.handle in handles]  # a failure while joining
            self.rows = [row for row in self.rows if row.handle not in handles]
            self.filling.remove(group)
            self._free(list({id(row): row for row in group.rows + joined}.values()))
            raise FillError(handles) from exc
        return done

    @torch.inference_mode()
    def join(self, handles):
        """Prefill the prompts of `handles` each group in one pass, take each one's first token, and join."""
        self.admit(handles)
        while self.filling:
            self.fill(len(handles) * max(len(handle.request.prompt_ids) for handle in handles))

    def _join(self, group):
        rows = [row for lead in group.rows for row in (lead, *lead.forks)]
        logits = torch.stack([first for lead, first in zip(group.rows, group.logits)
                              for _ in range(1 + len(lead.forks))])
        for lead in group.rows:
            fork(lead)
        tokens = choose(logits, rows)
        # Rows are in the batch before their first token reaches a caller, so whoever sees that token
        # also sees the rows running.
        self.rows = self.rows + rows
        for lead in group.rows:
            lead.first, lead.forks = None, []
        self._hand_out(rows, tokens, logprobs_of(logits, rows, tokens))

    @torch.inference_mode()
    def step(self):
        """One decode step for every row: each row's last token (and a closing being forced), packed into one
        forward pass."""
        segments, keep, ends, packed = [], [], [], 0
        for row in self.rows:
            tokens = row.ids[-1:] + row.forcing
            segments.append((row, tokens))
            if row.forcing and row.logprobs is not None:  # the forced tokens' log probabilities too
                keep += range(packed, packed + len(tokens))
            else:
                keep.append(packed + len(tokens) - 1)
            packed += len(tokens)
            ends.append(len(keep) - 1)
        logits = forward(self.loaded, segments, keep)
        for row, end in zip(self.rows, ends):
            if row.forcing:  # each forced token's log probability from the logits that predicted it, if asked
                row.force(logprobs_of(logits[end - len(row.forcing):end], [row] * len(row.forcing), row.forcing)
                          if row.logprobs is not None else None)
        last = logits[ends]
        tokens = choose(last, self.rows)
        self._hand_out(self.rows, tokens, logprobs_of(last, self.rows, tokens))

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
        """Give back the caches of `rows` (and of their forks not yet joined), which have left; return them."""
        rows = [each for row in rows for each in (row, *row.forks)]
        for row in rows:
            row.forks = []
            if row.cache is not None:
                self.memory.release(row.cache)
                row.cache = None
        return rows

    def _hand_out(self, rows, tokens, logprobs):
        """Give each row its chosen token (decoding, stop strings, its caller's deltas), and end the thinkings
        that must end now."""
        now = time.monotonic()
        metrics.BATCH_SIZE.labels(rows[0].handle.model).observe(len(rows))
        for row, token, logprob in zip(rows, tokens.tolist(), logprobs):
            row.add(token, now, logprob)
            reason = row.end_thinking(now, self.pace)
            if reason is not None:
                metrics.THINKING_ENDED.labels(row.handle.model, reason).inc()


class FillError(Exception):
    """A prefill chunk failed; `handles` are the requests of the group it took out."""

    def __init__(self, handles):
        super().__init__("prefill failed")
        self.handles = handles
