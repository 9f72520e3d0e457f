"""Prompts on their way into the batch (service.inference.batching): what each step prefills of them.

A request's first row (its lead; its other choices fork from it as it joins)
comes here when it is admitted. What the prefix cache holds of its prompt
(service.inference.prefixes) is copied into its cache at once; if a row
still prefilling holds more of the same prefix, it waits for that row's
blocks instead of computing them again (a batch's lines with one preamble
admitted together prefill it once). Each step, `plan` hands the step up to
its budget of prompt tokens: the rows with the least left first, so a short
prompt never waits behind a long one, and the row that came first always a
quarter of the budget, so a long prompt never waits behind a stream of short
ones. A row whose last prompt token is in joins the batch with its logits.
"""

import logging

from service.inference.prefixes import BLOCK
from service.records import metrics

log = logging.getLogger("vibethinker.engine")

OLDEST_SHARE = 4  # the row that came first gets at least 1/OLDEST_SHARE of a step's prompt tokens


class Filling:
    """The rows prefilling their prompts, in the order they came, and the prefix cache they share (None: off)."""

    def __init__(self, store=None, model="model"):
        self.rows, self.store, self.model = [], store, model

    def __len__(self):
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    @property
    def choices(self):
        """Rows that will join: each request's choices."""
        return sum(row.request.n for row in self.rows)

    def add(self, row):
        """Start prefilling `row`'s prompt: from what the prefix cache holds of it, or once a row prefilling
        more of the same prefix has stored it."""
        if self.store is not None:
            row.blocks = self.store.keys(row.request.prompt_ids, row.request.prefix_scope)
        self.rows.append(row)
        self._follow(row, self.rows[:-1])

    def _follow(self, row, before):
        """Make `row` wait for the row of `before` (those that came before it) prefilling the most of its
        prefix past what the prefix cache holds; start it if there is none."""
        row.leader = None
        if self.store is not None:
            shared = [(common(row.blocks, other.blocks), other) for other in before]
            most, leader = max(shared, key=lambda pair: pair[0], default=(0, None))
            if most > self.store.found(row.blocks):
                row.leader, row.awaits = leader, most
                return
        self._start(row)

    def _start(self, row):
        if self.store is None:
            return
        try:
            row.cached = row.filled = self.store.load(row.blocks, row.cache)
        except Exception:  # noqa: BLE001 - the cache is an optimisation: the row prefills its whole prompt
            log.exception("reading the prefix cache failed", extra={"fields": {"model": self.model}})
            row.cached = row.filled = row.cache.length = 0
        row.stored = row.cached // BLOCK
        metrics.PREFIX_TOKENS.labels(self.model, "hit").inc(row.cached)
        metrics.PREFIX_TOKENS.labels(self.model, "miss").inc(len(row.request.prompt_ids) - row.cached)

    def _waits(self, row):
        """Whether a following row still waits: its leader is prefilling and has not yet stored, nor passed,
        the blocks it waits for (a block it found no room for is never stored)."""
        leader = row.leader
        return leader.stored < row.awaits and leader.filled < row.awaits * BLOCK

    def plan(self, budget):
        """(row, prompt tokens) to prefill in the next pass: `budget` tokens at most, at least one."""
        for index, row in enumerate(self.rows):
            if row.leader is None:
                continue
            if row.leader not in self.rows:  # it joined, or left: follow another that came before, if any
                self._follow(row, self.rows[:index])
            elif not self._waits(row):
                row.leader = None
                self._start(row)
        ready = [row for row in self.rows if row.leader is None]
        if not ready:
            return []
        first, order = ready[0], sorted(ready[1:], key=left)
        budget, pieces = max(1, budget), []
        if order and left(order[0]) < left(first):  # others go first, but it keeps its share
            share = max(1, budget // OLDEST_SHARE)
            pieces.append((first, first.request.prompt_ids[first.filled:first.filled + share]))
            budget -= len(pieces[0][1])
        else:
            order.insert(0, first)
        for row in order:
            if budget <= 0:
                break
            piece = row.request.prompt_ids[row.filled:row.filled + budget]
            pieces.append((row, piece))
            budget -= len(piece)
        return pieces

    def advanced(self, pieces):
        """The pass of `pieces` has run: count them in, store their rows' completed blocks in the prefix
        cache, and take out the rows whose prompts are all in (returned, in the order of `pieces`)."""
        done = []
        for row, piece in pieces:
            row.filled += len(piece)
            if self.store is not None and row.stored < len(row.blocks):
                row.stored = self.store.store(row.blocks, row.cache)
            if row.filled >= len(row.request.prompt_ids):
                done.append(row)
        self.rows = [row for row in self.rows if row not in done]
        return done

    def remove(self, rows):
        self.rows = [row for row in self.rows if row not in rows]

    def drop_stopped(self):
        """Take out the rows whose caller gave up or whose deadline passed; return them."""
        stopping = [row.should_stop() for row in self.rows]  # once: a deadline can pass between two looks
        gone = [row for row, stop in zip(self.rows, stopping) if stop]
        self.rows = [row for row, stop in zip(self.rows, stopping) if not stop]
        return gone


def left(row):
    """Prompt tokens a row has still to prefill."""
    return len(row.request.prompt_ids) - row.filled


def common(first, second):
    """How many keys two lists share from the first."""
    count = 0
    for a, b in zip(first, second):
        if a != b:
            break
        count += 1
    return count
