"""POST /v1/chat/completions, as the official openai client expects it.

Non-streamed answers are one JSON object; streamed ones are server-sent
events (service.api.streaming). `model` names a served model (or an alias),
or is "auto": the routing rules pick one by the last user message
(service.serving.models). A deterministic request asked again is answered
from the response cache (service.serving.cache), `x-cache: hit`.

VibeThinker writes its reasoning inside `<think>...</think>` before its answer: the thinking is
`message.reasoning_content` (and `reasoning`), the answer `content` (service.serving.shapes);
`reasoning_format: "none"` keeps the raw text in `content`.
"""

from flask import Blueprint

from service.api import accounting, attachments, client
from service.api.body import read
from service.api.streaming import ChatStream
from service.inputs.schemas import ChatRequest
from service.serving import pipeline, prompts, shapes
from service.state import state

bp = Blueprint("chat", __name__)


@bp.post("/v1/chat/completions")
def chat_completions():
    """Answer a conversation, whole or as a stream."""
    attachments.allow_document_body()  # read up to the document allowance, then held to it only with documents
    body = read(ChatRequest, attachments.check_chat_body)
    app, job = state(), accounting.begin()
    prompts.chat(app, job, body)
    hit = pipeline.cached(app, job)
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return ChatStream(job, include_usage, hit=hit).open().response()
    if hit is not None:
        return shapes.completion(app, job, hit)
    pipeline.fit_deadline(app, job)
    return shapes.completion(app, job, pipeline.answer(app, job, client.gone))
