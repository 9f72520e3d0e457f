"""POST /v1/chat/completions and GET /v1/models, as the official openai client expects them.

Non-streamed answers are one JSON object; streamed ones are server-sent
events: `data: {chat.completion.chunk}` per decoded piece, a final chunk with
the finish reason, a usage chunk when `stream_options.include_usage`, then
`data: [DONE]`. Keep-alive comments go out while a request waits; a client
that goes away is noticed at the next write and its generation cancelled. An
error after the stream started is sent as `data: {"error": {...}}`.

VibeThinker writes its reasoning before its answer; both stay in `content`.
"""

import json
import time
import uuid
from contextlib import ExitStack

from flask import Blueprint, Response, current_app, g, request, stream_with_context

from service import accounting, filtering, generate, quotas
from service.access import caller
from service.errors import APIError, error_body
from service.schemas import ChatRequest, decode_body, parse

bp = Blueprint("chat", __name__)
MAX_STOPS, MAX_STOP_CHARS = 4, 64


@bp.get("/v1/models")
def list_models():
    return {"object": "list", "data": [_model_card()]}


@bp.get("/v1/models/<path:model>")
def get_model(model):
    _check_model(model)
    return _model_card()


@bp.post("/v1/chat/completions")
def chat_completions():
    """Answer a conversation, whole or as a stream."""
    settings, engine = current_app.extensions["vibethinker.settings"], current_app.extensions["vibethinker.engine"]
    body = parse(ChatRequest, decode_body(request.get_data(cache=False), request.is_json))
    _check_model(body.model)
    if body.n not in (None, 1):
        raise APIError(400, "only n=1 is supported", "unsupported_value", "n")
    messages = _clean_messages(body.messages, settings)
    tokens_name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    params = generate.resolve_params(settings, body.max_completion_tokens or body.max_tokens, body.temperature,
                                     body.top_p, _stops(body.stop), body.seed, tokens_name=tokens_name)
    ids = generate.prompt_ids(engine, messages, settings, params.max_new_tokens, "messages", tokens_name)
    if body.stream:
        return _stream(engine, ids, params, settings, body.stream_options)
    with quotas.admit(caller(), len(ids), params.max_new_tokens, settings.request_deadline_s) as ticket:
        result = generate.complete(engine, ids, params, settings)
        ticket.complete(result)
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": settings.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": _openai_reason(result.finish_reason), "logprobs": None}],
            "usage": generate.usage(result)}


def _model_card():
    settings = current_app.extensions["vibethinker.settings"]
    return {"id": settings.model_name, "object": "model", "created": int(current_app.config["STARTED_AT"]),
            "owned_by": "vibethinker"}


def _check_model(model):
    name = current_app.extensions["vibethinker.settings"].model_name
    if model.lower() != name.lower():
        raise APIError(404, f"model {model!r} does not exist here; this server serves {name!r}",
                       "model_not_found", "model")


def _clean_messages(messages, settings):
    """The conversation as plain role/content dicts: cleaned, policy-checked, allow-listed."""
    if not messages:
        raise APIError(400, "messages must hold at least one message", "empty", "messages")
    cleaned = []
    for i, message in enumerate(messages):
        content = message.content if isinstance(message.content, str) else \
            "".join(part.text for part in message.content)
        name = f"messages.{i}.content"
        text = filtering.clean_text(name, content, settings.max_question_chars,
                                    allow_empty=message.role != "user")
        filtering.check_policy(current_app.extensions["vibethinker.policy"], {name: text})
        if message.role == "system":
            filtering.check_allowed_prompt(text, caller().get("system_prompts"))
        cleaned.append({"role": message.role, "content": text})
    return cleaned


def _stops(stop):
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise APIError(400, f"stop must be at most {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} "
                       "characters", "invalid_value", "stop")
    return stops


def _openai_reason(reason):
    return "length" if reason == "length" else "stop"


def _stream(engine, ids, params, settings, options):
    """Admit and queue now (so refusals keep their status), then stream the events."""
    stack = ExitStack()
    ticket = stack.enter_context(quotas.admit(caller(), len(ids), params.max_new_tokens,
                                              settings.request_deadline_s))
    try:
        handle = generate.submit(engine, ids, params, settings)
    except BaseException:
        stack.close()
        raise
    g.ticket = None  # the stream writes its own usage row when it ends
    route, started = request.url_rule.rule, g.started
    chunk_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(delta, finish=None, usage=None):
        choices = [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
        body = {"id": chunk_id, "object": "chat.completion.chunk", "created": created,
                "model": settings.model_name, "choices": choices}
        if usage:
            body["usage"] = usage
        return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"

    def events():
        status = 200
        try:
            yield chunk({"role": "assistant", "content": ""})
            for piece in handle.deltas(idle=settings.stream_keepalive_s):
                yield ": keep-alive\n\n" if piece is None else chunk({"content": piece}) if piece else ""
            result = handle.result(timeout=5)
            if result.finish_reason in ("timeout", "cancelled"):
                status = 504
                error = generate.deadline_error(settings, len(ids), result.completion_tokens)
                ticket.fail(error)
                yield _error_event(error)
            else:
                ticket.complete(result)
                yield chunk({}, _openai_reason(result.finish_reason))
                if options is not None and options.include_usage:
                    yield chunk({}, usage=generate.usage(result))
            yield "data: [DONE]\n\n"
        except GeneratorExit:  # the client went away: stop the generation at its next step
            status = 499
            raise
        finally:
            handle.cancel()
            if not ticket.ran:  # cut short: count what was computed before the cancel took hold
                try:
                    cut = handle.result(timeout=5)
                    ticket.fail(generate.deadline_error(settings, len(ids), cut.completion_tokens))
                except Exception:  # a timeout or an engine failure: nothing to count
                    pass
            stack.close()
            accounting.record_stream(ticket, route, status, started)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return Response(stream_with_context(events()), mimetype="text/event-stream", headers=headers)


def _error_event(error):
    body = error_body(error.status, error.message, error.code, error.param)
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"
