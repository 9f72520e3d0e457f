"""One pass a step for decode rows and prompt pieces, the prefix cache, and forks reading their lead's prompt:
on the real tiny model, every answer equal token for token to transformers' own greedy generate."""

import time

import pytest
import torch
from prometheus_client import REGISTRY

from service.inference import kvcache
from service.inference.batching import Batch
from service.inference.generation import Generation, GenerationRequest
from service.inference.prefixes import BLOCK, PrefixStore
from tests.support.reference import decode_to_the_end, greedy

DOCUMENT = "Read this document with care. " + " ".join(f"Line {i}: the value of x{i} is {i * 7 % 13}."
                                                       for i in range(60))


def _messages(question, document=DOCUMENT):
    return [{"role": "user", "content": f"{document}\n\n{question}"}]


def _handle(loaded, messages, max_new=12, scope="", n=1):
    ids = loaded.encode_chat(messages)
    return Generation(GenerationRequest(ids, max_new, deadline=time.monotonic() + 120, prefix_scope=scope, n=n))


def _batch(loaded, blocks=1000, revision="rev"):
    memory = kvcache.CacheMemory(loaded.layout)
    store = PrefixStore(memory, blocks * BLOCK * loaded.layout.bytes_per_token, revision)
    return Batch(loaded, memory, store), store


def _counter(name, **labels):
    return REGISTRY.get_sample_value(name, {"model": "model", **labels}) or 0.0


def _run(batch, handles, budget=10_000):
    """Admit `handles`, run the batch to its end with `budget` prompt tokens a step; {id(handle): (ids, lead)}."""
    batch.admit(handles)
    leads = {id(row.handle): row for row in batch.filling}
    while batch.filling:
        batch.step(budget)
    ids = decode_to_the_end(batch)
    return {key: (ids[key], leads[key]) for key in ids}


def test_a_pass_carries_decode_rows_and_prompt_pieces_and_every_answer_is_as_alone(reference):
    batch, _ = _batch(reference, blocks=0)
    first_q, late_q = [{"role": "user", "content": "the row that runs"}], _messages("and a long prompt joins")
    running = _handle(reference, first_q, 80)
    batch.admit([running])
    batch.step(10_000)
    late = _handle(reference, late_q, 12)
    batch.admit([late])
    mixed = 0
    while batch.filling:  # each pass: the running row's next token and 32 prompt tokens of the late one
        [row] = batch.rows
        before = len(row.ids)
        assert batch.step(32) == min(32, len(late.request.prompt_ids) - (mixed * 32))
        assert len(row.ids) == before + 1
        mixed += 1
    assert mixed > 10
    answers = decode_to_the_end(batch)
    assert answers[id(running)] == greedy(reference, first_q, 80)[1]
    assert answers[id(late)] == greedy(reference, late_q, 12)[1]


def test_a_second_request_with_the_same_document_prefills_only_what_differs(reference):
    batch, store = _batch(reference)
    one, two = _messages("What is x3?"), _messages("What is x59, and why?")
    prefilled = _counter("vibethinker_prefill_tokens_total")
    hits = _counter("vibethinker_prefix_cache_tokens_total", outcome="hit")
    [(ids, lead)] = _run(batch, [_handle(reference, one)]).values()
    assert lead.cached == 0 and ids == greedy(reference, one, 12)[1]
    first = _handle(reference, one).request.prompt_ids
    assert _counter("vibethinker_prefill_tokens_total") - prefilled == len(first)
    [(ids, lead)] = _run(batch, [handle := _handle(reference, two)]).values()
    prompt = handle.request.prompt_ids
    same = next(i for i, (a, b) in enumerate(zip(first, prompt)) if a != b)
    assert lead.cached == same // BLOCK * BLOCK and lead.cached >= same - BLOCK + 1 and same > 4 * BLOCK
    assert _counter("vibethinker_prefill_tokens_total") - prefilled == len(first) + len(prompt) - lead.cached
    assert _counter("vibethinker_prefix_cache_tokens_total", outcome="hit") - hits == lead.cached
    assert ids == greedy(reference, two, 12)[1]
    assert batch.memory.reserved == 0 and batch.memory.held == store.bytes > 0


def test_requests_admitted_together_with_one_preamble_prefill_it_once(reference):
    batch, _ = _batch(reference)
    questions = [_messages(f"Question {i}: what is x{i * 11}?") for i in range(4)]
    handles = [_handle(reference, q) for q in questions]
    prefilled = _counter("vibethinker_prefill_tokens_total")
    answers = _run(batch, handles, budget=48)  # small pieces: the others wait for the first one's blocks
    leads = [answers[id(h)][1] for h in handles]
    assert leads[0].cached == 0 and all(lead.cached > 4 * BLOCK for lead in leads[1:])
    assert _counter("vibethinker_prefill_tokens_total") - prefilled == sum(
        len(h.request.prompt_ids) - lead.cached for h, lead in zip(handles, leads))
    for question, handle in zip(questions, handles):
        assert answers[id(handle)][0] == greedy(reference, question, 12)[1]


def test_a_bound_smaller_than_the_working_set_evicts_and_the_answers_stay_right(reference):
    batch, store = _batch(reference, blocks=3)
    evicted = _counter("vibethinker_prefix_cache_evictions_total")
    documents = [DOCUMENT.replace("Line", word) for word in ("Row", "Entry", "Item")]
    for _ in range(2):
        for document in documents:
            messages = _messages("What is x7?", document)
            [(ids, _)] = _run(batch, [_handle(reference, messages)]).values()
            assert ids == greedy(reference, messages, 12)[1]
            assert len(store) <= 3 and store.bytes <= store.bound
    assert _counter("vibethinker_prefix_cache_evictions_total") - evicted > 0


def test_prefixes_are_shared_within_a_scope_and_a_revision_only(reference):
    batch, store = _batch(reference)
    messages = _messages("What is x1?")
    _run(batch, [_handle(reference, messages, scope="user:1")])
    ids = reference.encode_chat(messages)
    assert store.found(store.keys(ids, "user:1")) == (len(ids) - 1) // BLOCK
    assert store.found(store.keys(ids, "user:2")) == store.found(store.keys(ids)) == 0
    other = PrefixStore(batch.memory, store.bound, "another revision")
    assert other.keys(ids, "user:1") != store.keys(ids, "user:1")
    [(_, lead)] = _run(batch, [_handle(reference, messages, scope="user:2")]).values()
    assert lead.cached == 0


def test_the_last_prompt_token_is_always_prefilled(reference):
    batch, store = _batch(reference)
    ids = list(range(3, 3 + 2 * BLOCK))  # two whole blocks: the second's last token is prefilled
    assert len(store.keys(ids)) == 1 and len(store.keys(ids + [5])) == 2


def test_eviction_takes_a_chains_tail_before_its_head_and_stores_what_was_evicted_again(reference):
    layout = reference.layout
    memory = kvcache.CacheMemory(layout)
    store = PrefixStore(memory, 3 * BLOCK * layout.bytes_per_token, "rev")
    ids = list(range(10, 10 + 4 * BLOCK + 1))
    cache = kvcache.RowCache(layout, len(ids))
    cache.keys.normal_()
    cache.values.normal_()
    cache.length = len(ids)
    keys = store.keys(ids)
    assert store.store(keys, cache) == 3 and len(store) == 3  # the fourth finds no room past its own chain
    other = kvcache.RowCache(layout, 2 * BLOCK)
    other.length = 2 * BLOCK
    store.store(store.keys(list(range(900, 900 + 2 * BLOCK + 1))), other)  # takes the tail: blocks 2, then 1
    assert store.found(keys) == 1
    assert store.store(keys, cache) == 3 and store.found(keys) == 3  # its cache still has them
    empty = kvcache.RowCache(layout, len(ids))
    assert store.load(keys, empty) == 3 * BLOCK == empty.length
    assert torch.equal(empty.keys[:, :, :3 * BLOCK], cache.keys[:, :, :3 * BLOCK])
    assert memory.held == store.bytes


def test_a_row_that_needs_the_room_takes_it_back_from_the_prefix_cache(reference):
    layout = reference.layout
    memory = kvcache.CacheMemory(layout, bound=4 * BLOCK * layout.bytes_per_token)
    store = PrefixStore(memory, 4 * BLOCK * layout.bytes_per_token, "rev")
    ids = list(range(10, 10 + 3 * BLOCK + 1))
    cache = memory.allocate(len(ids))
    cache.length = len(ids)
    assert store.store(store.keys(ids), cache) == 0  # the rows leave no room: nothing is held
    memory.release(cache)
    cache = kvcache.RowCache(layout, len(ids))
    cache.length = len(ids)
    assert store.store(store.keys(ids), cache) == 3 and memory.held == 3 * BLOCK * layout.bytes_per_token
    assert memory.fits(4 * BLOCK)  # the prefix cache gives way
    row = memory.allocate(2 * BLOCK)
    assert memory.reserved + memory.held <= memory.bound and len(store) == 2
    memory.release(row)


@pytest.mark.parametrize("short", [kvcache.SHORT, 0])
def test_forks_read_the_prompt_from_their_leads_cache_and_answer_as_alone(reference, monkeypatch, short):
    """Greedy choices all equal the reference, whether they attend together (short) or in place (two parts)."""
    monkeypatch.setattr(kvcache, "SHORT", short)
    batch, _ = _batch(reference)
    messages = _messages("Say it three times.")
    handle = _handle(reference, messages, 16, n=3)
    batch.admit([handle])
    while batch.filling:
        batch.step(10_000)
    rows = list(batch.rows)
    assert [row.index for row in rows] == [0, 1, 2]
    assert all(row.cache.shared is rows[0].cache for row in rows[1:])
    finished = []
    while batch.rows:
        batch.step()
        finished += batch.evict()
    expected = greedy(reference, messages, 16)[1]
    assert [row.ids for row in finished] == [expected] * 3
    assert batch.memory.reserved == 0


def test_a_lead_cache_is_given_back_only_after_its_forks_leave(reference):
    layout = reference.layout
    memory = kvcache.CacheMemory(layout)
    lead = memory.allocate(30)
    fork = memory.allocate(30, shared=lead, offset=20)
    assert memory.reserved == (30 + 10) * layout.bytes_per_token and fork.own == 10
    memory.release(lead)
    memory.release(lead)  # twice is once
    assert memory.reserved == 40 * layout.bytes_per_token
    memory.release(fork)
    assert memory.reserved == 0 and memory.depth() == (0, 0)
