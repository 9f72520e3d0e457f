"""A batch's input lines, checked up front, and the output line of each answered one.

Input lines are OpenAI's JSONL: `{"custom_id", "method": "POST", "url", "body"}`,
`url` being the batch's endpoint (`/v1/chat/completions`, or this service's
`/v1/predict`). Every body goes through the same validation, filters and
prompt checks as a live request of its endpoint (service.api.chat.prepare,
service.api.predict.prepare), in the request that creates the batch, so a
bad line fails the batch at once with its line number, and what is stored
per line is ready to run: prompt ids, parameters, what the answer echoes.
"""

import secrets
import time
from dataclasses import asdict

from service.api import chat, predict
from service.api.generation import Params
from service.errors import APIError, error_body
from service.inputs.schemas import ChatRequest, PredictRequest, decode_body, parse
from service.records import accounting

ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/predict": "predict"}
MAX_ERRORS = 20  # validation errors reported per batch; the first ones, by line
MAX_CUSTOM_ID = 255


def read_input(handle, endpoint, max_lines):
    """([(custom_id, prepared)], errors) of the input file open as binary `handle`, for a batch of `endpoint`."""
    lines, errors, seen = [], [], set()
    for number, raw in enumerate(handle, start=1):
        if not raw.strip():
            continue
        if len(lines) + len(errors) >= max_lines:
            errors.append(_error("too_many_lines", f"the file has more than {max_lines} lines", number))
            break
        try:
            custom_id, prepared = _line(raw, endpoint, seen)
            lines.append((custom_id, prepared))
        except APIError as exc:
            if exc.status >= 500:  # the server cannot check lines now (model loading): not the file's fault
                raise
            errors.append(_error(exc.code, exc.message, number, exc.param))
        if len(errors) >= MAX_ERRORS:
            break
    if not lines and not errors:
        errors.append(_error("empty_file", "the input file has no lines", None))
    return lines, errors


def _line(raw, endpoint, seen):
    item = decode_body(raw, is_json=True)  # a line is a request body: the same checks, surrogates included
    unknown = set(item) - {"custom_id", "method", "url", "body"}
    if unknown:
        raise APIError(400, f"unknown field {sorted(unknown)[0]!r}; a line has custom_id, method, url, body",
                       "unknown_field", sorted(unknown)[0])
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID:
        raise APIError(400, f"custom_id must be a string of 1-{MAX_CUSTOM_ID} characters", "invalid_value",
                       "custom_id")
    if custom_id in seen:
        raise APIError(400, f"custom_id {custom_id[:60]!r} appears twice", "duplicate_custom_id", "custom_id")
    seen.add(custom_id)
    if item.get("method") != "POST":
        raise APIError(400, "method must be POST", "invalid_value", "method")
    if item.get("url") != endpoint:
        raise APIError(400, f"url must be the batch's endpoint, {endpoint}", "invalid_value", "url")
    body = item.get("body")
    if not isinstance(body, dict):
        raise APIError(400, "body must be a JSON object", "invalid_type", "body")
    return custom_id, prepare(ENDPOINTS[endpoint], body)


def prepare(kind, body):
    """The stored form of one request body: APIError as the live endpoint would answer it. A line's documents
    (chat's image and file parts) are read now, each line within one request's document limits; what reading
    them cost goes into the line's usage row when it is answered."""
    record = accounting.current()
    record.documents, record.reading_since = [], time.monotonic()
    if kind == "chat":
        request = parse(ChatRequest, body)
        if request.stream:
            raise APIError(400, "stream is not supported in a batch", "unsupported_value", "body.stream")
        job = chat.prepare(request)
        prepared = {"kind": kind, "model": job.served.name, "ids": job.ids, "params": asdict(job.params)}
    else:
        job, echo = predict.prepare(parse(PredictRequest, body))
        prepared = {"kind": kind, "model": job.served.name, "ids": job.ids, "params": asdict(job.params),
                    "echo": echo}
    if record.documents:
        prepared["documents"] = record.document_costs()
    return prepared


def params_of(prepared):
    values = dict(prepared["params"])
    values["stop"] = tuple(values.get("stop") or ())
    return Params(**values)


def answered(custom_id, prepared, result, request_id, model):
    """The output line of a finished generation by `model`."""
    body = chat.completion(result, model) if prepared["kind"] == "chat" else \
        predict.prediction(result, prepared["echo"], model)
    return {"id": f"batch_req_{secrets.token_hex(12)}", "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": request_id, "body": body}, "error": None}


def refused(custom_id, status, message, code, request_id=None):
    """The error-file line of a line that did not get an answer."""
    return {"id": f"batch_req_{secrets.token_hex(12)}", "custom_id": custom_id,
            "response": {"status_code": status, "request_id": request_id, "body": error_body(status, message, code)},
            "error": {"code": code, "message": message}}


def _error(code, message, line, param=None):
    return {"code": code, "message": message, "param": param, "line": line}
