"""The KV cache: each row's own slab, written in place; its attention; its memory bound (no HTTP)."""

import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from service.inference import kvcache, kvmemory, layers, model
from service.inference.batching import Batch, forward
from service.inference.engine import Engine
from service.inference.generation import EngineError, Generation, GenerationRequest, TooLarge
from tests.support.reference import decode_to_the_end, greedy, long_messages


def _handle(ids, max_new_tokens, deadline_s=60.0):
    return Generation(GenerationRequest(ids, max_new_tokens, deadline=time.monotonic() + deadline_s))


def _prompt(loaded, question):
    return loaded.encode_chat([{"role": "user", "content": question}])


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("length", [1, 7, 300])
def test_decode_attention_matches_sdpa_over_a_strided_slab(dtype, tolerance, length):
    torch.manual_seed(length)
    heads, kv_heads, width = 6, 2, 16
    slab = torch.randn(kv_heads, length + 40, width)  # room past the row's length, as a row's cache has
    values = torch.randn(kv_heads, length + 40, width)
    query = torch.randn(heads, 1, width)
    keys, vals = slab[:, :length].to(dtype), values[:, :length].to(dtype)
    theirs = F.scaled_dot_product_attention(query[None], keys[None].float(), vals[None].float(),
                                            scale=width ** -0.5, enable_gqa=True)[0]
    ours = kvcache._decode_attention(query, keys, vals, width ** -0.5, length)
    assert ours.dtype == query.dtype and ours.shape == (heads, 1, width)
    assert torch.allclose(ours, theirs, atol=tolerance, rtol=tolerance)
    # read in a whole bucket: past the length, keys are anything and values zero (RowCache.padded): masked out
    values[:, length:] = 0
    padded = kvcache._decode_attention(query, slab.to(dtype), values.to(dtype), width ** -0.5, length)
    assert torch.allclose(padded, ours, atol=tolerance, rtol=tolerance)


def test_a_later_prefill_chunk_sees_the_rows_earlier_tokens_and_not_its_own_later_ones():
    torch.manual_seed(0)
    heads, kv_heads, width, base, count = 4, 2, 8, 5, 3
    keys, values = torch.randn(kv_heads, base + count, width), torch.randn(kv_heads, base + count, width)
    query = torch.randn(heads, count, width)
    ours = kvcache._prefill_attention(query, keys, values, 0.5, base)
    for i in range(count):  # token i of the chunk, alone, over the first base + i + 1 keys
        alone = kvcache._decode_attention(query[:, i:i + 1], keys[:, :base + i + 1], values[:, :base + i + 1],
                                          0.5, base + i + 1)
        assert torch.allclose(ours[:, i:i + 1], alone, atol=1e-5)


@pytest.mark.parametrize("base", [0, 37])
def test_a_short_piece_over_a_bfloat16_cache_attends_in_place_as_sdpa_does(base):
    torch.manual_seed(1)
    heads, kv_heads, width, count, bucket = 6, 2, 16, 9, 64
    keys = torch.zeros(kv_heads, bucket, width, dtype=torch.bfloat16)  # a bucket, zeros past what is written
    values = torch.zeros(kv_heads, bucket, width, dtype=torch.bfloat16)
    keys[:, :base + count], values[:, :base + count] = torch.randn(2, kv_heads, base + count, width)
    query = torch.randn(heads, count, width)
    ours = kvcache._piece_attention(query, keys, values, width ** -0.5, base, base + count)
    sdpa = kvcache._prefill_attention(query, keys[:, :base + count].float(), values[:, :base + count].float(),
                                      width ** -0.5, base)
    assert ours.dtype == query.dtype and torch.allclose(ours, sdpa, atol=3e-2, rtol=3e-2)
    for i in range(count):  # token i sees the first base + i + 1 keys only: what comes after changes nothing
        later_keys, later_values = keys.clone(), values.clone()
        later_keys[:, base + i + 1:], later_values[:, base + i + 1:] = 50.0, -50.0
        changed = kvcache._piece_attention(query, later_keys, later_values, width ** -0.5, base, base + count)
        assert torch.equal(changed[:, :i + 1], ours[:, :i + 1])
        assert i == count - 1 or not torch.equal(changed[:, i + 1:], ours[:, i + 1:])


def test_rows_joining_and_leaving_never_move_or_change_another_rows_cache(reference):
    batch = Batch(reference, speculation="off")  # a step writes one token a row
    first = _handle(_prompt(reference, "the row that stays"), 24)
    batch.admit([first])
    while batch.filling:
        batch.fill(64)
    for _ in range(5):
        batch.step()
    [row] = batch.rows
    where, written = row.cache.keys.data_ptr(), row.cache.length
    before = row.cache.keys[:, :, :written].clone(), row.cache.values[:, :, :written].clone()
    late = _handle(_prompt(reference, "a much longer question that joins late " * 6), 24)
    batch.admit([late])
    while batch.filling:
        batch.fill(64)
    batch.step()
    late.cancel()
    assert [gone.handle for gone in batch.evict()] == [late]
    assert row.cache.keys.data_ptr() == where and row.cache.length == written + 1
    assert torch.equal(row.cache.keys[:, :, :written], before[0])
    assert torch.equal(row.cache.values[:, :, :written], before[1])
    finished = []
    while batch.rows:
        batch.step()
        finished += batch.evict()
    assert finished[0].ids == greedy(reference, [{"role": "user", "content": "the row that stays"}], 24)[1]
    assert batch.memory.reserved == 0 and batch.memory.depth() == (0, 0)


@pytest.mark.parametrize("short", [kvcache.SHORT, 0])
def test_short_and_long_rows_decode_together_each_as_alone(reference, monkeypatch, short):
    """Rows past SHORT attend in place, the others together in one float32 batch (or all in place)."""
    monkeypatch.setattr(kvcache, "SHORT", short)
    questions = ["a short one", "a long one " + "with many words " * 160]
    prompts = [_prompt(reference, q) for q in questions]
    assert len(prompts[0]) < kvcache.SHORT or not short
    assert len(prompts[1]) > kvcache.SHORT or not short
    batch = Batch(reference)
    handles = [_handle(ids, 24) for ids in prompts]
    batch.admit(handles)
    while batch.filling:
        batch.fill(4096)
    answers = decode_to_the_end(batch)
    for question, handle in zip(questions, handles):
        assert answers[id(handle)] == greedy(reference, [{"role": "user", "content": question}], 24)[1]


def _teacher_forced(loaded, prompt, continuation):
    """Each next-token choice of `loaded` along `continuation`, through a row cache of its own: the prompt
    prefilled in one chunk, then one decode step per token."""
    row = SimpleNamespace(cache=kvcache.RowCache(loaded.layout, len(prompt) + len(continuation)))
    with torch.inference_mode():
        choices = [int(forward(loaded, [(row, prompt)], [len(prompt) - 1])[0].argmax())]
        for token in continuation[:-1]:
            choices.append(int(forward(loaded, [(row, [token])], [0])[0].argmax()))
    return choices


def test_the_float32_cache_is_exact_and_the_bfloat16_one_keeps_the_choices(tiny_model, reference):
    assert reference.layout.dtype == torch.float32  # the float32 mode's auto: the exact reference
    half = model.load(str(tiny_model), kv_dtype="bfloat16")
    assert half.layout.dtype == torch.bfloat16
    assert half.layout.bytes_per_token * 2 == reference.layout.bytes_per_token
    agree = total = 0
    for question in ("What is 17 * 23? Show the steps.", "Name three primes.", "why " * 40):
        messages = [{"role": "user", "content": question}]
        prompt, continuation = reference.encode_chat(messages), greedy(reference, messages, 64)[1]
        assert _teacher_forced(reference, prompt, continuation) == continuation
        ours = _teacher_forced(half, prompt, continuation)
        agree += sum(a == b for a, b in zip(ours, continuation))
        total += len(continuation)
    assert agree / total >= 0.95, f"{agree}/{total}"  # int8 weights keep > 0.5 (test_numerics)


def test_a_decode_step_reads_whole_buckets_zeroed_past_what_was_written():
    layout = kvcache.Layout(layers=2, kv_heads=1, head_dim=4, dtype=torch.float32)
    cache = kvcache.RowCache(layout, capacity=kvcache.BUCKET + 10)
    cache.keys.fill_(float("nan"))  # what uninitialised memory may hold
    cache.values.fill_(float("nan"))
    cache.keys[:, :, :3], cache.values[:, :, :3], cache.length = 1.0, 2.0, 3  # a prompt of 3 tokens, prefilled
    assert cache.padded(4) == kvcache.BUCKET and cache.zeroed == kvcache.BUCKET
    assert (cache.values[:, :, :3] == 2.0).all()  # what is written stays
    assert (cache.values[:, :, 3:kvcache.BUCKET] == 0).all()
    assert cache.values[:, :, kvcache.BUCKET:].isnan().all()  # not zeroed before it is needed
    assert cache.padded(kvcache.BUCKET + 1) == kvcache.BUCKET + 10  # the last bucket stops at the capacity
    assert not cache.values.isnan().any() and not cache.keys.isnan().any()


def test_cache_memory_reserves_whole_rows_and_refuses_past_its_bound(reference):
    layout = reference.layout
    memory = kvmemory.CacheMemory(layout, bound=100 * layout.bytes_per_token)
    assert memory.capacity_tokens == 100 and memory.fits(100) and not memory.fits(101)
    first = memory.allocate(60)
    assert memory.reserved == memory.need(60) and memory.free == memory.need(40) and not memory.fits(41)
    with pytest.raises(kvcache.CacheFull):
        memory.allocate(41)
    assert memory.reserved == memory.need(60)  # a refusal reserves nothing
    second = memory.allocate(40)
    memory.release(first)
    memory.release(first)  # twice is once
    assert memory.reserved == memory.need(40)
    memory.release(second)
    assert memory.reserved == 0 and memory.free == memory.need(100)
    with pytest.raises(kvcache.CacheFull, match="do not fit"):
        kvcache.Pass([(kvcache.RowCache(layout, 4), 5)])


def _engine(tiny_model, **kwargs):
    engine = Engine(lambda: model.load(str(tiny_model)), queue_size=4, torch_threads=1, **kwargs).start()
    deadline = time.monotonic() + 60
    while not engine.ready:
        assert engine.state != "failed" and time.monotonic() < deadline
        time.sleep(0.05)
    return engine


def test_a_request_waits_for_cache_memory_and_one_that_can_never_fit_is_refused(tiny_model, reference,
                                                                                   long_question):
    long_ids = reference.encode_chat(long_messages(long_question))  # 2048 tokens without an end
    per_row = len(long_ids) + 1500
    engine = _engine(tiny_model, max_batch=4, cache_bytes=int(1.5 * per_row) * reference.layout.bytes_per_token)
    try:
        assert engine.longest(len(long_ids)) == int(1.5 * per_row) - len(long_ids)
        with pytest.raises(TooLarge, match=f"at most {engine.longest(len(long_ids))} new tokens fit"):
            engine.submit(GenerationRequest(long_ids, engine.longest(len(long_ids)) + 1))
        first = engine.submit(GenerationRequest(long_ids, 1500, deadline=time.monotonic() + 120))
        next(first.deltas())
        second = engine.submit(GenerationRequest(long_ids, 1500, deadline=time.monotonic() + 120))
        time.sleep(0.1)  # rows are free (4), memory is not: the second waits at the head of the queue
        assert not first.done and engine.running == 1 and engine.queued() == 1
        assert engine.cache_bytes()["reserved"] == per_row * reference.layout.bytes_per_token
        results = [first.result(timeout=120), second.result(timeout=120)]
        assert results[0].token_ids == results[1].token_ids
        assert second.started >= first.started + results[0].run_seconds * 0.9  # it ran only after the first left
        assert engine.cache_bytes()["reserved"] == 0 and engine.queued() == 0
        # a request held for memory whose caller gives up is finished, and the next one runs
        first = engine.submit(GenerationRequest(long_ids, 1500, deadline=time.monotonic() + 120))
        next(first.deltas())
        held = engine.submit(GenerationRequest(long_ids, 1500, deadline=time.monotonic() + 120))
        time.sleep(0.1)
        assert engine.queued() == 1
        held.cancel()
        first.cancel()
        assert held.result(timeout=30).finish_reason == "cancelled" and held.started is None
        assert first.result(timeout=30).finish_reason == "cancelled"
        assert engine.submit(GenerationRequest(long_ids, 4, deadline=time.monotonic() + 60)).result(timeout=60)
        assert engine.cache_bytes()["reserved"] == 0 and engine.queued() == 0
    finally:
        engine.stop(timeout=30)


def test_a_stopping_engine_finishes_every_request_and_frees_every_cache(tiny_model, reference, long_question):
    long_ids = reference.encode_chat(long_messages(long_question))
    engine = _engine(tiny_model, max_batch=1, cache_bytes=(len(long_ids) + 1500) * reference.layout.bytes_per_token)
    running = engine.submit(GenerationRequest(long_ids, 1500, deadline=time.monotonic() + 120))
    next(running.deltas())
    waiting = [engine.submit(GenerationRequest(long_ids, 1500, deadline=time.monotonic() + 120)) for _ in range(3)]
    engine.stop(timeout=30)
    for handle in [running, *waiting]:
        with pytest.raises(EngineError, match="the engine stopped"):
            handle.result(timeout=5)
    assert engine.cache_bytes()["reserved"] == 0


def test_decode_speed_follows_the_context_the_rows_hold(tiny_model, reference):
    engine = _engine(tiny_model, max_batch=2)
    try:
        assert engine.speed.per_token >= 0  # measured at load: attention's cost per cached token
        handle = engine.submit(GenerationRequest(_prompt(reference, "hi"), 8, deadline=time.monotonic() + 60))
        handle.result(timeout=60)
        shallow, deep = engine.speed.per_row(1, 100), engine.speed.per_row(1, 30000)
        assert shallow >= deep > 0  # (the slope's own math: test_deadlines)
        rate, rows, depth = engine.speed_now()
        assert rows == 1 and depth == 0 and rate == engine.speed.per_row(1, 0)
    finally:
        engine.stop(timeout=30)


@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16"])
def test_the_engines_own_layer_loop_gives_transformers_logits_bit_for_bit(tiny_model, kv_dtype, monkeypatch):
    loaded = model.load(str(tiny_model), kv_dtype=kv_dtype)
    assert layers.supported(loaded.model)
    prompt, other = _prompt(loaded, "the first row"), _prompt(loaded, "and a second, longer one joins it")

    def passes():
        """A prefill of two rows, then two passes of one token each and a piece of three: every logit."""
        caches = [kvcache.RowCache(loaded.layout, 64), kvcache.RowCache(loaded.layout, 64)]
        rows = [SimpleNamespace(cache=cache) for cache in caches]
        out = [forward(loaded, [(rows[0], prompt), (rows[1], other)], list(range(len(prompt) + len(other))))]
        out.append(forward(loaded, [(rows[0], [5]), (rows[1], [7])], [0, 1]))
        out.append(forward(loaded, [(rows[0], [9, 11, 13]), (rows[1], [2])], [0, 1, 2, 3]))
        return out

    ours = passes()
    monkeypatch.setattr(layers, "supported", lambda _: False)  # transformers' own forward
    assert all(torch.equal(a, b) for a, b in zip(ours, passes(), strict=True))
