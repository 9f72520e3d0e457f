"""Thinking that ends in time, in the real engine: a budget, the room for an answer, the deadline, a loop.

The demo model's choices are forced (its `forced` tokens, as settings.forced_output sets them): a thinking
that never closes, or one that repeats a span. Every prefill and decode step runs; when the engine ends the
thinking, it feeds the closing and the end tag in one pass and the answer that follows is capped.
"""

import time

import pytest

from service.inference import model
from service.inference.engine import Engine
from service.inference.generation import Budget, GenerationRequest
from service.inference.thinking import Loops, Tags, Thinking
from service.serving.reasoning import Markers, split

CLOSING = "\n\nTime is up, so the answer now.\n"
MARKERS = Markers("<think>", "</think>")


def never_closing(words=3000):
    """A thinking that never closes and never repeats: distinct numbers."""
    return "<think>" + " ".join(str(i * 7919 % 100003) for i in range(words))


@pytest.fixture(scope="module")
def engine(tiny_model):
    engine = Engine(lambda: model.load(str(tiny_model), reasoning_start="<think>", reasoning_end="</think>",
                                       closing=CLOSING), queue_size=8, torch_threads=1).start()
    deadline = time.monotonic() + 60
    while not engine.ready:
        assert engine.state != "failed" and time.monotonic() < deadline
        time.sleep(0.05)
    yield engine
    engine.stop(timeout=30)


def forcing(engine, text):
    """The engine's model answers `text` (then its end token), whatever it is asked."""
    loaded = engine.model
    loaded.forced = (*loaded._ids(text), loaded.tokenizer.eos_token_id)


def ask(engine, max_new_tokens, budget, deadline_s=60.0, **kwargs):
    ids = engine.model.encode_chat([{"role": "user", "content": "Think about it."}])
    handle = engine.submit(GenerationRequest(ids, max_new_tokens, deadline=time.monotonic() + deadline_s,
                                             budget=budget, **kwargs))
    return handle, handle.result(timeout=deadline_s + 30)


def closed_once(engine, result, answer_tokens):
    """The closing and the end tag are in the text once, right where the forced tokens went, and the answer
    after them is at most `answer_tokens` tokens."""
    closing = engine.model.closing
    assert result.forced_tokens == len(closing)
    ids = result.token_ids
    at = next(i for i in range(len(ids)) if tuple(ids[i:i + len(closing)]) == closing)
    assert len(ids) - at - len(closing) <= answer_tokens
    assert result.text.count("</think>") == 1 and CLOSING.strip() in result.text
    parts = split(result.text, MARKERS)
    assert parts.reasoning and CLOSING.strip() in parts.reasoning
    return at


def test_a_thinking_that_reaches_its_budget_is_closed_and_its_answer_capped(engine):
    forcing(engine, never_closing())
    handle, result = ask(engine, 400, Budget(answer_tokens=12, tokens=30, loop_tokens=0))
    assert result.thinking_ended == "budget"
    at = closed_once(engine, result, 12)
    assert at == 30  # the start tag's tokens count as thinking: 30 thinking tokens, then the closing
    assert result.finish_reason == "length" and len(result.token_ids) == 30 + len(engine.model.closing) + 12


def test_a_thinking_that_would_leave_no_room_for_the_answer_is_closed_in_time(engine):
    forcing(engine, never_closing())
    closing = len(engine.model.closing)
    _, result = ask(engine, 120, Budget(answer_tokens=20, loop_tokens=0))
    assert result.thinking_ended == "length"
    at = closed_once(engine, result, 20)
    assert at + closing + 20 == 120  # the latest the closing and a whole answer still fit
    assert len(result.token_ids) == 120 and result.finish_reason == "length"


def test_a_thinking_that_would_pass_the_deadline_is_closed_before_it(engine):
    forcing(engine, never_closing())
    ask(engine, 8, None)  # the engine has measured its speed
    started = time.monotonic()
    _, result = ask(engine, 20000, Budget(answer_tokens=2000, loop_tokens=0), deadline_s=3.0)
    assert result.thinking_ended == "deadline"
    closed_once(engine, result, 2000)
    assert time.monotonic() - started < 3.5


def test_a_thinking_that_loops_is_closed(engine):
    forcing(engine, "<think>" + "we try again and again, " * 300)
    _, result = ask(engine, 2000, Budget(answer_tokens=16, loop_period=64, loop_tokens=48))
    assert result.thinking_ended == "loop"
    at = closed_once(engine, result, 16)
    assert at < 200  # caught within a few repeats, not at the length


def test_a_thinking_that_closes_itself_is_left_alone(engine):
    forcing(engine, "<think>short</think>\n\nThe answer is \\boxed{4}.")
    _, result = ask(engine, 400, Budget(answer_tokens=4, tokens=1000))
    assert result.thinking_ended is None and result.forced_tokens == 0
    assert result.finish_reason == "stop" and result.text.endswith("\\boxed{4}.")


def test_n_choices_are_prefilled_once_and_read_the_prompt_from_the_first_ones_cache(engine):
    from service.inference.batching import Batch
    from service.inference.generation import Generation

    forcing(engine, never_closing())
    ids = engine.model.encode_chat([{"role": "user", "content": "Think it over three times."}])
    batch = Batch(engine.model)
    batch.admit([Generation(GenerationRequest(ids, 8, temperature=0.7, n=3))])
    assert len(batch.filling) == 1 and batch.filling_rows == 3
    per_token = batch.memory.layout.bytes_per_token
    assert batch.memory.reserved == (len(ids) + 3 * 8) * per_token  # the prompt once, each choice's answer
    prefilled = 0
    while batch.filling:
        prefilled += batch.fill(10_000)
    assert prefilled == len(ids)  # the prompt once, not three times
    assert sorted(row.index for row in batch.rows) == [0, 1, 2]
    lead = next(row for row in batch.rows if row.index == 0)
    for row in batch.rows:
        if row is not lead:  # its own slab holds its answer; the prompt it reads from the first's
            assert row.cache.shared is lead.cache and row.cache.offset == len(ids) == row.cache.length
            assert row.cache.keys.shape[2] == 8
    for _ in range(3):
        batch.step()
    assert [len(row.ids) for row in batch.rows] == [4, 4, 4]
    batch.close()
    assert batch.memory.reserved == 0


def test_n_choices_each_end_their_thinking_and_count_their_tokens(engine):
    forcing(engine, never_closing())
    handle, result = ask(engine, 200, Budget(answer_tokens=8, tokens=10, loop_tokens=0), n=3, temperature=0.7)
    assert [choice.index for choice in result.choices] == [0, 1, 2]
    assert all(choice.thinking_ended == "budget" for choice in result.choices)
    assert result.forced == 3 * len(engine.model.closing)
    assert result.completion_tokens == sum(len(choice.token_ids) for choice in result.choices)


def test_a_streamed_thinking_shows_the_closing_and_its_tag_once(engine):
    forcing(engine, never_closing())
    ids = engine.model.encode_chat([{"role": "user", "content": "Think."}])
    handle = engine.submit(GenerationRequest(ids, 300, budget=Budget(answer_tokens=10, tokens=20, loop_tokens=0),
                                             logprobs=2))
    deltas = list(handle.deltas())
    result = handle.result(timeout=5)
    assert "".join(d.text for d in deltas) == result.text and result.text.count("</think>") == 1
    entries = [entry for delta in deltas for entry in delta.logprobs]
    assert [entry.token for entry in entries] == result.token_ids == [e.token for e in result.logprobs]
    assert all(len(entry.top) == 2 and entry.logprob <= 0 for entry in entries)
    thinking = [entry.thinking for entry in entries]
    closing = engine.model
    end = thinking.index(False)
    assert all(thinking[:end]) and not any(thinking[end:])  # the thinking's tokens, then the answer's
    assert end == 20 + closing.closing_thinking


def test_tokens_that_might_have_opened_a_thinking_take_the_place_of_what_followed(engine):
    for text, thinking in (("\n<b>answer</b>", False), ("\n<think>thought</think>answer", True)):
        forcing(engine, text)
        _, result = ask(engine, 60, Budget(answer_tokens=8), logprobs=0)
        assert [entry.token for entry in result.logprobs] == result.token_ids
        first = next(i for i, token in enumerate(result.token_ids) if "<" in engine.model.decode_token(token))
        assert all(entry.thinking is thinking for entry in result.logprobs[:first + 1])
        assert not result.logprobs[-1].thinking  # the answer's last token


def test_a_tokens_bytes_are_its_own_even_when_its_text_is_part_of_a_character(engine):
    loaded, text = engine.model, "héllo 日本 🧮"
    ids = loaded._ids(text)
    assert any(loaded.decode_token(token) == "\ufffd" for token in ids)  # a token that is half a character
    assert b"".join(loaded.token_bytes(token) for token in ids) == text.encode()
    assert loaded.token_bytes(loaded.tokenizer.eos_token_id) == loaded.tokenizer.eos_token.encode()


def test_loops_are_found_by_their_period_and_a_varied_text_is_not():
    loops = Loops(period=8, tokens=10)
    assert not any(loops.add(t) for t in range(100))
    loops = Loops(period=8, tokens=10)
    found = [loops.add(t) for t in [1, 2, 3] * 10]
    assert found.index(True) == 3 + 10 - 1  # the 13th token: 10 tokens repeating the span of 3 before them
    long_span = Loops(period=4, tokens=10)
    assert not any(long_span.add(t) for t in list(range(6)) * 10)  # a span longer than the period is not looked for


def test_the_rules_that_end_a_thinking():
    thinking = Thinking(Tags(opened=True), budget=None, answer_tokens=100, closing=range(10))
    thinking.state = "thinking"
    assert thinking.must_end(10, 1000) is None
    assert thinking.must_end(890, 1000) == "length"  # 890 + 10 + 100 reach the 1,000
    assert thinking.must_end(10, 1000, seconds_left=5.0, seconds_per_token=0.05) == "deadline"
    assert thinking.must_end(10, 1000, seconds_left=5.0, seconds_per_token=0.01) is None
    assert thinking.room(60) == 25  # a short request: half of what is left after the closing
    assert thinking.must_end(20, 25) is None  # no room for a closing and an answer: it thinks to the length
    assert Thinking(Tags("", ""), answer_tokens=100, closing=range(3)).must_end(5, 10) is None  # does not think
    looping = Thinking(Tags(opened=True), answer_tokens=100, closing=range(10), loops=Loops(period=1, tokens=3))
    for token in (7, 7, 7, 7):
        assert looping.follow(token, "seven seven seven seven") is True
    assert looping.must_end(4, 12) is None and looping.ended is None  # caught, but no room to end it: not ended
    assert looping.must_end(4, 1000) == "loop"
