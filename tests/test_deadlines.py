"""Deadlines that fit the hardware: the measured speed sizes whole answers; streams have their own deadline."""

import json
import time

import pytest
import requests

from service.inference.speed import DecodeSpeed
from tests.support.reference import long_messages

MODEL = "VibeThinker-1.5B"
DEADLINE_S = 1.0


def test_speed_is_unknown_until_measured_then_never_optimistic():
    speed = DecodeSpeed()
    assert speed.per_row(1) is None and speed.tokens_within(10, 1) is None
    speed.observe_step(1, 0.01)
    speed.observe_step(4, 0.02)
    assert speed.per_row(1) == pytest.approx(100)
    assert speed.per_row(3) == pytest.approx(50)  # the nearest larger batch measured: 4 rows
    assert speed.per_row(8) == pytest.approx(25)  # past the largest measured: the step grows in proportion
    speed.observe_prefill(100, 0.5)  # 5 ms a prompt token
    assert speed.tokens_within(2.0, 1, prompt_tokens=100) == 150  # (2 s - 0.5 s prefill) x 100 tokens/s
    for _ in range(50):
        speed.observe_step(1, 0.02)  # the machine got slower: the average follows
    assert speed.per_row(1) == pytest.approx(50, rel=0.01)


def test_a_step_costs_more_with_the_context_it_reads_and_sizing_counts_that_it_grows():
    speed = DecodeSpeed()
    speed.calibrate(1e-6)  # a first guess, as the engine's measurement at load gives
    for step in range(600):  # 5 ms a row a step plus 2 us a cached token: the regression finds the 2 us
        rows = (1, 2, 4)[step % 3]  # more rows hold more context and cost more for their own sake too
        context = rows * (100 + 20 * step)
        speed.observe_step(rows, 0.005 * rows + 2e-6 * context, context)
    assert speed.per_token == pytest.approx(2e-6, rel=0.02)
    assert speed.step_seconds(2) == pytest.approx(0.010, rel=0.02)
    assert speed.step_seconds(4) == pytest.approx(0.020, rel=0.02)
    assert speed.per_row(2, 20000) == pytest.approx(1 / 0.050, rel=0.02)
    # every step of a request reads more context (both rows gain a token): fewer fit than the first step says
    fit = speed.tokens_within(10.0, 2, context=5000)
    assert fit < 10.0 / speed.step_seconds(2, 5000)

    def steps(n):
        return sum(speed.step_seconds(2, 5000 + 2 * i) for i in range(n))

    assert steps(fit) <= 10.0 < steps(fit + 2)


@pytest.fixture(scope="module")
def sized(start_server):
    server = start_server(VIBE_REQUEST_DEADLINE_S=DEADLINE_S, VIBE_DEFAULT_MAX_NEW_TOKENS=2048)
    warm = server.post("/predict", {"question": "hi", "max_new_tokens": 64, "temperature": 0})
    assert warm.status_code == 200
    return server


def test_readyz_and_metrics_show_the_measured_speed(sized):
    ready = requests.get(sized.url("/readyz"), timeout=10).json()
    assert ready["decode_tokens_per_s"] > 0 and ready["decode_batch_size"] == 1
    metrics = requests.get(sized.url("/metrics"), timeout=10).text
    [line] = [l for l in metrics.splitlines() if l.startswith('vibethinker_decode_tokens_per_second{model="VibeThinker-1.5B"} ')]
    assert float(line.split()[1]) > 0


def test_asking_for_more_than_fits_is_a_400_at_once(sized, long_question):
    started = time.monotonic()
    response = sized.post("/predict", {"question": long_question, "max_new_tokens": 2048, "temperature": 0})
    assert time.monotonic() - started < DEADLINE_S / 2  # refused before any compute
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "exceeds_deadline" and error["param"] == "max_new_tokens"
    fit = int(error["message"].split("at most ")[1].split()[0])
    assert 0 < fit < 2048 and "stream" in error["message"]
    # What fits, finishes.
    answer = sized.post("/predict", {"question": long_question, "max_new_tokens": max(1, fit // 2),
                                     "temperature": 0})
    assert answer.status_code == 200 and answer.json()["finish_reason"] == "length"
    chat = sized.post("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                               "max_completion_tokens": 2048})
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "max_completion_tokens"


def test_a_request_that_asks_nothing_gets_what_fits(sized, long_question):
    started = time.monotonic()
    response = sized.post("/predict", {"question": long_question, "temperature": 0})
    assert response.status_code == 200, response.text  # not a 504 after a second of compute thrown away
    body = response.json()
    assert body["finish_reason"] == "length" and 0 < body["usage"]["completion_tokens"] < 2048
    assert time.monotonic() - started < DEADLINE_S + 0.5  # the deadline, and a margin for a busy machine


def test_a_length_the_server_chose_ends_as_length_even_if_the_speed_was_unknown(start_server, long_question):
    # A fresh server has measured nothing, so the default (2048 tokens, seconds of work) is not lowered:
    # the deadline cuts it, and the answer is what was computed, as "length", not a 504.
    # Speculation off, and 2,048 tokens asked for below: with the engine's own layer loop the demo model made
    # 1,000 tokens within the half second that this test needs them not to fit (and 4 a step speculating).
    fresh = start_server(VIBE_REQUEST_DEADLINE_S=0.5, VIBE_DEFAULT_MAX_NEW_TOKENS=2048, VIBE_SPECULATE="off")
    response = fresh.post("/predict", {"question": long_question, "temperature": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["finish_reason"] == "length" and 0 < body["usage"]["completion_tokens"] < 2048
    assert body["response"]
    chat = fresh.post("/v1/chat/completions", {"model": MODEL, "messages": long_messages(long_question),
                                               "temperature": 0})
    assert chat.status_code == 200 and chat.json()["choices"][0]["finish_reason"] == "length"
    # Asked for explicitly, the length is the client's: a cut is still the deadline's 504.
    asked = fresh.post("/predict", {"question": long_question, "max_new_tokens": 2048, "temperature": 0})
    assert asked.status_code in (400, 504), asked.text
    assert asked.json()["error"]["code"] in ("exceeds_deadline", "deadline_exceeded")


def test_a_stream_runs_past_the_whole_answer_deadline(sized, long_question):
    body = {"model": MODEL, "messages": long_messages(long_question), "max_tokens": 2048,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    started = time.monotonic()
    response = sized.post("/v1/chat/completions", body, stream=True)
    events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith(b"data: {")]
    assert time.monotonic() - started > DEADLINE_S
    assert events[-1]["usage"]["completion_tokens"] == 2048
    assert events[-2]["choices"][0]["finish_reason"] == "length"
