"""One wave of batched generation: left-padded prompts through one model.generate call.

Every row has its own end: an end token, its max_new_tokens, its deadline,
its cancel flag, or one of its stop strings. A per-row stopping criterion
finishes rows independently (a finished row is padded until the wave ends),
and a streamer hands each row's tokens to its caller as they are decoded.
Rows share one sampling configuration (`wave_key`): greedy rows batch
together; sampled rows batch with the same temperature and top_p; a seeded
row runs alone so its seed is repeatable.
"""

import time

from service import metrics

# Below this temperature, sampling is greedy decoding: dividing logits by a
# near-zero temperature overflows to inf/NaN (5e-324 did, found by hypothesis).
GREEDY_BELOW = 1e-3


def wave_key(request):
    """Requests with equal keys may share a wave."""
    if request.temperature < GREEDY_BELOW:
        return ("greedy",)
    if request.seed is not None:
        return ("seeded", id(request))
    return ("sample", request.temperature, request.top_p)


class Row:
    """One request inside a wave: its tokens, its text and why it ended."""

    def __init__(self, handle, loaded):
        self.handle, self.loaded, self.request = handle, loaded, handle.request
        self.ids, self.prefix, self.read, self.last = [], 0, 0, None
        self.text = StopText(self.request.stop)
        self.done = False

    def add(self, token, now):
        """Take the row's next token: metrics, incremental decoding, stop strings, end token."""
        metrics.TTFT.observe(now - self.handle.submitted) if self.last is None \
            else metrics.INTER_TOKEN.observe(now - self.last)
        self.last = now
        self.ids.append(token)
        piece, self.prefix, self.read = decode_step(self.loaded.decode, self.ids, self.prefix, self.read)
        self.handle._emit(self.text.feed(piece))
        if token in self.loaded.eos_ids:
            self.done = True

    def should_stop(self):
        return (self.handle.cancelled or self.handle.expired() or self.text.hit
                or len(self.ids) >= self.request.max_new_tokens)

    def outcome(self):
        """(text, token ids, finish reason)."""
        if self.text.hit:
            return self.text.text, self.ids, "stop"
        reason = finish_reason(self.ids, self.loaded.eos_ids, self.request.max_new_tokens, self.handle)
        return self.loaded.decode(self.ids), self.ids, reason


def generate_wave(loaded, handles, set_running):
    """Generate for `handles` together; a (text, ids, finish reason) per handle, in order."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    rows = [Row(handle, loaded) for handle in handles]
    width = max(len(row.request.prompt_ids) for row in rows)
    input_ids = torch.full((len(rows), width), loaded.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):  # left padding: every row's next token is in the last column
        prompt = row.request.prompt_ids
        input_ids[i, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[i, width - len(prompt):] = 1

    class PerRow(StoppingCriteria):
        def __call__(self, ids, scores, **kwargs):
            for row in rows:
                row.done = row.done or row.should_stop()
            set_running(sum(not row.done for row in rows))
            return torch.tensor([row.done for row in rows], dtype=torch.bool, device=ids.device)

    class Stream(BaseStreamer):
        seen_prompt = False

        def put(self, value):
            if not self.seen_prompt:  # generate() first hands over the prompts
                self.seen_prompt = True
                return
            now, live = time.monotonic(), [row for row in rows if not row.done]
            metrics.BATCH_SIZE.observe(len(live))
            for row, token in zip(rows, value.reshape(-1).tolist()):
                if not row.done:
                    row.add(token, now)

        def end(self):
            for row in rows:
                row.handle._emit(row.text.flush())

    first = rows[0].request
    sampling = dict(do_sample=True, temperature=first.temperature, top_p=first.top_p) \
        if first.temperature >= GREEDY_BELOW else dict(do_sample=False)
    if first.seed is not None:
        torch.manual_seed(first.seed)  # a seeded request runs alone, and this thread runs one wave at a time
    set_running(len(rows))
    with torch.inference_mode():
        loaded.model.generate(input_ids=input_ids, attention_mask=mask, pad_token_id=loaded.pad_id,
                              max_new_tokens=max(row.request.max_new_tokens for row in rows),
                              stopping_criteria=StoppingCriteriaList([PerRow()]), streamer=Stream(), **sampling)
    return [row.outcome() for row in rows]


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
