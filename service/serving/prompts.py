"""From a validated request body to a prepared job: texts cleaned and policy-checked, a model picked, the
parameters resolved, the prompt's token ids counted against the model's limits.

`chat` and `predict` are the only ways a body becomes a job, for a live
request and for a batch line alike, so both get exactly the same checks and
the same refusals (a BadRequest naming the field, Forbidden for a system
prompt or model not allowed, Unprocessable for the content policy,
PromptTooLong naming the field to change, Unavailable while the model loads).
"""

import dataclasses

from service.errors import BadRequest, PromptTooLong
from service.inference.model import PromptError, chat_messages
from service.inputs import filtering, language
from service.serving import attachments, params
from service.serving.pipeline import not_ready


def chat(state, job, body):
    """Prepare `job` from a ChatRequest (service.inputs.schemas)."""
    settings = state.settings
    params.refuse_unsupported(body)
    n, logprobs = params.choices(settings, body.n, body.logprobs, body.top_logprobs)
    messages = _clean_messages(state, job, body.messages)
    question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    job.kind, job.served = "chat", _pick(state, job, body.model, question)
    job.tokens_name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    job.asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    job.params = params.resolve(settings, job.asked, body.temperature, body.top_p, params.stops(body.stop),
                                body.seed, tokens_name=job.tokens_name, reasoning_format=body.reasoning_format,
                                top_k=body.top_k, min_p=body.min_p, repetition_penalty=body.repetition_penalty,
                                model=params.model_defaults(job.served))
    job.params = dataclasses.replace(
        job.params, n=n, logprobs=logprobs, vote=bool(body.vote),
        thinking_budget=params.thinking_budget(settings, body.thinking_token_budget, body.reasoning_effort))
    job.expected_answer = body.expected_answer
    job.messages = messages
    job.ids = prompt_ids(state, job, messages, "messages")
    job.hint = language.english_hint(question)
    job.timings.lap("template")  # the body read, cleaned, checked, templated and tokenized
    return job


def predict(state, job, body, document=None):
    """Prepare `job` from a PredictRequest, and the Document read from its file if it had one: the model sees
    the document's text, then the question. The answer echoes the cleaned question, system prompt, document
    and hint."""
    settings, limit = state.settings, state.settings.max_question_chars
    question = filtering.clean_text("question", body.question, limit, allow_empty=document is not None)
    text = None  # the document's, cleaned like a question
    if document is not None:
        text = filtering.clean_text("file", attachments.plain(document.text), limit)
        whole = f"{text}\n\n{question}" if question else text
    else:
        whole = question
    system_prompt = settings.default_system_prompt if body.system_prompt is None else \
        filtering.clean_text("system_prompt", body.system_prompt, limit, allow_empty=True)
    if body.system_prompt is not None:
        _allowed(job, system_prompt)
    filtering.check_policy(state.policy, {"system_prompt": system_prompt, "question": question,
                                          **({"file": text} if text is not None else {})}, whole="question")
    job.kind, job.served = "predict", _pick(state, job, body.model, whole)
    job.tokens_name, job.asked = "max_new_tokens", body.max_new_tokens
    job.params = params.resolve(settings, body.max_new_tokens, body.temperature, body.top_p, top_k=body.top_k,
                                min_p=body.min_p, repetition_penalty=body.repetition_penalty,
                                model=params.model_defaults(job.served))
    job.params = dataclasses.replace(
        job.params, thinking_budget=params.thinking_budget(settings, body.thinking_token_budget,
                                                           body.reasoning_effort))
    job.expected_answer = body.expected_answer
    job.messages = chat_messages(whole, system_prompt)
    if text is not None:
        job.document_texts = [text]
    job.ids = prompt_ids(state, job, job.messages, "question")
    job.hint = language.english_hint(whole)
    job.echo = {"input": question, "system_prompt": system_prompt, "hint": job.hint}
    if document is not None:
        job.echo["document"] = document.summary(text)
    job.timings.lap("template")
    return job


def prompt_ids(state, job, messages, param):
    """Chat-templated token ids of `messages` for the job's model: Unavailable if it is not loaded,
    BadRequest or PromptTooLong if they cannot be encoded or do not fit."""
    engine, settings, tokens_name = job.served.engine, state.settings, job.tokens_name
    if not engine.ready:
        raise not_ready(engine)
    try:
        ids = engine.model.encode_chat(messages)
    except PromptError as exc:
        raise BadRequest(f"{exc}; this conversation cannot be encoded", "invalid_value", param) from None
    if len(ids) > settings.max_prompt_tokens:
        raise PromptTooLong(f"prompt is {len(ids)} tokens after the chat template; the limit is "
                            f"{settings.max_prompt_tokens}", "context_length_exceeded", param)
    context, asked = engine.model.context_length, job.params.max_new_tokens
    if len(ids) + asked > context:
        raise PromptTooLong(f"prompt ({len(ids)} tokens) plus {tokens_name} ({asked}) exceeds the "
                            f"model's context of {context} tokens", "context_length_exceeded", tokens_name)
    longest = engine.longest(len(ids), job.params.n)
    if longest is not None and asked > longest:
        if job.asked is None and longest >= 1:  # the server's default, not the caller's: lowered to what fits
            job.params = dataclasses.replace(job.params, max_new_tokens=longest)
        else:
            each = f" in each of {job.params.n} choices" if job.params.n > 1 else ""
            raise PromptTooLong(f"prompt ({len(ids)} tokens) plus {tokens_name} ({asked}){each} does not fit this "
                                f"server's KV cache bound: at most {longest} new tokens fit beside this prompt",
                                "context_length_exceeded", tokens_name)
    return ids


def _allowed(job, system_prompt):
    """Forbidden unless the caller may send `system_prompt`; kept on the job, for a batch line's re-check."""
    filtering.check_allowed_prompt(system_prompt, job.caller.system_prompts)
    job.system_prompts.append(system_prompt)


def _pick(state, job, requested, question):
    """The served model for this job's caller (Models.pick)."""
    return state.models.pick(requested, question, job.caller.models)


def _clean_messages(state, job, messages):
    """The conversation as plain role/content dicts: cleaned, policy-checked, allow-listed."""
    if not messages:
        raise BadRequest("messages must hold at least one message", "empty", "messages")
    cleaned, limit = [], state.settings.max_question_chars
    for i, message in enumerate(messages):
        name = f"messages.{i}.content"
        content = message.content if isinstance(message.content, str) else _join_parts(state, job, message, name)
        text = filtering.clean_text(name, content, limit, allow_empty=message.role != "user")
        if message.role == "system":
            _allowed(job, text)
        cleaned.append({"role": message.role, "content": text})
    filtering.check_policy(state.policy, {f"messages.{i}.content": m["content"] for i, m in enumerate(cleaned)},
                           authored=[f"messages.{i}.content" for i, m in enumerate(cleaned) if m["role"] == "user"])
    return cleaned


def _join_parts(state, job, message, name):
    """A message's content parts as one text: texts as they are (joined as OpenAI joins them), each image and
    file as the text read from it, a paragraph of its own. Only a user's message may hold documents."""
    joined, documents = "", False
    for j, part in enumerate(message.content):
        if part.type != "text" and message.role != "user":
            raise BadRequest(f"{name}.{j}: only a user's message may hold an image or a file",
                             "unsupported_value", f"{name}.{j}")
        text = attachments.part_text(state, job, part, f"{name}.{j}")
        if part.type == "text":
            joined += text
        else:
            documents = True
            joined = joined.rstrip("\n") + ("\n\n" if joined.strip() else "") + text.strip() + "\n\n"
    return joined.rstrip("\n") if documents else joined
