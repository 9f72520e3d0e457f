"""Prompt-lookup speculation: a row's next tokens guessed from its own prompt and output, checked in one pass.

At batch 1 a decode step reads every weight once for one token; reading them
for four tokens costs little more (measured at real size, int8: 3 drafted
tokens verified at once cost 1.13–1.16× one step). Reasoning repeats itself:
a proof restates what it derived, code repeats names, an answer quotes the
question. So a row's last few tokens, found earlier in its prompt or output,
are likely followed by what followed them there (prompt lookup decoding,
Saxena 2023; vLLM's `ngram` speculator and transformers' `prompt_lookup_num_tokens`).

`Drafts` keeps an index of a row's n-grams (sizes `SIZES`, longest tried
first) to the latest place each ended, updated as tokens come, so a guess
costs a few dictionary reads however deep the row is. The batch
(service.inference.batching) feeds the row's last token and its drafts in
one pass, chooses a token at each position as it would have without them
(service.inference.decoding.choose, sampling keyed on the seed and the
token's index), and keeps the drafts up to the first that differs from what
was chosen, plus the token chosen there: the output is the one without
speculation, only sooner (exactly, where a token's numbers do not depend on
the shape of the pass: the float32 mode, and int8 on the own kernel; in the
bfloat16 mode and int8 on fbgemm, as closely as batching keeps them).

`drafts_per_row` says when it pays: `ngram` always, `auto` while the pass
stays small (a row drafting 3, two rows 1 each, and no prompt being
prefilled), where a step's time is the weights' bandwidth and extra tokens
ride along almost free; a busy batch's step is already compute, and drafts
would only add to it.
"""

# The n-gram sizes looked up, longest first: a 3-token match predicts better, a 2-token one more often.
SIZES = (3, 2)
# Drafted tokens per row and step: what one step verifies for little more than its own time (see above).
DRAFT_TOKENS = 3
# `auto` keeps a speculating pass within this many tokens, where a step still costs about one row's: the own
# int8 kernel's linears at real size (bench/kernel.py) took 58 ms for 1 row, 61 for 4, 73 for 8. So one row
# drafts 3, two rows 1 each, and three or more none; nor does a pass that prefills.
AUTO_TOKENS = 4


def drafts_per_row(mode, rows, prefilling):
    """How many tokens each of a pass's `rows` decode rows drafts (0: none), the pass prefilling prompt
    tokens too if `prefilling`: `ngram` always DRAFT_TOKENS; `auto` what keeps the pass within AUTO_TOKENS."""
    if mode == "ngram":
        return DRAFT_TOKENS
    if mode != "auto" or prefilling or not rows:
        return 0
    return max(0, min(DRAFT_TOKENS, (AUTO_TOKENS - rows) // rows))


class Drafts:
    """The n-gram index of one row's tokens: its prompt, then its output as it grows (`propose` catches up)."""

    def __init__(self, prompt):
        self.tokens, self.start = list(prompt), len(prompt)
        self.where = {}  # n-gram (tuple) -> the index of its last token, the latest place it ended
        self.indexed = 0  # n-grams ending before this index are in `where`

    def propose(self, output, count=DRAFT_TOKENS):
        """Up to `count` tokens guessed to follow the row's prompt and `output` (its tokens so far): what
        followed the latest earlier place its last n-gram ended, the longest size found first; [] if none."""
        tokens, where = self.tokens, self.where
        tokens += output[len(tokens) - self.start:]
        last = len(tokens) - 1
        for end in range(self.indexed, last):  # every n-gram ending before the last token; the last one is
            for size in SIZES:  # what is looked up, and would only find itself
                if end + 1 >= size:
                    where[tuple(tokens[end + 1 - size:end + 1])] = end
        self.indexed = max(self.indexed, last)
        if count <= 0:
            return []
        for size in SIZES:
            if last + 1 >= size:
                end = where.get(tuple(tokens[last + 1 - size:]))
                if end is not None:
                    return tokens[end + 1:end + 1 + count]
        return []
