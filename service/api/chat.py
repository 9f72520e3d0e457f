"""POST /v1/chat/completions, as the official openai client expects it.

Non-streamed answers are one JSON object; streamed ones are server-sent
events (service.api.streaming). `model` names a served model (or an alias),
or is "auto": the routing rules pick one by the last user message
(service.api.models). A deterministic request asked again is answered from
the response cache (service.api.cache), `x-cache: hit`.

VibeThinker writes its reasoning before its answer; both stay in `content`.
"""

import time
import uuid
from flask import Blueprint

from service.admission.access import caller
from service.api import attachments, generation, models
from service.api.streaming import ChatStream, openai_reason
from service.errors import APIError
from service.inputs import filtering, language
from service.inputs.schemas import ChatRequest, read
from service.records import accounting
from service.state import state

bp = Blueprint("chat", __name__)
MAX_STOPS, MAX_STOP_CHARS = 4, 64


@bp.post("/v1/chat/completions")
def chat_completions():
    """Answer a conversation, whole or as a stream."""
    attachments.allow_document_body()  # read up to the document allowance, then held to it only with documents
    body = read(ChatRequest, attachments.check_chat_body)
    job = prepare(body)
    record = accounting.current()
    record.model, record.hint = job.served.name, job.hint
    hit = generation.cached(job.served, job.ids, job.params)
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return ChatStream(job.served, job.ids, job.params, include_usage, hit=hit).open().response()
    if hit is not None:
        return completion(hit, job.served.name)
    params = generation.fit_deadline(job.served.engine, state().settings, job.params, job.ids, job.asked,
                                     job.tokens_name)
    return completion(generation.answer(job.served, job.ids, params), job.served.name)


def prepare(body):
    """A checked ChatRequest as a generation.Prepared; APIError 400/403/404/422/503 as for a live request (batch lines go
    through here too)."""
    settings = state().settings
    if body.n not in (None, 1):
        raise APIError(400, "only n=1 is supported", "unsupported_value", "n")
    messages = _clean_messages(body.messages, settings)
    question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    served = models.pick(body.model, question)
    tokens_name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params = generation.resolve_params(settings, asked, body.temperature, body.top_p, _stops(body.stop), body.seed,
                                       tokens_name=tokens_name)
    ids = generation.prompt_ids(served.engine, messages, settings, params.max_new_tokens, "messages", tokens_name)
    return generation.Prepared(served, ids, params, tokens_name, asked, language.english_hint(question))


def completion(result, model):
    """The chat.completion object of a finished generation by `model`."""
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": openai_reason(result.finish_reason), "logprobs": None}],
            "usage": generation.usage(result)}


def _clean_messages(messages, settings):
    """The conversation as plain role/content dicts: cleaned, policy-checked, allow-listed."""
    if not messages:
        raise APIError(400, "messages must hold at least one message", "empty", "messages")
    cleaned = []
    for i, message in enumerate(messages):
        name = f"messages.{i}.content"
        content = message.content if isinstance(message.content, str) else _join_parts(message, name)
        text = filtering.clean_text(name, content, settings.max_question_chars,
                                    allow_empty=message.role != "user")
        if message.role == "system":
            filtering.check_allowed_prompt(text, caller().get("system_prompts"))
        cleaned.append({"role": message.role, "content": text})
    filtering.check_policy(state().policy, {f"messages.{i}.content": m["content"] for i, m in enumerate(cleaned)})
    return cleaned


def _join_parts(message, name):
    """A message's content parts as one text: texts as they are (joined as OpenAI joins them), each image and
    file as the text read from it, a paragraph of its own. Only a user's message may hold documents."""
    joined, documents = "", False
    for j, part in enumerate(message.content):
        if part.type != "text" and message.role != "user":
            raise APIError(400, f"{name}.{j}: only a user's message may hold an image or a file",
                           "unsupported_value", f"{name}.{j}")
        text = attachments.part_text(part, f"{name}.{j}")
        if part.type == "text":
            joined += text
        else:
            documents = True
            joined = joined.rstrip("\n") + ("\n\n" if joined.strip() else "") + text.strip() + "\n\n"
    return joined.rstrip("\n") if documents else joined


def _stops(stop):
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise APIError(400, f"stop must be at most {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} "
                       "characters", "invalid_value", "stop")
    return stops
