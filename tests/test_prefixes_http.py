"""The prefix cache through real gunicorn and the official openai client: cached_tokens in chat, streams and
/predict, the usage row, /metrics and /readyz, and the user scope that keeps one user's prompts apart from
another's."""


import openai
import pytest
import requests

from auth.store import Store
from service.inference.prefixes import BLOCK
from tests.support.batches import MODEL
from tests.support.metrics import counter
from tests.support.tokens import user_token

pytestmark = pytest.mark.slow
DOCUMENT = "A contract. " + " ".join(f"Clause {i}: lot {i} ships in {i % 9 + 1} days." for i in range(50))


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(VIBE_PREFIX_CACHE_SCOPE="user")


def client_of(server, token=None):
    return openai.OpenAI(base_url=server.url("/v1"), api_key=token or server.token, max_retries=0, timeout=60)


def ask(client, question, **kwargs):
    return client.chat.completions.create(model=MODEL, max_tokens=4, temperature=0, messages=[
        {"role": "user", "content": f"{DOCUMENT}\n\n{question}"}], **kwargs)


def test_a_second_question_on_a_document_reads_it_from_the_prefix_cache(server):
    client = client_of(server)
    hits, prefilled = counter(server, "vibethinker_prefix_cache_tokens_total", outcome="hit"), \
        counter(server, "vibethinker_prefill_tokens_total")
    first = ask(client, "Which lot ships first?", extra_headers={"X-Request-ID": "prefix-first"})
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    second = ask(client, "And which ships last?", extra_headers={"X-Request-ID": "prefix-second"})
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached % BLOCK == 0 and second.usage.prompt_tokens - BLOCK - 16 <= cached < second.usage.prompt_tokens
    assert counter(server, "vibethinker_prefix_cache_tokens_total", outcome="hit") - hits == cached
    assert counter(server, "vibethinker_prefill_tokens_total") - prefilled == \
        first.usage.prompt_tokens + second.usage.prompt_tokens - cached
    store = Store(server.env["VIBE_DB_URL"], upgrade=False)
    try:
        rows = {r["request_id"]: r for r in store.usage_rows(limit=1000)}
    finally:
        store.close()
    assert (rows["prefix-first"]["cached_tokens"], rows["prefix-second"]["cached_tokens"]) == (0, cached)
    stream = ask(client, "And which ships last?", stream=True, stream_options={"include_usage": True})
    usage = [chunk.usage for chunk in stream if chunk.usage is not None][-1]
    assert cached <= usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens  # its own prompt, asked before
    [model] = requests.get(server.url("/readyz"), timeout=10).json()["models"]
    prefixes = model["kv_cache"]["prefixes"]
    assert prefixes["blocks"] >= cached // BLOCK and prefixes["bytes"] <= prefixes["bound"]
    assert prefixes["block_tokens"] == BLOCK


def test_predict_says_its_cached_tokens_too(server):
    body = {"question": f"{DOCUMENT}\n\nWhich clause names lot 7?", "max_new_tokens": 2, "temperature": 0}
    first = requests.post(server.url("/predict"), headers=server.auth(), json=body, timeout=60).json()["usage"]
    body["question"] = f"{DOCUMENT}\n\nWhich clause names lot 8?"
    second = requests.post(server.url("/predict"), headers=server.auth(), json=body, timeout=60).json()["usage"]
    assert second["cached_tokens"] >= max(first["cached_tokens"], 4 * BLOCK)
    assert second["cached_tokens"] < second["prompt_tokens"]
    assert second["prompt_tokens_details"] == {"cached_tokens": second["cached_tokens"]}  # OpenAI's place too


def test_under_the_user_scope_another_users_same_prompt_reads_nothing_of_it(server):
    ask(client_of(server), "Which lot ships in 3 days?")
    other = client_of(server, user_token(server, "prefix-other"))
    assert ask(other, "Which lot ships in 3 days?").usage.prompt_tokens_details.cached_tokens == 0
    assert ask(other, "Which lot ships in 5 days?").usage.prompt_tokens_details.cached_tokens > 0
