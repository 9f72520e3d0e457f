"""/predict over real HTTP against real gunicorn: answers, usage, finish reasons, errors."""

import pytest

from service.settings import Settings
from tests.support.reference import greedy

QUESTIONS = ["What is 2+2?", "Prove that sqrt(2) is irrational.", "héllo wörld ✓ 日本", "def f(x): return x"]


@pytest.mark.parametrize("path", ["/predict", "/v1/predict"])
@pytest.mark.parametrize("question", QUESTIONS)
def test_answer_equals_in_process_greedy_generate(server, reference, path, question):
    response = server.post(path, {"question": question, "temperature": 0, "max_new_tokens": 24})
    assert response.status_code == 200, response.text
    body = response.json()
    system_prompt = Settings().default_system_prompt
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}]
    text, new_ids = greedy(reference, messages, 24)
    assert body["response"] == text
    assert body["input"] == question and body["system_prompt"] == system_prompt
    assert body["success"] is True and body["model"] == "VibeThinker-1.5B" and body["id"]
    prompt_tokens = len(reference.encode_chat(messages))
    cached = body["usage"].pop("cached_tokens")  # the prefix cache's share: an earlier prompt may have begun so
    assert isinstance(cached, int) and 0 <= cached < prompt_tokens
    assert body["usage"].pop("prompt_tokens_details") == {"cached_tokens": cached}  # where OpenAI has it too
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": len(new_ids),
                             "total_tokens": prompt_tokens + len(new_ids), "forced_tokens": 0}
    assert body["thinking_ended_early"] is None
    assert body["finish_reason"] == ("stop" if new_ids[-1] in reference.eos_ids else "length")


def test_custom_system_prompt_goes_through_the_chat_template(server, reference):
    body = server.post("/predict", {"question": "2+2?", "system_prompt": "Answer tersely.",
                                    "temperature": 0, "max_new_tokens": 16}).json()
    messages = [{"role": "system", "content": "Answer tersely."}, {"role": "user", "content": "2+2?"}]
    assert body["response"] == greedy(reference, messages, 16)[0]
    assert body["usage"]["prompt_tokens"] == len(reference.encode_chat(messages))


def test_empty_system_prompt_means_none(server, reference):
    body = server.post("/predict", {"question": "2+2?", "system_prompt": "",
                                    "temperature": 0, "max_new_tokens": 16}).json()
    messages = [{"role": "user", "content": "2+2?"}]
    assert body["response"] == greedy(reference, messages, 16)[0]


def test_finish_reason_stop_when_the_model_ends_its_reply(server, reference):
    system_prompt = Settings().default_system_prompt
    for question in ["a", "b", "c", "Write a long essay.", "x", "y", "z", "ok", "why?", "42"]:
        messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}]
        text, new_ids = greedy(reference, messages, 600)
        if new_ids[-1] in reference.eos_ids:
            break
    else:
        pytest.fail("no candidate question ends with an end token within 600 tokens")
    body = server.post("/predict", {"question": question, "temperature": 0, "max_new_tokens": 600}).json()
    assert body["finish_reason"] == "stop"
    assert body["response"] == text
    assert body["usage"]["completion_tokens"] == len(new_ids)


def test_sampling_parameters_are_accepted_and_bounded(server):
    body = server.post("/predict", {"question": "hi", "temperature": 1.3, "top_p": 0.5, "max_new_tokens": 5}).json()
    assert body["success"] is True
    assert body["usage"]["completion_tokens"] <= 5


def test_request_id_is_echoed_or_generated(server):
    given = server.post("/predict", {"question": "hi", "max_new_tokens": 1}, headers={"X-Request-ID": "abc-123"})
    assert given.headers["X-Request-ID"] == "abc-123"
    spoofed = server.post("/predict", {"question": "hi", "max_new_tokens": 1}, headers={"X-Request-ID": "a b\tc"})
    assert spoofed.headers["X-Request-ID"] != "a b\tc" and len(spoofed.headers["X-Request-ID"]) == 32


def test_health_and_readiness(server):
    import requests

    assert requests.get(server.url("/healthz"), timeout=5).json() == {"status": "ok"}
    ready = requests.get(server.url("/readyz"), timeout=5).json()
    assert ready["status"] == "ready" and ready["model"] == "VibeThinker-1.5B"
