"""The thinking apart from the answer, through real gunicorn and the real engine.

The demo model's reply is forced (settings.forced_output: tests.support.thinking): every prefill and decode
step runs, only the token chosen is known in advance, so what the service makes of a reply with a thinking
and a boxed answer is checked against text we wrote. The official openai client reads the fields unmodified.
"""

import time

import openai
import pytest
import requests

from tests.support.thinking import ANSWER, FORCED, QUESTION, THOUGHT

pytestmark = pytest.mark.slow
MESSAGES = [{"role": "user", "content": QUESTION}]


@pytest.fixture(scope="module")
def client(thinking_server):
    with openai.OpenAI(base_url=thinking_server.url("/v1"), api_key=thinking_server.token, max_retries=0,
                       timeout=60) as opened:  # closed at the module's end: no socket left for the collector
        yield opened


def test_a_whole_chat_answer_splits_the_thinking_from_the_answer(client):
    completion = client.chat.completions.create(model="VibeThinker-1.5B", messages=MESSAGES, max_tokens=200)
    message = completion.choices[0].message
    assert message.content == ANSWER
    assert message.model_extra["reasoning_content"] == message.model_extra["reasoning"] == THOUGHT
    assert message.model_extra["final_answer"] == "x=3"
    assert completion.choices[0].finish_reason == "stop"
    details = completion.usage.completion_tokens_details
    assert 0 < details.reasoning_tokens < completion.usage.completion_tokens


def test_a_streamed_answer_sends_the_thinking_then_the_answer_and_never_cuts_a_tag(client):
    stream = client.chat.completions.create(model="VibeThinker-1.5B", messages=MESSAGES, max_tokens=200,
                                            stream=True, stream_options={"include_usage": True})
    reasoning, content, usage, ending = [], [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            extra = choice.delta.model_extra or {}
            if extra.get("reasoning_content"):
                assert extra["reasoning"] == extra["reasoning_content"] and not choice.delta.content
                assert not content, "thinking after the answer began"
                reasoning.append(extra["reasoning_content"])
            if choice.delta.content:
                content.append(choice.delta.content)
            if choice.finish_reason:
                ending = choice
    assert "".join(reasoning) == THOUGHT and "".join(content) == ANSWER
    assert len(reasoning) > 3 and len(content) > 3  # token by token, not one piece
    assert not any("<" in piece or "think" in piece for piece in reasoning + content if "\\boxed" not in piece)
    assert ending.delta.model_extra["final_answer"] == "x=3"
    whole = client.chat.completions.create(model="VibeThinker-1.5B", messages=MESSAGES, max_tokens=200)
    assert usage.completion_tokens_details.reasoning_tokens == whole.usage.completion_tokens_details.reasoning_tokens


def test_reasoning_format_none_keeps_the_raw_text_and_its_tags_whole(client):
    stream = client.chat.completions.create(model="VibeThinker-1.5B", messages=MESSAGES, max_tokens=200,
                                            stream=True, extra_body={"reasoning_format": "none"})
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == FORCED
    edges = {sum(len(piece) for piece in pieces[:i]) for i in range(len(pieces) + 1)}
    for tag in ("<think>", "</think>"):  # each tag whole, in one piece
        start = FORCED.index(tag)
        assert not edges & set(range(start + 1, start + len(tag))), pieces
    whole = client.chat.completions.create(model="VibeThinker-1.5B", messages=MESSAGES, max_tokens=200,
                                           extra_body={"reasoning_format": "none"})
    assert whole.choices[0].message.content == FORCED
    assert "reasoning_content" not in whole.choices[0].message.model_extra


def test_a_thinking_cut_by_length_is_all_reasoning(client):
    completion = client.chat.completions.create(model="VibeThinker-1.5B", messages=MESSAGES, max_tokens=6)
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "length" and message.content == ""
    assert THOUGHT.startswith(message.model_extra["reasoning"]) and message.model_extra["final_answer"] is None
    assert completion.usage.completion_tokens_details.reasoning_tokens == completion.usage.completion_tokens == 6


def test_predict_gives_the_reasoning_the_answer_and_the_final_answer(thinking_server):
    body = thinking_server.post("/v1/predict", {"question": QUESTION, "max_new_tokens": 200}).json()
    assert body["response"] == FORCED
    assert (body["reasoning"], body["answer"], body["final_answer"]) == (THOUGHT, ANSWER, "x=3")
    assert "correct" not in body


@pytest.mark.parametrize("expected,correct", [("x=3", True), ("3", True), ("x = 3", True), ("4", False),
                                              ("x=4", False)])
def test_an_expected_answer_is_checked(thinking_server, expected, correct):
    body = thinking_server.post("/predict", {"question": QUESTION, "max_new_tokens": 200,
                                             "expected_answer": expected}).json()
    assert body["correct"] is correct and "correct_reason" not in body


def test_a_hostile_expected_answer_is_answered_within_its_time_limit(thinking_server, client):
    started = time.monotonic()
    body = thinking_server.post("/v1/predict", {"question": QUESTION, "max_new_tokens": 200,
                                                "expected_answer": "9^{9^{9^{9^{9}}}}"}).json()
    assert time.monotonic() - started < 15  # the check's 2 s, the generation, a process started again
    assert body["correct"] is None and "within 2 s" in body["correct_reason"]
    completion = client.chat.completions.create(model="VibeThinker-1.5B", messages=MESSAGES, max_tokens=200,
                                                extra_body={"expected_answer": "3"})
    assert completion.choices[0].message.model_extra["correct"] is True  # the checker works again after it


def test_the_fields_openai_clients_send_by_default_are_accepted(client):
    completion = client.chat.completions.create(
        model="VibeThinker-1.5B", messages=MESSAGES, max_tokens=200, presence_penalty=0, frequency_penalty=0,
        logprobs=False, store=False, metadata={"run": "t"}, parallel_tool_calls=False, service_tier="auto")
    assert completion.choices[0].message.content == ANSWER


def test_a_penalty_is_refused_by_name(thinking_server):
    response = thinking_server.post("/v1/chat/completions", {"model": "VibeThinker-1.5B", "messages": MESSAGES,
                                                             "presence_penalty": 0.5})
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["param"], error["code"], error["type"]) == ("presence_penalty", "unsupported_value",
                                                              "invalid_request_error")
    assert error["message"].startswith("presence_penalty must be 0")


def test_a_predict_form_checks_its_expected_answer_too(thinking_server):
    fields = {"question": QUESTION, "max_new_tokens": "200", "expected_answer": "3"}
    response = requests.post(thinking_server.url("/v1/predict"), headers=thinking_server.auth(),
                             files={name: (None, value) for name, value in fields.items()}, timeout=60)
    body = response.json()
    assert response.status_code == 200 and (body["final_answer"], body["correct"]) == ("x=3", True), body
