"""The answers' shapes: a chat completion, a prediction, their usage, for a live request and a batch line
alike.

Both split the text into the thinking and the answer (service.serving.reasoning), extract the answer's
final `\\boxed{}` and, given an `expected_answer`, say whether it is `correct` (service.serving.answers).
"""

import time
import uuid

from service.serving import answers, reasoning


def completion(state, job, result):
    """The chat.completion object of `job`'s finished generation: a choice per `n`, and the `vote` if asked."""
    choices = [choice_of(state, job, choice) for choice in result.choices]
    body = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": job.model, "choices": choices, "usage": chat_usage(job, result)}
    if job.params.vote:
        body["vote"] = vote(state, [choice["message"].get("final_answer") for choice in choices])
    return body


def choice_of(state, job, choice):
    """One choice of a chat.completion: its message (the thinking apart, the final answer and its check), why
    it ended, why its thinking was ended early (`thinking_ended_early`, or null) and its log probabilities."""
    split = reasoning.split(choice.text, job.served.markers)
    if job.params.reasoning_format == "none":
        message = {"role": "assistant", "content": choice.text}
    else:
        message = {"role": "assistant", "content": split.answer, "reasoning_content": split.reasoning,
                   "reasoning": split.reasoning}
    message.update(verdict(state, job, split.answer, choice.index))
    return {"index": choice.index, "message": message, "finish_reason": openai_reason(choice.finish_reason),
            "thinking_ended_early": choice.thinking_ended,
            "logprobs": logprobs(job, choice.logprobs) if job.params.logprobs is not None else None}


def logprobs(job, entries):
    """OpenAI's `logprobs` of a choice: `content` for the answer's tokens, and (not OpenAI's: it has no
    thinking to show) `reasoning_content` for the thinking's, with reasoning_format "none" all in `content`."""
    loaded = job.served.engine.model
    raw = job.params.reasoning_format == "none" or not job.served.markers.marked
    content, thinking = [], []
    for entry in entries or ():
        (thinking if entry.thinking and not raw else content).append(token_logprob(loaded, entry))
    return {"content": content, "refusal": None, **({} if raw else {"reasoning_content": thinking})}


def token_logprob(loaded, entry):
    """One token's entry in OpenAI's shape: its text, log probability, bytes (its own: part of a character's
    too, where its text reads U+FFFD) and top alternatives."""
    def item(token, logprob):
        return {"token": loaded.decode_token(token), "logprob": max(logprob, -9999.0),
                "bytes": list(loaded.token_bytes(token))}
    return {**item(entry.token, entry.logprob), "top_logprobs": [item(t, lp) for t, lp in entry.top]}


def vote(state, finals):
    """The majority of the choices' final answers: equal ones counted together, the most common first answer on
    a tie. `final_answer` null when no choice gave one.

    Answers equal as written (spaces aside) are one at once; the distinct ones are then compared by math-verify
    in its bounded worker (service.serving.answers.Checker), the most given first, within twice the checker's
    time limit in all: past it, the ones left stay apart."""
    written = {}  # an answer as written, spaces dropped -> [its first form, choice indexes]
    for index, final in enumerate(finals):
        if final is not None:
            written.setdefault("".join(final.split()), [final, []])[1].append(index)
    groups = []
    until = time.monotonic() + 2 * state.checker.timeout_s
    for answer, indexes in sorted(written.values(), key=lambda group: (-len(group[1]), group[1][0])):
        same = next((group for group in groups if time.monotonic() < until
                     and state.checker.check(group[0], answer)[0]), None)
        if same is None:
            groups.append([answer, list(indexes)])
        else:
            same[1] = sorted(same[1] + indexes)
    if not groups:
        return {"final_answer": None, "share": 0.0, "choices": [], "answered": 0}
    best = max(groups, key=lambda group: (len(group[1]), -group[1][0]))
    return {"final_answer": best[0], "share": round(len(best[1]) / len(finals), 4), "choices": best[1],
            "answered": sum(len(group[1]) for group in groups)}


def prediction(state, job, result):
    """The /predict answer of `job`'s finished generation, with what it echoes: `response` is the whole text,
    `reasoning` and `answer` its two parts."""
    split = reasoning.split(result.text, job.served.markers)
    return {"id": f"pred-{uuid.uuid4().hex}", "model": job.model, **job.echo,
            "response": result.text, "reasoning": split.reasoning, "answer": split.answer,
            **verdict(state, job, split.answer), "success": True, "usage": usage(result),
            "finish_reason": result.finish_reason, "thinking_ended_early": result.thinking_ended}


def answer(state, job, result):
    """The body a finished job answers with: its kind's shape."""
    if job.kind == "chat":
        return completion(state, job, result)
    return prediction(state, job, result)


def verdict(state, job, answer_text, index=0):
    """`final_answer`, and with an expected answer `correct` (and `correct_reason` when it is null), of choice
    `index`; noted on the job (a transcript keeps it)."""
    final = answers.final_answer(answer_text)
    fields = {"final_answer": final}
    if job.expected_answer is not None:
        fields["correct"], reason = state.checker.check(job.expected_answer, final)
        if reason is not None:
            fields["correct_reason"] = reason
    job.verdicts[index] = fields
    return fields


def usage(result):
    """OpenAI-style usage counts of a result (every choice's completion tokens), with the tokens forced to end
    a thinking early (`forced_tokens`, counted in the completion's) and the prompt's tokens read from the
    engine's prefix cache (`cached_tokens`, counted in the prompt's: the request's, on its first choice; also
    where OpenAI puts it, prompt_tokens_details.cached_tokens)."""
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens, "forced_tokens": result.forced,
            "cached_tokens": result.cached_tokens, "prompt_tokens_details": {"cached_tokens": result.cached_tokens}}


def chat_usage(job, result):
    """Chat's usage: the counts, the prompt's cached tokens (OpenAI's prompt_tokens_details.cached_tokens),
    and how many of the completion's tokens were thinking (OpenAI's completion_tokens_details.reasoning_tokens;
    max_tokens counts both), forced ones among them."""
    counts = usage(result)
    forced, _ = counts.pop("forced_tokens"), counts.pop("cached_tokens")
    return {**counts, "completion_tokens_details": {
        "reasoning_tokens": sum(reasoning_tokens(job, choice) for choice in result.choices),
        "forced_tokens": forced}}


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
