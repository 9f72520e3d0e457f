"""Prompt-lookup speculation through real gunicorn and the official openai client: a reply that repeats itself
comes out whole and the same, streamed or not, with speculation on (auto, the default) and off, and /metrics
counts the drafts taken."""

import openai
import pytest

from tests.support.batches import MODEL
from tests.support.metrics import counter

pytestmark = pytest.mark.slow
REPLY = "the cat sat on the mat, " * 12 + "and then the dog sat on the mat too."
QUESTION = [{"role": "user", "content": "Where did the cat sit?"}]


@pytest.fixture(scope="module")
def servers(start_server):
    """The demo model made to reply REPLY (settings.forced_output: the engine runs every step, only its
    choice of token is forced), with speculation on and off."""
    return {mode: start_server(VIBE_FORCED_OUTPUT=REPLY, VIBE_SPECULATE=mode) for mode in ("auto", "off")}


def client_of(server):
    return openai.OpenAI(base_url=server.url("/v1"), api_key=server.token, max_retries=0, timeout=60)


def test_a_repeating_reply_is_the_same_with_and_without_speculation_and_its_drafts_are_counted(servers):
    on, off = servers["auto"], servers["off"]
    drafted = counter(on, "vibethinker_speculation_drafted_tokens_total")
    accepted = counter(on, "vibethinker_speculation_accepted_tokens_sum")
    steps = counter(on, "vibethinker_speculation_accepted_tokens_count")
    replies = {}
    for mode, server in servers.items():
        with client_of(server) as client:  # closed: an open connection's socket would warn when collected
            completion = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=200)
            with client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=200, stream=True,
                                                stream_options={"include_usage": True}) as stream:
                chunks = list(stream)
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
        replies[mode] = (completion.choices[0].message.content, completion.usage.completion_tokens,
                         completion.choices[0].finish_reason, streamed, chunks[-1].usage.completion_tokens)
    assert replies["auto"] == replies["off"]
    assert replies["auto"][0] == REPLY and replies["auto"][3] == REPLY and replies["auto"][2] == "stop"
    taken = counter(on, "vibethinker_speculation_accepted_tokens_sum") - accepted
    assert counter(on, "vibethinker_speculation_drafted_tokens_total") - drafted >= taken > 20
    assert counter(on, "vibethinker_speculation_accepted_tokens_count") - steps > 0
    assert counter(off, "vibethinker_speculation_drafted_tokens_total") == 0
