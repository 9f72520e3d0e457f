"""Thinking that ends in time: a row's thinking, watched token by token, and ended early when it must.

A reasoning model thinks inside its tags (`<think>` ... `</think>`) before it
answers. A row's `Thinking` follows the row's text to know whether it is
thinking, counts the tokens it thinks, and says why the thinking must end
now, if it must:

- `budget`: it has thought its thinking budget (the request's
  `thinking_token_budget`, or its `reasoning_effort`'s);
- `length`: what is left of `max_new_tokens` would not fit the closing and
  an answer (`answer_tokens`, or half of what is left after the closing
  when the request is shorter than that);
- `deadline`: at the measured speed, the closing and that answer would not
  be done before the request's deadline;
- `loop`: its last tokens are one span repeated (`Loops`).

The batch (service.inference.batching) then feeds the model's closing (a
short sentence and the end tag: "budget forcing") into the row as forced
tokens, in one forward pass, and caps what follows at the answer's room.
"""

from dataclasses import dataclass

import numpy as np

REASONS = ("budget", "length", "deadline", "loop")


@dataclass(frozen=True)
class Tags:
    """How a model marks its thinking: the tags, and whether its chat template opens the thinking itself."""

    start: str = "<think>"
    end: str = "</think>"
    opened: bool = False


class Loops:
    """Whether a row's latest tokens are one span of at most `period` tokens repeated for `tokens` more.

    For each period p, the count of latest tokens each equal to the token p before it: a count of `tokens`
    means the last p + `tokens` tokens repeat one span of p. One comparison of the new token with the last
    `period` ones per token."""

    def __init__(self, period, tokens):
        self.tokens = tokens
        self.recent = np.full(period, -1, dtype=np.int64)  # the last `period` tokens, the latest first
        self.runs = np.zeros(period, dtype=np.int64)

    def add(self, token):
        """Take the next token; True when the row is looping."""
        same = self.recent == token
        self.runs = np.where(same, self.runs + 1, 0)
        self.recent[1:] = self.recent[:-1].copy()
        self.recent[0] = token
        return bool(self.runs.max() >= self.tokens)


class Thinking:
    """One row's thinking: whether it is in it, the tokens it took, and whether it must end now."""

    def __init__(self, tags, budget=None, answer_tokens=None, closing=(), loops=None):
        self.tags, self.budget, self.answer_tokens, self.closing = tags, budget, answer_tokens, tuple(closing)
        self.state = "thinking" if tags.opened else "before"
        if not tags.end:
            self.state = "answering"  # a model that does not think
        self.thought = 0  # tokens generated while thinking (the one that completed the end tag included)
        self.loops, self.looping = loops, False
        self.ended = None  # why the thinking was ended early, once it was
        self.limit = None  # the most tokens the row may generate once its thinking was ended early
        self._seen = 0  # characters of the text looked at for the end tag

    @property
    def thinking(self):
        return self.state == "thinking"

    def follow(self, token, text):
        """Take the row's next token and its whole text so far (`text`: as generated, stop strings cut); True when
        the token is the thinking's (its tags included), None while that is not known yet (the text so far could
        be the start tag's beginning: the next token that tells says for these too)."""
        if self.state == "before":
            self.thought += 1  # the start tag's tokens are the thinking's, as reasoning_tokens counts them
            lead = text.lstrip()
            if self.tags.start.startswith(lead):
                return None  # nothing yet, or part of the start tag
            self.state = "thinking" if lead.startswith(self.tags.start) else "answering"
            self._seen = len(text) - len(lead) + len(self.tags.start) if self.thinking else len(text)
            if not self.thinking:
                self.thought = 0
                return False
        elif self.state == "thinking":
            self.thought += 1
        else:
            return False
        at = text.find(self.tags.end, max(self._seen - len(self.tags.end), 0))
        self._seen = len(text)
        if at >= 0:
            self.state = "answering"
        elif self.loops is not None and self.loops.add(token):
            self.looping = True
        return True

    def room(self, max_new_tokens):
        """The answer's room after a forced closing in a row of `max_new_tokens`: answer_tokens, or half of
        what is left after the closing when that is less."""
        return min(self.answer_tokens, (max_new_tokens - len(self.closing)) // 2)

    def must_end(self, generated, max_new_tokens, seconds_left=None, seconds_per_token=None):
        """Why the thinking must end now (one of REASONS), or None: `generated` tokens so far; the deadline's
        `seconds_left` at `seconds_per_token` (None: not measured)."""
        if self.state != "thinking" or self.answer_tokens is None or not self.closing:
            return None
        room = self.room(max_new_tokens)
        if room < 1 or generated + len(self.closing) + 1 > max_new_tokens:
            return None  # no room for a closing and an answer: the thinking goes on to the length
        if self.looping:
            return "loop"
        if self.budget is not None and self.thought >= self.budget:
            return "budget"
        if generated + len(self.closing) + room >= max_new_tokens:
            return "length"
        if seconds_per_token is not None and seconds_left is not None \
                and (1 + room) * seconds_per_token >= seconds_left:  # the closing goes in one pass
            return "deadline"
        return None

    def end(self, reason, generated, max_new_tokens):
        """The thinking is ended for `reason`: the tokens to force, and the row's limit set to the answer's
        room after them."""
        self.ended, self.state = reason, "answering"
        self.thought += len(self.closing)  # the closing and its end tag are thinking, as a model's own are
        self.limit = min(max_new_tokens, generated + len(self.closing) + self.room(max_new_tokens))
        return list(self.closing)
