"""The official openai client against real gunicorn: answers, streams, stops, errors, disconnects."""

import json
import threading
import time

import openai
import pytest
import requests

from auth.store import Store
from tests.support.reference import greedy, long_messages

MODEL = "VibeThinker-1.5B"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 6 * 7?"}]


@pytest.fixture(scope="module")
def chat_server(start_server):
    return start_server(VIBE_STREAM_KEEPALIVE_S=0.2)


CLIENTS = []


@pytest.fixture(autouse=True)
def close_clients():
    yield
    while CLIENTS:
        CLIENTS.pop().close()


def client(server, token=None):
    made = openai.OpenAI(base_url=server.url("/v1"), api_key=token or server.token, max_retries=0, timeout=60)
    CLIENTS.append(made)
    return made


def stream_text(server, **kwargs):
    chunks = list(client(server).chat.completions.create(model=MODEL, stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    usage = [c.usage for c in chunks if c.usage]
    return text, finish, usage


def test_streamed_and_whole_answers_match_in_process_greedy(chat_server, reference):
    whole = client(chat_server).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24,
                                                        temperature=0)
    text, ids = greedy(reference, MESSAGES, 24)
    assert whole.choices[0].message.content == text and whole.choices[0].message.role == "assistant"
    assert whole.model == MODEL and whole.object == "chat.completion"
    assert whole.usage.prompt_tokens == len(reference.encode_chat(MESSAGES))
    assert whole.usage.completion_tokens == len(ids)
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + len(ids)
    cached = whole.usage.prompt_tokens_details.cached_tokens  # where the official client reads it
    assert isinstance(cached, int) and 0 <= cached <= whole.usage.prompt_tokens
    streamed, finish, usage = stream_text(chat_server, messages=MESSAGES, max_tokens=24, temperature=0,
                                          stream_options={"include_usage": True})
    assert streamed == text and finish == [whole.choices[0].finish_reason]
    assert usage[0].completion_tokens == len(ids) and usage[0].prompt_tokens == whole.usage.prompt_tokens
    cached = usage[0].prompt_tokens_details.cached_tokens
    assert isinstance(cached, int) and 0 <= cached <= usage[0].prompt_tokens


def test_max_completion_tokens_and_seeded_sampling(chat_server):
    openai_client = client(chat_server)

    def sample(seed):
        return openai_client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=12,
                                                     temperature=1.0, top_p=0.9, seed=seed)

    first, again = sample(7), sample(7)
    assert first.usage.completion_tokens <= 12
    assert first.choices[0].message.content == again.choices[0].message.content


def test_stop_sequences_cut_the_text(chat_server, reference):
    text, _ = greedy(reference, MESSAGES, 40)
    stop = text[12:15]
    assert stop.strip() and text.find(stop) >= 12
    expected = text[:text.find(stop)]
    whole = client(chat_server).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=40,
                                                        temperature=0, stop=[stop, "never-appears"])
    assert whole.choices[0].message.content == expected and whole.choices[0].finish_reason == "stop"
    streamed, finish, _ = stream_text(chat_server, messages=MESSAGES, max_tokens=40, temperature=0, stop=stop)
    assert streamed == expected and finish == ["stop"]


def test_models_list(chat_server):
    models = client(chat_server).models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client(chat_server).models.retrieve(MODEL).id == MODEL


def test_errors_raise_the_right_exception_classes(chat_server):
    ok = dict(model=MODEL, messages=MESSAGES, max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        client(chat_server, "not-a-token").chat.completions.create(**ok)
    with pytest.raises(openai.BadRequestError) as bad:
        client(chat_server).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=0)
    assert bad.value.body["param"] == "max_tokens"  # the SDK hands over the error object
    with pytest.raises(openai.BadRequestError) as bad:
        client(chat_server).chat.completions.create(**ok, n=9)  # past max_n
    assert bad.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError):
        client(chat_server).chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "x"}])
    with pytest.raises(openai.NotFoundError):
        client(chat_server).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    chat_server.cli("users", "add", "adm-only", "--admin")
    admin_token = chat_server.cli("tokens", "issue", "adm-only", "--scope", "admin").stdout.strip().splitlines()[-1]
    with pytest.raises(openai.PermissionDeniedError):
        client(chat_server, admin_token).chat.completions.create(**ok)
    chat_server.cli("users", "add", "one-shot", "--rate-limit", "1/minute")
    token = chat_server.cli("tokens", "issue", "one-shot").stdout.strip().splitlines()[-1]
    client(chat_server, token).chat.completions.create(**ok)
    with pytest.raises(openai.RateLimitError):
        client(chat_server, token).chat.completions.create(**ok)


def test_a_disconnected_stream_stops_consuming_compute(chat_server, long_question):
    body = {"model": MODEL, "messages": long_messages(long_question), "max_tokens": 2048,
            "temperature": 0, "stream": True}
    response = requests.post(chat_server.url("/v1/chat/completions"), json=body, stream=True, timeout=60,
                             headers={**chat_server.auth(), "X-Request-ID": "gone-client"})
    lines = response.iter_lines()
    received = [next(lines) for _ in range(12)]  # a few chunks arrived: it is generating
    assert any(line.startswith(b"data: ") for line in received)
    response.raw._fp.fp.raw._sock.close()  # the client goes away mid-stream
    response.close()
    deadline = time.monotonic() + 5
    while requests.get(chat_server.url("/readyz"), timeout=5).json()["running"]:
        assert time.monotonic() < deadline, "generation kept running after the client left"
        time.sleep(0.05)
    time.sleep(0.3)
    store = Store(chat_server.env["VIBE_DB_URL"], upgrade=False)
    [row] = [r for r in store.usage_rows("root") if r["request_id"] == "gone-client"]
    store.close()
    assert row["status"] == 499 and 0 < row["completion_tokens"] < 2048


def test_keep_alive_while_waiting_and_error_mid_stream(start_server, long_question):
    # One row at a time, so the stream waits in the queue behind the busy request.
    server = start_server(VIBE_STREAM_KEEPALIVE_S=0.2, VIBE_REQUEST_DEADLINE_S=1.5, VIBE_STREAM_DEADLINE_S=1.5,
                          VIBE_MAX_BATCH_SIZE=1)
    long_body = {"model": MODEL, "messages": long_messages(long_question), "max_tokens": 2048,
                 "temperature": 0}
    busy = threading.Thread(target=lambda: server.post("/v1/chat/completions", long_body))
    busy.start()
    while requests.get(server.url("/readyz"), timeout=5).json()["running"] < 1:
        time.sleep(0.01)
    response = requests.post(server.url("/v1/chat/completions"), json={**long_body, "stream": True},
                             headers=server.auth(), stream=True, timeout=60)
    lines = [line for line in response.iter_lines() if line]
    busy.join()
    assert b": keep-alive" in lines  # it waited in the queue, and said so
    events = [json.loads(line[6:]) for line in lines if line.startswith(b"data: {")]
    assert events[-1]["error"]["code"] == "deadline_exceeded" and lines[-1] == b"data: [DONE]"
