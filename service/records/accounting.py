"""What a generation used, and its usage row: the same fields for a live request and a batch line.

A generation's usage is settled from its result (`Usage.of`), whatever
became of the request; the documents read for it are kept as costs (never
their text). `write_usage` writes the row through the usage log (group
commit): a live request's edge writes it before its response leaves; the
batch runner stores a line's row in the transaction that stores its answer
(`usage_row`), so a crash loses neither or both, and the line runs again.
"""

import logging
from dataclasses import dataclass

log = logging.getLogger("vibethinker.requests")


@dataclass(frozen=True)
class Usage:
    """What a generation used, as its usage row and log line record it."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    cached: bool = False  # answered from the response cache: nothing computed, no budget spent
    forced_tokens: int = 0  # of the completion's: fed in to end thinkings early (service.inference.thinking)
    cached_tokens: int = 0  # of the prompt's: read from the engine's prefix cache, not prefilled

    @classmethod
    def of(cls, result):
        """From a GenerationResult (every choice's tokens); None (it never ran or the engine failed) used
        nothing."""
        if result is None:
            return cls()
        return cls(result.prompt_tokens, result.completion_tokens, result.finish_reason,
                   forced_tokens=result.forced, cached_tokens=result.cached_tokens)

    @property
    def total(self):
        return self.prompt_tokens + self.completion_tokens

    def fields(self):
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "finish_reason": self.finish_reason, "cached": self.cached, "forced_tokens": self.forced_tokens,
                "cached_tokens": self.cached_tokens}


@dataclass(frozen=True)
class DocumentCost:
    """A document read for a request, as its record keeps it (never its text)."""

    kind: str  # "pdf" or "image"
    pages: int
    images: int  # read by OCR
    seconds: float
    size: int  # bytes


def document_costs(documents):
    """The usage row's document fields of DocumentCosts: PDF pages and images read, and the time reading took."""
    return {"document_pages": sum(d.pages for d in documents if d.kind == "pdf"),
            "document_images": sum(d.images for d in documents),
            "document_ms": int(sum(d.seconds for d in documents) * 1000)}


def usage_row(job, route, status, latency_s, request_id):
    """The usage row of a served job (service.serving.job.Job), as the store's `usage` table takes it."""
    team = job.caller.team
    return dict(user=job.caller.user, team=team and team.name, route=route, status=status,
                latency_ms=int(latency_s * 1000), request_id=request_id, model=job.model, **job.usage.fields(),
                **job.document_costs())


def write_usage(usage_log, job, route, status, latency_s, request_id):
    """The usage row of a served job through the usage log; a failure is logged loudly, not raised: the
    answer is computed, only its record is missing."""
    try:
        usage_log.write(**usage_row(job, route, status, latency_s, request_id))
    except Exception:
        log.exception("usage row not written", extra={"fields": {"user": job.caller.user, "route": route}})
