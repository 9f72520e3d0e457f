"""The engine without HTTP: streaming deltas, deadlines, cancellation, the bounded queue."""

import time

import pytest

from service.inference import model
from service.inference.decoding import decode_step
from service.inference.engine import Engine
from service.inference.generation import GenerationRequest, QueueFull
from tests.support.reference import decode_to_the_end, greedy, long_messages


def started(tiny_model, **kwargs):
    engine = Engine(lambda: model.load(str(tiny_model)), torch_threads=1, **kwargs).start()
    deadline = time.monotonic() + 60
    while not engine.ready:
        assert engine.state != "failed" and time.monotonic() < deadline
        time.sleep(0.05)
    return engine


@pytest.fixture(scope="module")
def engine(tiny_model):
    engine = started(tiny_model, queue_size=2)
    yield engine
    engine.stop(timeout=30)


@pytest.fixture(scope="module")
def single(tiny_model):
    """An engine that runs one row at a time, so others wait in its queue."""
    engine = started(tiny_model, queue_size=2, max_batch=1)
    yield engine
    engine.stop(timeout=30)


def request(engine, question, max_new_tokens, deadline_s=30.0):
    ids = engine.model.encode_chat([{"role": "user", "content": question}])
    return GenerationRequest(ids, max_new_tokens, deadline=time.monotonic() + deadline_s)


@pytest.mark.parametrize("text", ["héllo wörld ✓", "日本語のテキスト", "emoji 🧮🙂 mixed ascii", "plain"])
def test_incremental_decoding_never_splits_a_character(reference, text):
    ids = reference.tokenizer.encode(text, add_special_tokens=False)
    pieces, prefix, read = [], 0, 0
    for i in range(1, len(ids) + 1):
        piece, prefix, read = decode_step(reference.decode, ids[:i], prefix, read)
        assert "\ufffd" not in piece
        pieces.append(piece)
    assert "".join(pieces) == text
    assert reference.backend is not None  # the engine's fast path: the same text as the tokenizer's own decode
    assert reference.decode(ids) == reference.tokenizer.decode(ids, skip_special_tokens=True)


def test_stream_of_deltas_adds_up_to_the_greedy_answer(engine, reference):
    handle = engine.submit(request(engine, "Stream this please", 40))
    streamed = handle.text()
    result = handle.result(timeout=5)
    expected, ids = greedy(reference, [{"role": "user", "content": "Stream this please"}], 40)
    assert streamed == result.text == expected
    assert result.token_ids == ids


def test_cancel_stops_at_the_next_step(engine):
    handle = engine.submit(request(engine, "Count to a thousand.", 2048))
    next(handle.deltas())  # it is running
    handle.cancel()
    result = handle.result(timeout=5)
    assert result.finish_reason == "cancelled" and result.completion_tokens < 2048


def test_expired_request_is_skipped_without_running(engine):
    handle = engine.submit(request(engine, "hi", 50, deadline_s=-1))
    result = handle.result(timeout=5)
    assert result.finish_reason == "timeout" and result.completion_tokens == 0 and result.run_seconds == 0


def test_queue_and_run_times_split_at_the_moment_a_request_joins(engine):
    time.sleep(0.3)  # the engine idles in its queue wait
    submitted = time.monotonic()
    result = engine.submit(request(engine, "time me", 2)).result(timeout=30)
    took = time.monotonic() - submitted
    assert 0 <= result.queue_seconds < 0.1
    assert 0 < result.run_seconds <= took and result.queue_seconds + result.run_seconds <= took


def test_queue_refuses_at_once_when_full(single):
    engine = single
    running = engine.submit(request(engine, "Count to a thousand.", 2048))
    next(running.deltas())
    waiting = [engine.submit(request(engine, "hi", 4)) for _ in range(2)]
    begun = time.monotonic()
    with pytest.raises(QueueFull):
        engine.submit(request(engine, "hi", 4))
    assert time.monotonic() - begun < 0.1
    running.cancel()
    assert all(h.result(timeout=10).finish_reason in ("length", "stop") for h in waiting)


@pytest.mark.parametrize("temperature", [5e-324, 1e-9, 0.0])
def test_near_zero_temperature_is_greedy(engine, reference, temperature):
    req = request(engine, "tiny temperature", 16)
    req.temperature = temperature
    result = engine.submit(req).result(timeout=10)
    assert result.text == greedy(reference, [{"role": "user", "content": "tiny temperature"}], 16)[0]


def test_concurrent_greedy_requests_batch_and_match_one_at_a_time(engine, reference):
    questions = [f"batch question {i}: {'why ' * i}" for i in range(2)]
    handles = [engine.submit(request(engine, q, 32)) for q in questions]
    results = [h.result(timeout=30) for h in handles]
    for question, result in zip(questions, results):
        assert result.token_ids == greedy(reference, [{"role": "user", "content": question}], 32)[1]


def test_a_cancelled_row_leaves_the_batch_while_the_others_finish(tiny_model, reference, long_question):
    wide = started(tiny_model, queue_size=8, max_batch=4)
    try:
        # A reply that runs past 600 tokens: the rows are still generating when the test looks.
        long_ids = wide.model.encode_chat(long_messages(long_question))
        rows = [wide.submit(GenerationRequest(long_ids, 600, deadline=time.monotonic() + 60)) for _ in range(3)]
        for row in rows:
            next(row.deltas())  # all three are generating
        assert wide.running == 3
        rows[0].cancel()
        deadline = time.monotonic() + 5
        while wide.running != 2:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        cancelled = rows[0].result(timeout=30)
        finished = [row.result(timeout=60) for row in rows[1:]]
        assert cancelled.finish_reason == "cancelled" and cancelled.completion_tokens < 600
        assert all(r.token_ids == finished[0].token_ids and r.completion_tokens > cancelled.completion_tokens
                   for r in finished)
    finally:
        wide.stop(timeout=30)


def test_a_row_whose_sampling_fails_fails_alone(tiny_model):
    wide = started(tiny_model, queue_size=8, max_batch=4)
    try:
        ids = wide.model.encode_chat([{"role": "user", "content": "Count to a thousand."}])
        good = [wide.submit(GenerationRequest(ids, 40, deadline=time.monotonic() + 60)) for _ in range(2)]
        # NaN is refused at the API; inside the engine it makes the sampler raise, as any row failure would.
        bad = wide.submit(GenerationRequest(ids, 40, temperature=float("nan"), deadline=time.monotonic() + 60))
        with pytest.raises(RuntimeError):
            bad.result(timeout=60)
        results = [handle.result(timeout=60) for handle in good]
        assert [r.completion_tokens for r in results] == [40, 40] or all(r.finish_reason == "stop" for r in results)
        assert wide.running == 0 and wide.ready
        assert wide.submit(GenerationRequest(ids, 4, deadline=time.monotonic() + 60)).result(timeout=60)
    finally:
        wide.stop(timeout=30)


def test_a_request_joins_the_running_batch_and_leaves_it_first(engine, reference, long_question):
    from service.settings import Settings

    messages = [{"role": "system", "content": Settings().default_system_prompt},
                {"role": "user", "content": long_question}]
    long = engine.submit(GenerationRequest(engine.model.encode_chat(messages), 2048,
                                           deadline=time.monotonic() + 30))
    next(long.deltas())  # the long one is generating
    question = "a short question that arrives late"
    short = engine.submit(request(engine, question, 12))
    result = short.result(timeout=10)
    assert not long.done, "the short request waited for the long one"
    assert result.token_ids == greedy(reference, [{"role": "user", "content": question}], 12)[1]
    long.cancel()
    assert long.result(timeout=10).finish_reason == "cancelled"


def test_seeded_sampling_repeats_whoever_shares_the_batch(engine):
    def sampled(seed):
        req = request(engine, "sample me", 24)
        req.temperature, req.top_p, req.seed = 1.0, 0.9, seed
        return req

    alone = engine.submit(sampled(7)).result(timeout=10).token_ids
    company = engine.submit(request(engine, "company", 40))
    assert engine.submit(sampled(7)).result(timeout=10).token_ids == alone
    company.result(timeout=10)
    assert engine.submit(sampled(8)).result(timeout=10).token_ids != alone


@pytest.mark.parametrize("top_p", [1e-9, 0.5, 1.0])
def test_sampling_stays_in_the_nucleus(top_p):
    import torch

    from service.inference.decoding import sample

    logits = torch.tensor([2.0, 1.5, 1.0, 0.0])
    probs = torch.softmax(logits, -1)
    nucleus = {i for i in range(4) if probs[:i].sum() < top_p}  # the smallest prefix reaching top_p
    drawn = {sample(logits, 1.0, top_p, torch.Generator().manual_seed(s)) for s in range(300)}
    assert drawn <= nucleus and (len(nucleus) < 4 or len(drawn) == 4)


def test_padding_a_long_prompt_needed_is_trimmed_and_the_rest_still_match(engine, reference, long_question):
    from service.settings import Settings

    wordy = [{"role": "system", "content": Settings().default_system_prompt + " Be thorough. " * 20},
             {"role": "user", "content": long_question}]
    long = engine.submit(GenerationRequest(engine.model.encode_chat(wordy), 2048, deadline=time.monotonic() + 30))
    short = engine.submit(request(engine, "short prompt", 40))
    next(long.deltas())
    while engine.running < 2 and not short.done:
        time.sleep(0.001)
    long.cancel()  # the only row that needed the leading columns leaves: they are cut from the cache
    result = short.result(timeout=10)
    assert long.result(timeout=10).finish_reason in ("cancelled", "stop")
    assert result.token_ids == greedy(reference, [{"role": "user", "content": "short prompt"}], 40)[1]


def test_request_threads_encode_while_the_engine_thread_decodes(reference):
    """One tokenizer per side: encodes in request threads never share a Rust tokenizer with the engine's decodes
    (a shared one refuses a mutable borrow while another thread holds it: "RuntimeError: Already borrowed")."""
    import threading

    assert reference.backend is not reference.tokenizer.backend_tokenizer
    conversations = [[{"role": "user", "content": f"question {i}: " + "word " * (i * 7 % 90)}] for i in range(24)]
    expected = [reference.encode_chat(c) for c in conversations]
    decoded = reference.decode(expected[5])
    errors, mismatches, stop = [], [], threading.Event()

    def encode(offset):
        for n in range(150):
            i = (offset + n) % len(conversations)
            try:
                if reference.encode_chat(conversations[i]) != expected[i]:
                    mismatches.append(i)
            except Exception as exc:  # noqa: BLE001 - the failure this test is about
                errors.append(repr(exc))

    def decode():
        while not stop.is_set():
            try:
                if reference.decode(expected[5]) != decoded:
                    mismatches.append("decode")
            except Exception as exc:  # noqa: BLE001
                errors.append(repr(exc))

    decoders = [threading.Thread(target=decode) for _ in range(2)]
    encoders = [threading.Thread(target=encode, args=(k * 5,)) for k in range(6)]
    for thread in decoders + encoders:
        thread.start()
    for thread in encoders:
        thread.join()
    stop.set()
    for thread in decoders:
        thread.join()
    assert errors == [] and mismatches == []



def _handle(ids, max_new_tokens, deadline_s=60.0):
    from service.inference.generation import Generation

    return Generation(GenerationRequest(ids, max_new_tokens, deadline=time.monotonic() + deadline_s))


def test_a_prompt_prefilled_in_chunks_answers_as_one_prefilled_at_once(reference):
    from service.inference.batching import Batch

    questions = ["a longer question, so that its prompt spans many chunks of a few tokens each", "short"]
    prompts = [reference.encode_chat([{"role": "user", "content": q}]) for q in questions]
    chunked = Batch(reference)
    handles = [_handle(ids, 16) for ids in prompts]
    chunked.admit(handles)
    chunks = prefilled = 0
    while chunked.filling:
        assert len(chunked.rows) < 2  # the short one may join first; the long one only with its whole prompt
        done = chunked.fill(7)
        assert 0 < done <= 7
        chunks, prefilled = chunks + 1, prefilled + done
    assert prefilled == sum(map(len, prompts)) and chunks == -(-prefilled // 7) > 3
    answers = decode_to_the_end(chunked)
    for question, handle in zip(questions, handles):
        assert answers[id(handle)] == greedy(reference, [{"role": "user", "content": question}], 16)[1]


def test_a_short_prompt_admitted_with_a_long_one_joins_first(reference):
    from service.inference.batching import Batch

    short_ids = reference.encode_chat([{"role": "user", "content": "short"}])
    long_ids = reference.encode_chat([{"role": "user", "content": "a long document to read " * 40}])
    batch = Batch(reference)
    short, long = _handle(short_ids, 4), _handle(long_ids, 4)
    batch.admit([long, short])
    assert len(batch.filling) == 2
    while batch.filling:
        batch.fill(32)
        if batch.rows:
            break
    assert [row.handle for row in batch.rows] == [short] and batch.filling_rows == 1


def test_a_row_that_stops_mid_prefill_leaves_and_the_others_still_match(reference):
    from service.inference.batching import Batch

    questions = ["the one that gives up halfway through its prompt", "the one that stays until its answer"]
    prompts = [reference.encode_chat([{"role": "user", "content": q}]) for q in questions]
    batch = Batch(reference)
    leaving, staying = _handle(prompts[0], 16), _handle(prompts[1], 16)
    batch.admit([leaving, staying])
    batch.fill(8)
    leaving.cancel()
    [gone] = batch.evict()
    assert gone.handle is leaving and gone.outcome() == ("", [], "cancelled")
    assert batch.filling_rows == 1
    while batch.filling:
        batch.fill(8)
    assert decode_to_the_end(batch)[id(staying)] == greedy(
        reference, [{"role": "user", "content": questions[1]}], 16)[1]


def test_running_streams_keep_decoding_while_a_long_prompt_prefills(engine, long_question):
    running = engine.submit(GenerationRequest(engine.model.encode_chat(long_messages(long_question)), 2048,
                                              deadline=time.monotonic() + 60))
    pieces = running.deltas()
    next(pieces)
    long_text = "a long document to read " * 500
    assert engine.speed.prefill_budget(1) < len(engine.model.encode_chat([{"role": "user", "content": long_text}]))
    counted = []
    joining = engine.submit(request(engine, long_text, 1))
    while not joining.done:  # every delta the running stream gets while the long prompt is prefilled
        counted.append(next(pieces))
    running.cancel()
    assert joining.result(timeout=10).completion_tokens == 1
    assert len(counted) >= 3, "the running stream stalled for the whole prefill"
