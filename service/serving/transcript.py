"""A finished generation's transcript, for callers who opted in (auth.transcripts.transcripts_on): live
requests (whole or streamed) and batch lines alike, handed to the transcript writer
(service.records.transcriptlog) once their usage is recorded.

It keeps what model iteration needs: the messages as the model saw them, the documents' text, each
choice's reasoning and answer (and final answer, and whether it was correct), the parameters, the phases,
the status and error of a failed one. Never the token. Building it must not fail a request: an error is
logged, not raised.
"""

import logging
from dataclasses import asdict

from service.serving import reasoning

log = logging.getLogger("vibethinker.transcripts")


def keep(state, job, route, status, request_id, error=None):
    """Hand `job`'s transcript to the writer when its caller's are kept; `error` is (code, message) of a failed
    one. Never raises."""
    if state.transcript_log is None or job is None or not job.caller.transcripts or job.messages is None:
        return
    try:
        team = job.caller.team and job.caller.team.name
        state.transcript_log.keep({"user": job.caller.user, "team": team, "created_at": state.store.clock(),
                                   "model": job.model, "route": route, "status": status, "request_id": request_id,
                                   "content": content(job, route, status, request_id, error)})
    except Exception:  # noqa: BLE001 - the answer is given; only its transcript is missing
        log.exception("transcript not kept", extra={"fields": {"user": job.caller.user, "route": route}})


def content(job, route, status, request_id, error=None):
    """What is kept of `job` (the part that is encrypted)."""
    result, total = job.result, job.timings.total()
    kept = {"user": job.caller.user, "model": job.model, "route": route, "kind": job.kind, "request_id": request_id,
            "status": status, "messages": job.messages, "documents": list(job.document_texts),
            "params": asdict(job.params) if job.params is not None else None,
            "phases": job.timings.milliseconds(total), "cached": job.cache == "hit",
            "choices": [] if result is None else [choice(job, c) for c in result.choices],
            "error": None if error is None else {"code": error[0], "message": error[1]}}
    if job.expected_answer is not None:
        kept["expected_answer"] = job.expected_answer
    if job.usage is not None:
        kept["usage"] = job.usage.fields()
    return kept


def choice(job, generated):
    """One choice: the thinking and the answer apart (the raw text too), why it ended, its final answer."""
    split = reasoning.split(generated.text, job.served.markers)
    verdict = job.verdicts.get(generated.index, {})
    kept = {"index": generated.index, "text": generated.text, "reasoning": split.reasoning, "answer": split.answer,
            "finish_reason": generated.finish_reason, "thinking_ended_early": generated.thinking_ended,
            "final_answer": verdict.get("final_answer")}
    if "correct" in verdict:
        kept["correct"] = verdict["correct"]
    return kept
