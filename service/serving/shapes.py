"""The answers' shapes: a chat completion, a prediction, their usage, for a live request and a batch line
alike.

Both split the text into the thinking and the answer (service.serving.reasoning), extract the answer's
final `\\boxed{}` and, given an `expected_answer`, say whether it is `correct` (service.serving.answers).
"""

import time
import uuid

from service.serving import answers, reasoning


def completion(state, job, result):
    """The chat.completion object of `job`'s finished generation."""
    split = reasoning.split(result.text, job.served.markers)
    if job.params.reasoning_format == "none":
        message = {"role": "assistant", "content": result.text}
    else:
        message = {"role": "assistant", "content": split.answer, "reasoning_content": split.reasoning,
                   "reasoning": split.reasoning}
    message.update(verdict(state, job, split.answer))
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": job.model,
            "choices": [{"index": 0, "message": message,
                         "finish_reason": openai_reason(result.finish_reason), "logprobs": None}],
            "usage": chat_usage(job, result)}


def prediction(state, job, result):
    """The /predict answer of `job`'s finished generation, with what it echoes: `response` is the whole text,
    `reasoning` and `answer` its two parts."""
    split = reasoning.split(result.text, job.served.markers)
    return {"id": f"pred-{uuid.uuid4().hex}", "model": job.model, **job.echo,
            "response": result.text, "reasoning": split.reasoning, "answer": split.answer,
            **verdict(state, job, split.answer), "success": True, "usage": usage(result),
            "finish_reason": result.finish_reason}


def answer(state, job, result):
    """The body a finished job answers with: its kind's shape."""
    if job.kind == "chat":
        return completion(state, job, result)
    return prediction(state, job, result)


def verdict(state, job, answer_text):
    """`final_answer`, and with an expected answer `correct` (and `correct_reason` when it is null)."""
    final = answers.final_answer(answer_text)
    fields = {"final_answer": final}
    if job.expected_answer is not None:
        fields["correct"], reason = state.checker.check(job.expected_answer, final)
        if reason is not None:
            fields["correct_reason"] = reason
    return fields


def usage(result):
    """OpenAI-style usage counts of a result."""
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def chat_usage(job, result):
    """Chat's usage: the counts, and how many of the completion's tokens were thinking (OpenAI's
    completion_tokens_details.reasoning_tokens; max_tokens counts both)."""
    return {**usage(result), "completion_tokens_details": {"reasoning_tokens": reasoning_tokens(job, result)}}


def reasoning_tokens(job, result):
    """The generated tokens up to the end of the thinking (its end tag included): all of them when it never
    ended, none when there was none."""
    markers, ids = job.served.markers, result.token_ids
    if reasoning.split(result.text, markers).reasoning is None:
        return 0
    decode = job.served.engine.model.decode
    low, high = 1, len(ids)  # the fewest tokens whose text holds the end tag: a prefix's text only grows
    if markers.end not in decode(ids):
        return len(ids)
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if markers.end in decode(ids[:middle]) else (middle + 1, high)
    return low


def openai_reason(reason):
    """OpenAI's finish_reason for ours: length, or stop."""
    return "length" if reason == "length" else "stop"
