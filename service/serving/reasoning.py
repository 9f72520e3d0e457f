"""The thinking apart from the answer: a model's reasoning tags, the split of its text, whole or streamed.

A model's settings say how it marks its reasoning (`reasoning_start`,
`reasoning_end`: `<think>`/`</think>` for VibeThinker; empty for a model
without it), and its chat template may open the thinking itself (read at
load, service.inference.model.opens_reasoning): then the text starts inside
it. A thinking that never closed (cut by length) is all reasoning. The
split of a whole text is the split of a stream fed that text at once, so a
streamed answer and a whole one always agree.
"""

from dataclasses import dataclass

FORMATS = ("auto", "deepseek", "none")  # llama.cpp's reasoning_format names; "none" keeps the raw text


@dataclass(frozen=True)
class Markers:
    """How one model marks its thinking, and whether its chat template opens it."""

    start: str = "<think>"
    end: str = "</think>"
    opened: bool = False  # the generation prompt ends inside the thinking: the text starts as reasoning

    @property
    def marked(self):
        """True when the model marks reasoning at all."""
        return bool(self.end)


@dataclass(frozen=True)
class Split:
    """A text as reasoning (None when there was no thinking) and answer."""

    reasoning: str | None
    answer: str


class Splitter:
    """Streamed text in, ("reasoning" | "content", text) pieces out; a tag is never cut across two pieces.

    A possible partial tag at the end of what came is held back until the next piece says what it is, as
    stop strings are (service.inference.decoding.StopText). With `raw` the tags stay in the content (llama.cpp's
    reasoning_format "none"), still never cut."""

    def __init__(self, markers, raw=False):
        self.markers, self.raw = markers, raw or not markers.marked
        self.state = "before" if markers.marked else "content"
        self.held, self.thought = "", False  # thought: a thinking was opened (even an empty one)

    def feed(self, piece):
        """Add decoded text; the pieces that may be sent now."""
        self.held += piece
        out = []
        while self.held:
            step = self._raw() if self.raw else self._step()
            if step is None:
                break
            kind, text = step
            if text:
                out.append((kind, text))
        return out

    def flush(self):
        """What is left once the text has ended: a held partial tag is text after all."""
        if not self.held:
            return []
        kind = "content" if self.raw or self.state != "reasoning" else "reasoning"
        if self.state == "before" and self.markers.opened:
            kind = "reasoning"
        text, self.held = self.held, ""
        self.thought = self.thought or kind == "reasoning"
        return [(kind, text)]

    def _raw(self):
        """Raw text: held only while it ends in a possible partial tag."""
        keep = max(_partial(self.held, self.markers.start), _partial(self.held, self.markers.end)) \
            if self.markers.marked else 0
        text, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return ("content", text) if text else None

    def _step(self):
        """One move of the split: None when the held text must wait for more."""
        start, end = self.markers.start, self.markers.end
        if self.state == "before":
            lead = self.held.lstrip()
            if start and start.startswith(lead):  # nothing yet, or a partial start tag: wait
                return None
            if start and lead.startswith(start):
                self.state, self.held = "reasoning", lead[len(start):]
            else:
                self.state = "reasoning" if self.markers.opened else "content"
            self.thought = self.state == "reasoning"
            return "reasoning", ""
        if self.state == "reasoning":
            at = self.held.find(end)
            if at >= 0:
                text, self.held, self.state = self.held[:at], self.held[at + len(end):], "content"
                return "reasoning", text
            keep = _partial(self.held, end)
            text, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
            return ("reasoning", text) if text else None
        text, self.held = self.held, ""
        return "content", text


def _partial(text, tag):
    """Length of the longest end of `text` that is a proper beginning of `tag`."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


def split(text, markers):
    """The reasoning and the answer of a whole text (the stream's split, fed all at once)."""
    splitter = Splitter(markers)
    parts = splitter.feed(text) + splitter.flush()
    reasoning = "".join(t for kind, t in parts if kind == "reasoning")
    answer = "".join(t for kind, t in parts if kind == "content")
    return Split(reasoning if splitter.thought else None, answer)
