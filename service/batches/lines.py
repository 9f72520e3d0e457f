"""A batch's input lines, checked up front, and the output line of each finished one.

Input lines are OpenAI's JSONL: `{"custom_id", "method": "POST", "url", "body"}`,
`url` being the batch's endpoint (`/v1/chat/completions`, or this service's
`/v1/predict`). Every body is prepared by serving exactly as a live request
of its endpoint is (service.serving.prompts), in the request that creates
the batch, so a bad line fails the batch at once with its line number and
the live request's refusal, and what is stored per line is ready to run:
prompt ids, parameters, what the answer echoes, the documents' costs.
"""

import itertools
import logging
import secrets
import time
from dataclasses import asdict

from service.errors import BadRequest, DeadlineExceeded, Refusal, body_of, error_body, status_of
from service.inputs.schemas import ChatRequest, PredictRequest, decode_body, parse
from service.records import timing
from service.serving import pipeline, prompts, shapes
from service.serving.job import Job
from service.serving.params import Params

log = logging.getLogger("vibethinker.batches")
ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/predict": "predict"}
MAX_ERRORS = 20  # validation errors reported per batch; the first ones, by line
MAX_CUSTOM_ID = 255


def read_file(state, caller, opener, endpoint, max_lines):
    """([(custom_id, prepared)], errors) of the input file that `opener()` opens as binary, for a batch of
    `endpoint` made by `caller`. Its lines are counted before any is prepared (a file over `max_lines` costs
    no preparation), and all of them are prepared within one request deadline, documents included."""
    with opener() as handle:
        count = sum(1 for raw in itertools.islice((r for r in handle if r.strip()), max_lines + 1))
    if count > max_lines:
        return [], [_error("too_many_lines", f"the file has more than {max_lines} lines", None)]
    with opener() as handle:
        return _read_input(state, caller, handle, endpoint)


def _read_input(state, caller, handle, endpoint):
    """([(custom_id, prepared)], errors) of the input file open as binary `handle` (counted already), for a
    batch of `endpoint` made by `caller`, prepared within one request deadline from now."""
    lines, errors, seen, started = [], [], set(), time.monotonic()
    deadline_s = state.settings.request_deadline_s
    for number, raw in enumerate(handle, start=1):
        if not raw.strip():
            continue
        try:
            if time.monotonic() - started >= deadline_s:
                raise DeadlineExceeded(f"preparing the file's lines passed the {deadline_s:g} s deadline of a "
                                       "create (documents included); split the file", "deadline_exceeded")
            custom_id, prepared = _line(state, caller, raw, endpoint, seen, started)
            lines.append((custom_id, prepared))
        except DeadlineExceeded as exc:  # the create's time is spent: the file asked too much of it
            errors.append(_error(exc.code, exc.message, number, exc.param))
            break
        except Refusal as exc:
            if status_of(exc) >= 500:  # the server cannot check lines now (model loading): not the file's fault
                raise
            errors.append(_error(exc.code, exc.message, number, exc.param))
        if len(errors) >= MAX_ERRORS:
            break
    if not lines and not errors:
        errors.append(_error("empty_file", "the input file has no lines", None))
    return lines, errors


def _line(state, caller, raw, endpoint, seen, started):
    item = decode_body(raw, is_json=True)  # a line is a request body: the same checks, surrogates included
    unknown = set(item) - {"custom_id", "method", "url", "body"}
    if unknown:
        raise BadRequest(f"unknown field {sorted(unknown)[0]!r}; a line has custom_id, method, url, body",
                         "unknown_field", sorted(unknown)[0])
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID:
        raise BadRequest(f"custom_id must be a string of 1-{MAX_CUSTOM_ID} characters", "invalid_value",
                         "custom_id")
    if custom_id in seen:
        raise BadRequest(f"custom_id {custom_id[:60]!r} appears twice", "duplicate_custom_id", "custom_id")
    seen.add(custom_id)
    if item.get("method") != "POST":
        raise BadRequest("method must be POST", "invalid_value", "method")
    if item.get("url") != endpoint:
        raise BadRequest(f"url must be the batch's endpoint, {endpoint}", "invalid_value", "url")
    body = item.get("body")
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object", "invalid_type", "body")
    return custom_id, prepare(state, caller, ENDPOINTS[endpoint], body, started)


def prepare(state, caller, kind, body, started=None):
    """The stored form of one request body, prepared as its live request would be (the same refusals). A
    line's documents (chat's image and file parts) are read now, each line within one request's document
    limits and all of them within the deadline that runs from `started` (the create's start); what reading
    them cost goes into the line's usage row when it is answered."""
    job = Job(caller, started or time.monotonic())
    if kind == "chat":
        request = parse(ChatRequest, body)
        if request.stream:
            raise BadRequest("stream is not supported in a batch", "unsupported_value", "body.stream")
        prompts.chat(state, job, request)
    else:
        prompts.predict(state, job, parse(PredictRequest, body))
    prepared = {"kind": kind, "model": job.model, "ids": job.ids, "params": asdict(job.params),
                "messages": job.messages}  # the text of its ids, as a transcript keeps it
    if job.document_texts:
        prepared["document_texts"] = job.document_texts
    if job.echo is not None:
        prepared["echo"] = job.echo
    if job.expected_answer is not None:
        prepared["expected_answer"] = job.expected_answer
    if job.documents:
        prepared["documents"] = job.document_costs()
    if job.system_prompts:  # re-checked against the owner's allow-list when the line starts
        prepared["system_prompts"] = job.system_prompts
    return prepared


def job_of(prepared, caller, served):
    """The Job of a stored line, to run for `caller` on `served`."""
    return Job(caller, kind=prepared["kind"], served=served, ids=prepared["ids"],
               params=Params.stored(prepared["params"]), echo=prepared.get("echo"), costs=prepared.get("documents"),
               expected_answer=prepared.get("expected_answer"), messages=prepared.get("messages"),
               document_texts=prepared.get("document_texts", []))


def answered(state, custom_id, job, result, request_id):
    """The output line of a finished line's job; its body has the line's phases as `server_timing` (in
    milliseconds: service.records.timing) when the setting shows them to everyone."""
    body = shapes.answer(state, job, result)
    job.timings.lap("record")
    if timing.shown(state.settings.server_timing, ()):  # no token at hand: as for one without the admin scope
        body["server_timing"] = job.timings.milliseconds(job.timings.total())
    return {"id": f"batch_req_{secrets.token_hex(12)}", "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": request_id, "body": body}, "error": None}


def finished(state, custom_id, job, result, request_id):
    """(ok, output line, status) of a line whose generation ended with `result` (None: the engine failed it):
    its answer, or its error line."""
    deadline_s = state.settings.stream_deadline_s
    if result is not None and result.finish_reason == "cancelled":
        return False, failed(custom_id, 499, "the batch was cancelled before this line was answered",
                             "batch_cancelled", request_id), 499
    if result is None:
        return False, failed(custom_id, 500, "internal error", "internal_error", request_id), 500
    try:
        result = pipeline.outcome(job, result, deadline_s)
    except Refusal as refusal:  # the deadline cut it
        return False, failed(custom_id, 504, f"the line passed the {deadline_s:g} s deadline", refusal.code,
                             request_id), 504
    return shaped(state, custom_id, job, result, request_id)


def shaped(state, custom_id, job, result, request_id):
    """(ok, output line, status) of a line answered with `result`; a failure to shape it (a bug, a decoder
    error) is the line's 500, never a line left running."""
    try:
        return True, answered(state, custom_id, job, result, request_id), 200
    except Exception:  # noqa: BLE001 - logged with its traceback; the batch goes on
        log.exception("a batch line's answer could not be shaped")
        return False, failed(custom_id, 500, "internal error", "internal_error", request_id), 500


def refused(custom_id, refusal, request_id=None):
    """The error-file line of a line refused as its live request would be."""
    return failed(custom_id, status_of(refusal), refusal.message, refusal.code, request_id, body_of(refusal))


def failed(custom_id, status, message, code, request_id=None, body=None):
    """The error-file line of a line that did not get an answer."""
    return {"id": f"batch_req_{secrets.token_hex(12)}", "custom_id": custom_id,
            "response": {"status_code": status, "request_id": request_id,
                         "body": body or error_body(status, message, code)},
            "error": {"code": code, "message": message}}


def _error(code, message, line, param=None):
    return {"code": code, "message": message, "param": param, "line": line}
