"""A streamed chat answer: server-sent events with an open / events / close life.

- `open` admits and queues before the response starts, so a refusal keeps its
  own status (429, 503) rather than becoming an event.
- `events` yields `data: {chat.completion.chunk}` per decoded piece (the
  thinking as `delta.reasoning_content` and `delta.reasoning`, the answer as
  `delta.content`, a tag never cut across two: service.serving.reasoning),
  keep-alive comments while a request waits (they also notice a gone
  client), each choice's last chunk as it ends, with its finish reason (and
  the `thinking_ended_early`, `final_answer`, `correct` extensions), the
  `vote` and a usage chunk when asked (with the phases so far as
  `server_timing`, where they are shown), then `data: [DONE]`. A request for n
  choices interleaves them, each chunk with its choice's `index`.
  A deadline cut ends with `data: {"error": {...}}` in the one error shape.
- `close` runs however the stream ends (finished, cut, or the client gone,
  499): it cancels the generation, settles the lease and the usage from the
  result (service.serving.pipeline.settle, as a whole answer does), and writes
  the usage row and log line.

A cache hit is replayed: the same events, the answer's text in pieces of
about REPLAY_CHARS, with no admission, no engine and no budget (its usage
row is written as a plain request's, after the response).
"""

import json
import logging
import time
import uuid

from flask import Response, stream_with_context

from service.api import accounting
from service.api.client import CLIENT_GONE
from service.errors import body_of, error_body
from service.serving import pipeline, reasoning, shapes
from service.state import state

log = logging.getLogger("vibethinker.streaming")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
REPLAY_CHARS = 16  # a replayed answer's pieces: about a few tokens each, cut after a space where one is near


class ChatStream:
    """One streamed answer, from admission to its usage row."""

    def __init__(self, job, include_usage=False, hit=None):
        self.job, self.include_usage = job, include_usage  # a prepared service.serving.job.Job
        self.hit = hit  # the cached answer to replay, if any
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        self.record, self.state = accounting.current(), state()
        self.handle = self.result = None
        self.status = 200
        raw = job.params.reasoning_format == "none"
        self.splitters = [reasoning.Splitter(job.served.markers, raw=raw) for _ in range(job.params.n)]
        self.finals = [None] * job.params.n  # each choice's final answer, once it ended (the vote's)

    def open(self):
        """Admit and queue now; refusals raise with their own status. A replay needs neither."""
        if self.hit is not None:
            self.result = self.hit
            return self
        self.handle = pipeline.start(self.state, self.job, self.state.settings.stream_deadline_s)
        self.record.streamed = True  # close() writes the row, when the stream ends
        return self

    def response(self):
        """The SSE response; it closes the stream however it ends."""
        return Response(stream_with_context(self._lifetime()), mimetype="text/event-stream", headers=SSE_HEADERS)

    def _lifetime(self):
        if self.hit is not None:
            yield from self.replay()
            return
        try:
            yield from self.events()
        except GeneratorExit:  # the client went away: the server closed us at a write
            self.status = CLIENT_GONE
            raise
        finally:
            self.close()

    def events(self):
        """The stream's events, as SSE text."""
        settings = self.state.settings
        yield self._opening()
        for delta in self.handle.deltas(idle=settings.stream_keepalive_s):
            if delta is None:
                yield ": keep-alive\n\n"
            elif delta.ended is not None:  # a choice ended: its last chunk now, not when all n have
                yield self._closing(delta.ended)
            else:
                yield self._pieces(delta.index, self.splitters[delta.index].feed(delta.text), delta.logprobs)
        try:
            self.result = self.handle.result(timeout=5)
        except Exception:  # the engine failed this request: say so in the stream, as a 500 would
            log.exception("streamed generation failed")
            self.status = 500
            self.record.error_code, self.record.error_message = "internal_error", "internal error"
            yield _event(error_body(500, f"internal error; quote request id {self.record.request_id} when "
                                    "reporting it", "internal_error"))
            yield "data: [DONE]\n\n"
            return
        if any(choice.finish_reason in ("timeout", "cancelled") for choice in self.result.choices):
            self.status = 504
            error = pipeline.deadline_error(settings.stream_deadline_s, self.result.completion_tokens)
            self.record.error_code, self.record.error_message = error.code, error.message
            yield _event(body_of(error))
        else:
            yield from self._ending(self.result)
        yield "data: [DONE]\n\n"

    def _closing(self, choice):
        """What is left of a choice's text once it ended, and its last chunk (its finish reason, why its
        thinking was ended early, the final answer and its check); a choice cut by the deadline has none (the
        stream ends with the error)."""
        text = self._pieces(choice.index, self.splitters[choice.index].flush())
        if choice.finish_reason in ("timeout", "cancelled"):
            return text
        answer = reasoning.split(choice.text, self.job.served.markers).answer
        verdict = shapes.verdict(self.state, self.job, answer, choice.index)
        self.finals[choice.index] = verdict["final_answer"]
        return text + self._chunk(choice.index, verdict, finish=shapes.openai_reason(choice.finish_reason),
                                  ended=choice.thinking_ended)

    def replay(self):
        """The events of the cached answer, as events() would have sent them."""
        yield self._opening()
        for choice in self.hit.choices:
            splitter, entries = self.splitters[choice.index], list(choice.logprobs or ())
            for piece in pieces(choice.text):
                yield self._pieces(choice.index, splitter.feed(piece), entries[:1])
                entries = entries[1:]
            yield self._pieces(choice.index, [], entries) + self._closing(choice)
        yield from self._ending(self.hit)
        yield "data: [DONE]\n\n"

    def _opening(self):
        return "".join(self._chunk(index, {"role": "assistant", "content": ""}) for index in range(self.job.params.n))

    def _ending(self, result):
        """After every choice's last chunk: the vote and the usage chunk, if asked."""
        if self.job.params.vote:
            yield self._chunk(None, {}, vote=shapes.vote(self.state, self.finals))
        if self.include_usage:
            timings = self.job.timings
            timings.engine(result, replayed=self.hit is not None)
            shown = accounting.shows_timing()
            yield self._chunk(None, {}, usage=shapes.chat_usage(self.job, result),
                              timing=timings.milliseconds(timings.total()) if shown else None)

    def _pieces(self, index, parts, logprobs=()):
        """The chunks of split text: the thinking as reasoning_content and reasoning, the answer as content; the
        log probabilities of the tokens decoded with them on the first (a piece held back has its tokens')."""
        chunks = []
        for kind, text in parts:
            chunks.append(self._chunk(index, {"content": text} if kind == "content" else
                                      {"reasoning_content": text, "reasoning": text}, logprobs=logprobs))
            logprobs = ()
        if logprobs:  # text held back (a possible tag): its tokens' log probabilities go now
            chunks.append(self._chunk(index, {}, logprobs=logprobs))
        return "".join(chunks)

    def close(self):
        """Stop the generation, settle what it used, write the usage row and log line."""
        self.handle.cancel()
        if self.result is None:  # cut short: count what was computed before the cancel took hold
            self.result = self._outcome()
        pipeline.settle(self.state, self.job, self.result)
        accounting.finish(self.record, self.status)

    def _outcome(self):
        try:
            return self.handle.result(timeout=5)
        except Exception:  # the engine failed this request or did not stop in time: nothing known to count
            return None

    def _chunk(self, index, delta, finish=None, usage=None, vote=None, logprobs=(), ended=None, timing=None):
        """One chat.completion.chunk: a choice's delta (its log probabilities when asked), or with `index` None
        the vote or the usage, with no choice."""
        choices = []
        if index is not None:
            choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
            if self.job.params.logprobs is not None and logprobs:
                choice["logprobs"] = shapes.logprobs(self.job, logprobs)
            if finish is not None:
                choice["thinking_ended_early"] = ended
            choices.append(choice)
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.job.model, "choices": choices}
        if usage:
            body["usage"] = usage
        if timing:  # the phases so far (service.records.timing), milliseconds: an extension beside usage
            body["server_timing"] = timing
        if vote:
            body["vote"] = vote
        return _event(body)


def pieces(text, size=REPLAY_CHARS):
    """`text` in pieces of about `size` characters, each ending after a space when one is close."""
    start = 0
    while start < len(text):
        end = min(len(text), start + size)
        space = text.rfind(" ", start + size // 2, end)
        if end < len(text) and space != -1:
            end = space + 1
        yield text[start:end]
        start = end


def _event(body):
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"
