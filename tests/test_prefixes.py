"""One pass a step for decode rows and prompt pieces, the prefix cache, and forks reading their lead's prompt:
on the real tiny model, every answer equal token for token to transformers' own greedy generate."""

import time

import pytest
import torch
from prometheus_client import REGISTRY

from service.inference import kvcache, kvmemory
from service.inference.batching import Batch, PassError
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
    memory = kvmemory.CacheMemory(loaded.layout)
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
    other = PrefixStore(kvmemory.CacheMemory(reference.layout), store.bound, "another revision")
    assert other.keys(ids, "user:1") != store.keys(ids, "user:1")
    [(_, lead)] = _run(batch, [_handle(reference, messages, scope="user:2")]).values()
    assert lead.cached == 0


def test_the_last_prompt_token_is_always_prefilled(reference):
    batch, store = _batch(reference)
    ids = list(range(3, 3 + 2 * BLOCK))  # two whole blocks: the second's last token is prefilled
    assert len(store.keys(ids)) == 1 and len(store.keys(ids + [5])) == 2


def test_eviction_takes_a_chains_tail_before_its_head_and_stores_what_was_evicted_again(reference):
    layout = reference.layout
    memory = kvmemory.CacheMemory(layout)
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
    memory = kvmemory.CacheMemory(layout, bound=4 * BLOCK * layout.bytes_per_token)
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
    other = list(range(500, 500 + 2 * BLOCK + 1))  # a new prompt's blocks take the old ones' room
    assert store.store(store.keys(other), cache) == 2 and store.found(store.keys(ids)) == 0
    assert memory.reserved + memory.held == memory.bound
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
    memory = kvmemory.CacheMemory(layout)
    lead = memory.allocate(30)
    fork = memory.allocate(30, shared=lead, offset=20)
    assert memory.reserved == (30 + 10) * layout.bytes_per_token and fork.own == 10
    memory.release(lead)
    memory.release(lead)  # twice is once
    assert memory.reserved == 40 * layout.bytes_per_token
    memory.release(fork)
    assert memory.reserved == 0 and memory.depth() == (0, 0)


def test_a_follower_whose_blocks_find_no_room_starts_once_its_leader_is_past_them(reference):
    batch, store = _batch(reference, blocks=1)  # room for the first block only
    long_q = _messages("What is x1? " + "Then say why, at length. " * 60)
    short_q = _messages("What is x2?")
    leader, follower = _handle(reference, long_q), _handle(reference, short_q)
    batch.admit([leader, follower])
    lead_row, follow_row = list(batch.filling)
    assert follow_row.leader is lead_row and follow_row.awaits > 4
    while follow_row.leader is not None:
        batch.step(32)
    # it started once its leader was past the blocks it waited for, not when the whole long prompt was in
    assert follow_row.awaits * BLOCK <= lead_row.filled < len(leader.request.prompt_ids)
    assert follow_row.cached == BLOCK and len(store) == 1
    finished = []
    while batch.filling or batch.rows:
        batch.step(32)
        finished += batch.evict()
    answers = {id(row.handle): row.ids for row in finished}
    assert answers[id(follower)] == greedy(reference, short_q, 12)[1]
    assert answers[id(leader)] == greedy(reference, long_q, 12)[1]


def test_when_a_leader_gives_up_one_follower_leads_the_others(reference):
    batch, _ = _batch(reference)
    questions = [_messages(f"Question {i}: what is x{i * 5}?") for i in range(3)]
    handles = [_handle(reference, q) for q in questions]
    prefilled = _counter("vibethinker_prefill_tokens_total")
    batch.admit(handles)
    rows = list(batch.filling)
    batch.step(40)
    batch.step(40)
    handles[0].cancel()
    assert [row.handle for row in batch.evict()] == [handles[0]]
    while batch.filling:
        batch.step(40)
        if rows[2].leader is not None:
            assert rows[2].leader is rows[1]
    answers = decode_to_the_end(batch)
    assert rows[1].cached == BLOCK and rows[2].cached > 4 * BLOCK  # the second read what the first stored
    assert _counter("vibethinker_prefill_tokens_total") - prefilled == 80 + sum(
        len(h.request.prompt_ids) - row.cached for h, row in zip(handles[1:], rows[1:]))
    for question, handle in zip(questions[1:], handles[1:]):
        assert answers[id(handle)] == greedy(reference, question, 12)[1]


def test_a_pass_that_fails_while_rows_join_takes_them_out_with_their_forks_and_their_memory(reference,
                                                                                             monkeypatch):
    batch, _ = _batch(reference)
    running, joining = _handle(reference, _messages("first")), _handle(reference, _messages("second"), n=3)
    batch.admit([running])
    batch.step(10_000)
    batch.admit([joining])

    def broken(*args):
        raise RuntimeError("a token's text could not be handed out")

    monkeypatch.setattr(Batch, "_hand_out", broken)
    with pytest.raises(PassError) as failed:
        batch.step(10_000)
    assert sorted((id(row.handle), row.index) for row in failed.value.rows) == sorted(
        [(id(running), 0)] + [(id(joining), i) for i in range(3)])
    assert not batch.rows and not batch.filling and batch.memory.reserved == 0


def test_a_steps_prompt_piece_is_sized_so_the_step_takes_mixed_pace_decode_steps():
    from service.inference.speed import CHUNK_IDLE_TOKENS, CHUNK_MIN_TOKENS, MIXED_PACE, DecodeSpeed

    speed = DecodeSpeed()
    speed.observe_pass(4, 0, 0, 0.1)  # a decode step of 4 rows: 0.1 s
    speed.observe_pass(0, 0, 2000, 2.0)  # a prompt alone: 1 ms a token
    assert speed.prefill_budget(4) == round(0.1 * (MIXED_PACE - 1) / 0.001)
    assert speed.prefill_budget(0) == CHUNK_IDLE_TOKENS and speed.prefill_budget(4, setting=77) == 77
    speed.observe_pass(0, 0, 3, 0.05)  # a prompt's tail alone: its pass's fixed cost says nothing per token
    assert speed.prefill_budget(4) == round(0.1 * (MIXED_PACE - 1) / 0.001)
    for _ in range(30):  # beside decode rows a token costs 4 ms: the piece shrinks to keep the step's time
        speed.observe_pass(4, 0, 25, 0.2)
    assert abs(speed.prefill_budget(4) - 0.1 * (MIXED_PACE - 1) / 0.004) <= 1
    assert speed.pace(4) >= 0.19  # a row's pace lately is the slower steps', not a decode step's alone
    for _ in range(30):
        speed.observe_pass(4, 0, 2000, 1.0)  # very fast prefill: the piece never passes the idle chunk
    assert CHUNK_MIN_TOKENS <= speed.prefill_budget(4) <= CHUNK_IDLE_TOKENS
