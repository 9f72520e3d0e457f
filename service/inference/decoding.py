"""From logits to text, one row at a time: each row's next token, its text as decoded, and why it ended.

The batch (service.inference.batching) calls `choose` after every forward
pass: argmax for a greedy row, a sample (top-k, min-p, top-p; with the row's
seeded draw for each token, if any) for the others, a failure ending that row
alone; a row with a repetition penalty has it applied first (`penalize`). Each
chosen token is detokenised incrementally (`decode_step`), cut at the
request's stop strings (`StopText`), and a finished row's `finish_reason`
says what ended it.
"""

import itertools

import torch

# Below this temperature, sampling is greedy decoding: dividing logits by a
# near-zero temperature overflows to inf/NaN (5e-324 did, found by hypothesis).
GREEDY_BELOW = 1e-3


def choose(logits, rows, ahead=None, failed=None):
    """The next token of each row: argmax for greedy rows, a sample for the others (or, for tests, the
    model's forced output: settings.forced_output); a row's repetition penalty applies before either.

    `ahead`, when given, holds for each logits row the drafted tokens assumed to come before it
    (service.inference.speculate): the token is chosen as it would be once they are the row's, at their
    index, with the same penalty and the same seeded draw.

    A row whose sampling fails is marked failed (its caller gets the error) and the others go on; with
    `failed` (a dict), the failure is put there by logits row instead, for the caller to decide (a position
    past a draft that did not hold is never reached)."""
    tokens = logits.argmax(dim=-1)
    for i, row in enumerate(rows):
        before = ahead[i] if ahead is not None else ()
        forced = row.loaded.forced  # tests only: the model's output is known in advance
        if forced:
            tokens[i] = forced[min(len(row.ids) + len(before), len(forced) - 1)]
            continue
        request = row.request
        penalty = request.repetition_penalty
        if row.greedy and penalty == 1.0:  # the common greedy row: the batch's argmax is its token
            continue
        try:
            scores = logits[i]
            if penalty != 1.0:
                scores = penalize(scores.float(), (request.prompt_ids, row.ids, before), penalty)
            if row.greedy:
                tokens[i] = scores.argmax()
            else:  # on the CPU: a row's seeded generator is a CPU one
                tokens[i] = sample(scores.float().cpu(), request.temperature, request.top_p,
                                   row.generator(len(row.ids) + len(before)), request.top_k, request.min_p)
        except Exception as exc:  # noqa: BLE001 - any failure of one row is that row's alone
            if failed is None:
                row.fail(exc)
            else:
                failed[i] = exc
    return tokens


def sample(logits, temperature, top_p, generator=None, top_k=0, min_p=0.0):
    """One token id drawn from softmax(logits / temperature), filtered as vLLM does: tokens below min_p times
    the top token's probability dropped, then all but the top_k most likely (0 or less: no limit), then all
    outside the top_p nucleus of what is left.

    The draw is over the vocabulary in id order, not in order of probability: two tokens almost equally
    likely that swap places when the logits move in their last bits (another batch shape, a drafted pass)
    would otherwise swap which of them a seeded draw gives; this way a draw changes only when it lands
    within the change itself."""
    probs = torch.softmax(logits / temperature, dim=-1)
    if min_p > 0.0:
        probs = torch.where(probs >= min_p * probs.max(), probs, 0.0)
    if 0 < top_k < probs.numel():
        top = probs.topk(top_k)
        probs = torch.zeros_like(probs).scatter_(0, top.indices, top.values)
    if top_p < 1.0:
        ordered, order = probs.sort(descending=True)
        ordered = ordered / ordered.sum()  # the nucleus is of what the filters above kept
        keep = (ordered.cumsum(-1) - ordered) < top_p  # the smallest prefix reaching top_p
        keep[0] = True  # however small top_p is (below float32's smallest, it compares as 0)
        probs = probs * torch.zeros_like(keep).scatter_(0, order, keep)
    return int(torch.multinomial(probs, 1, generator=generator))


def penalize(logits, seen, penalty):
    """`logits` with every token id of the `seen` id lists penalised as transformers and vLLM do: a positive
    logit divided by `penalty`, a negative one multiplied by it (a new tensor; `logits` is left as it is)."""
    ids = torch.tensor(list(itertools.chain.from_iterable(seen)), dtype=torch.long, device=logits.device)
    if not ids.numel():
        return logits
    scores = logits.gather(0, ids)  # an id seen twice is penalised once: both its writes below are one value
    return logits.scatter(0, ids, torch.where(scores > 0, scores / penalty, scores * penalty))


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


def logprobs_of(logits, rows, tokens):
    """Per row, (the chosen token's log probability, its top alternatives as (token, log probability)) when
    the row's request asked for log probabilities, else None: from the model's own distribution (before
    temperature and truncation), as OpenAI's are."""
    wanted = [i for i, row in enumerate(rows) if row.request.logprobs is not None]
    out = [None] * len(rows)
    if not wanted:
        return out
    logs = torch.log_softmax(logits[wanted].float(), dim=-1).cpu()
    for at, i in enumerate(wanted):
        top = rows[i].request.logprobs
        best = logs[at].topk(top) if top else None
        alternatives = () if best is None else tuple(zip(best.indices.tolist(), best.values.tolist()))
        out[i] = float(logs[at, int(tokens[i])]), alternatives
    return out
