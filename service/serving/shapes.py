"""The answers' shapes: a chat completion, a prediction, their usage, for a live request and a batch line
alike."""

import time
import uuid


def completion(result, model):
    """The chat.completion object of a finished generation by `model`."""
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": openai_reason(result.finish_reason), "logprobs": None}],
            "usage": usage(result)}


def prediction(result, echo, model):
    """The /predict answer of a finished generation by `model`, with what it echoes."""
    return {"id": f"pred-{uuid.uuid4().hex}", "model": model, **echo,
            "response": result.text, "success": True, "usage": usage(result),
            "finish_reason": result.finish_reason}


def answer(job, result):
    """The body a finished job answers with: its kind's shape."""
    if job.kind == "chat":
        return completion(result, job.model)
    return prediction(result, job.echo, job.model)


def usage(result):
    """OpenAI-style usage counts of a result."""
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def openai_reason(reason):
    """OpenAI's finish_reason for ours: length, or stop."""
    return "length" if reason == "length" else "stop"
