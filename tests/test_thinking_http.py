"""Thinking that ends in time, n choices, a vote and log probabilities, through real gunicorn and the official
openai client.

The `endless` server's demo model is forced to think and never close its thinking (settings.forced_output),
so every answer gets its thinking ended by the engine; the plain `server` samples from random weights, so
its choices differ.
"""

import json

import openai
import pytest

from auth.store import Store
from service.serving import shapes
from service.serving.answers import Checker
from tests.support.batches import MODEL, jsonl, wait
from tests.support.tokens import user_token

pytestmark = pytest.mark.slow
ANSWER_TOKENS = 12
ENDLESS = "<think>" + " ".join(str(i * 7919 % 100003) for i in range(700))[:4000]
QUESTION = [{"role": "user", "content": "How many primes are below 100?"}]


@pytest.fixture(scope="module")
def endless(start_server):
    return start_server(VIBE_FORCED_OUTPUT=ENDLESS, VIBE_ANSWER_TOKENS=ANSWER_TOKENS)


def client_of(server, token=None):
    return openai.OpenAI(base_url=server.url("/v1"), api_key=token or server.token, max_retries=0, timeout=60)


def usage_row(server, request_id):
    store = Store(server.env["VIBE_DB_URL"], upgrade=False)
    try:
        [row] = [r for r in store.usage_rows(limit=1000) if r["request_id"] == request_id]
    finally:
        store.close()
    return row


def test_a_thinking_budget_ends_the_thinking_and_an_answer_follows(endless):
    completion = client_of(endless).chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=400, extra_body={"thinking_token_budget": 40},
        extra_headers={"X-Request-ID": "budget-whole"})
    choice = completion.choices[0]
    assert choice.model_extra["thinking_ended_early"] == "budget" and choice.finish_reason == "length"
    assert choice.message.content and "</think>" not in choice.message.content  # the answer part, after the tag
    assert "Considering the limited time" in choice.message.model_extra["reasoning_content"]
    details = completion.usage.completion_tokens_details
    forced = details.model_extra["forced_tokens"]
    assert forced > 0 and details.reasoning_tokens >= 40 + forced - 2  # the budget, then the closing (its "\n\n"
    # after the tag is the answer's)
    assert completion.usage.completion_tokens <= details.reasoning_tokens + 2 + ANSWER_TOKENS
    row = usage_row(endless, "budget-whole")
    assert (row["forced_tokens"], row["completion_tokens"]) == (forced, completion.usage.completion_tokens)


def test_a_streamed_answer_shows_the_forced_tag_once(endless):
    stream = client_of(endless).chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=300, stream=True, stream_options={"include_usage": True},
        extra_body={"reasoning_effort": "none", "reasoning_format": "none"})
    content, ending, usage = "", None, None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            content += choice.delta.content or ""
            ending = choice if choice.finish_reason else ending
    assert content.count("</think>") == 1 and content.index("</think>") < len(content) - 1
    assert ending.model_extra["thinking_ended_early"] == "budget"
    assert usage.completion_tokens_details.model_extra["forced_tokens"] > 0
    split = client_of(endless).chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=300, stream=True, extra_body={"reasoning_effort": "none"})
    kinds = [("reasoning" if (c.delta.model_extra or {}).get("reasoning_content") else "content")
             for chunk in split for c in chunk.choices if c.delta.content or (c.delta.model_extra or {}).get(
                 "reasoning_content")]
    assert kinds and kinds == sorted(kinds, key=lambda kind: kind == "content")  # the thinking, then the answer
    assert "content" in kinds and "reasoning" in kinds


def test_predict_ends_a_thinking_that_would_leave_no_room_for_its_answer(endless):
    body = endless.post("/v1/predict", {"question": "Count the primes below 100.", "max_new_tokens": 100}).json()
    assert body["thinking_ended_early"] == "length" and body["finish_reason"] == "length"
    assert body["answer"] and body["reasoning"] and body["usage"]["completion_tokens"] == 100
    assert body["usage"]["forced_tokens"] > 0


def test_a_batch_line_ends_its_thinking_by_its_budget(endless):
    client = client_of(endless)
    line = {"custom_id": "l0", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": QUESTION, "max_tokens": 300, "thinking_token_budget": 20}}
    uploaded = client.files.create(file=("t.jsonl", jsonl([line])), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    finished, _ = wait(client, batch.id)
    [output] = [json.loads(text) for text in client.files.content(finished.output_file_id).text.splitlines()]
    choice = output["response"]["body"]["choices"][0]
    assert choice["thinking_ended_early"] == "budget" and choice["message"]["content"]


def test_bad_budgets_and_choices_are_refused_by_name(endless):
    for body, param in [({"thinking_token_budget": -1}, "thinking_token_budget"),
                        ({"reasoning_effort": "extreme"}, "reasoning_effort"), ({"n": 9}, "n"), ({"n": 0}, "n"),
                        ({"top_logprobs": 3}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs")]:
        response = endless.post("/v1/chat/completions", {"model": MODEL, "messages": QUESTION, **body})
        assert response.status_code == 400 and response.json()["error"]["param"] == param, (body, response.text)


def test_n_choices_sample_apart_and_repeat_under_a_seed(server):
    # Two users: a seeded answer is cached per user, so the second run is computed again, not replayed.
    first, second = (client_of(server, user_token(server, name)) for name in ("sampler-a", "sampler-b"))
    asked = dict(model=MODEL, messages=QUESTION, max_tokens=12, n=4, temperature=1.0, seed=11)
    one = first.chat.completions.create(**asked)
    assert [c.index for c in one.choices] == [0, 1, 2, 3]
    texts = [c.message.content + (c.message.model_extra.get("reasoning_content") or "") for c in one.choices]
    assert len(set(texts)) > 1  # sampled apart
    again = second.chat.completions.create(**asked)
    assert [c.message.content for c in again.choices] == [c.message.content for c in one.choices]
    streamed, finished = {}, []
    for chunk in second.chat.completions.create(**asked, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "") + (
                (choice.delta.model_extra or {}).get("reasoning_content") or "")
            if choice.finish_reason:
                assert choice.index not in finished  # each choice's last chunk once, as it ends
                finished.append(choice.index)
    assert sorted(streamed) == sorted(finished) == [0, 1, 2, 3]
    assert 12 < one.usage.completion_tokens <= 4 * 12  # every choice's tokens, the prompt's once


def test_logprobs_come_in_openai_shape(server):
    client = client_of(server)
    completion = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, temperature=0,
                                                logprobs=True, top_logprobs=3)
    logprobs = completion.choices[0].logprobs
    entries = list(logprobs.content)
    assert logprobs.model_extra["reasoning_content"] == []  # this model's answer has no thinking
    assert len(entries) == completion.usage.completion_tokens
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.logprob  # greedy: the chosen one is the best
        assert entry.top_logprobs[0].token == entry.token
    streamed = []
    for chunk in client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, temperature=0,
                                                logprobs=True, top_logprobs=3, stream=True):
        for choice in chunk.choices:
            if choice.logprobs is not None:
                streamed += [e.token for e in choice.logprobs.content or []]
    assert sorted(streamed) == sorted(e.token for e in entries)


def test_the_thinkings_log_probabilities_come_apart_from_the_answers(endless):
    completion = client_of(endless).chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=100, logprobs=True, extra_body={"thinking_token_budget": 30})
    logprobs = completion.choices[0].logprobs
    thinking, answer = logprobs.model_extra["reasoning_content"], logprobs.content
    assert len(thinking) == completion.usage.completion_tokens_details.reasoning_tokens
    assert len(thinking) + len(answer) == completion.usage.completion_tokens
    assert "".join(entry["token"] for entry in thinking).startswith("<think>")
    assert "".join(entry["token"] for entry in thinking).endswith("</think>")


def test_the_vote_counts_equal_answers_together():
    checker = Checker(timeout_s=5)
    try:
        state = type("State", (), {"checker": checker})()
        vote = shapes.vote(state, ["3", "\\frac{1}{2}", None, "0.5", "1/2", "3"])
        assert vote == {"final_answer": "\\frac{1}{2}", "share": 0.5, "choices": [1, 3, 4], "answered": 5}
        assert shapes.vote(state, [None, None])["final_answer"] is None
    finally:
        checker.close()


def test_a_vote_over_n_choices_comes_with_the_answer(endless):
    completion = client_of(endless).chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=200, n=3, extra_body={"vote": True, "thinking_token_budget": 10})
    vote = completion.model_extra["vote"]
    assert set(vote) == {"final_answer", "share", "choices", "answered"} and len(completion.choices) == 3
    assert all(c.model_extra["thinking_ended_early"] == "budget" for c in completion.choices)
