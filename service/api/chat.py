"""POST /v1/chat/completions and GET /v1/models, as the official openai client expects them.

Non-streamed answers are one JSON object; streamed ones are server-sent
events (service.api.streaming).

VibeThinker writes its reasoning before its answer; both stay in `content`.
"""

import time
import uuid

from flask import Blueprint

from service.admission.access import caller
from service.api import generation
from service.api.streaming import ChatStream, openai_reason
from service.errors import APIError
from service.inputs import filtering
from service.inputs.schemas import ChatRequest, read
from service.state import state

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
    body = read(ChatRequest)
    ids, params, tokens_name, asked = prepare(body)
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return ChatStream(ids, params, include_usage).open().response()
    params = generation.fit_deadline(state().engine, state().settings, params, ids, asked, tokens_name)
    return completion(generation.answer(ids, params))


def prepare(body):
    """A checked ChatRequest as (prompt ids, parameters, the tokens field's name, the tokens asked for);
    APIError 400/403/404/422 as for a live request (batch lines go through here too)."""
    settings, engine = state().settings, state().engine
    _check_model(body.model)
    if body.n not in (None, 1):
        raise APIError(400, "only n=1 is supported", "unsupported_value", "n")
    messages = _clean_messages(body.messages, settings)
    tokens_name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params = generation.resolve_params(settings, asked, body.temperature, body.top_p, _stops(body.stop), body.seed,
                                       tokens_name=tokens_name)
    ids = generation.prompt_ids(engine, messages, settings, params.max_new_tokens, "messages", tokens_name)
    return ids, params, tokens_name, asked


def completion(result):
    """The chat.completion object of a finished generation."""
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": state().settings.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": openai_reason(result.finish_reason), "logprobs": None}],
            "usage": generation.usage(result)}


def _model_card():
    return {"id": state().settings.model_name, "object": "model", "created": int(state().started_at),
            "owned_by": "vibethinker"}


def _check_model(model):
    name = state().settings.model_name
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
        if message.role == "system":
            filtering.check_allowed_prompt(text, caller().get("system_prompts"))
        cleaned.append({"role": message.role, "content": text})
    filtering.check_policy(state().policy, {f"messages.{i}.content": m["content"] for i, m in enumerate(cleaned)})
    return cleaned


def _stops(stop):
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise APIError(400, f"stop must be at most {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} "
                       "characters", "invalid_value", "stop")
    return stops
