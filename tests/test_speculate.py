"""Prompt-lookup speculation (service.inference.speculate): the drafts, and on the real tiny model answers that
are the same token for token with and without it (greedy, seeded sampling, penalties, log probabilities), in
fewer steps."""

import dataclasses
import time

import pytest
from prometheus_client import REGISTRY

from service.inference import decoding, kvcache, rows, speculate
from service.inference.batching import Batch
from service.inference.generation import Generation, GenerationRequest
from service.inference.rows import token_seed
from service.inference.speculate import Drafts, drafts_per_row
from tests.support.reference import greedy

QUESTIONS = ["Count: one two three one two three one two", "What is 12 times 12? Think step by step.",
             "Repeat after me: the cat sat on the mat, the cat sat on the mat.", "hello"]


def _counter(name):
    return REGISTRY.get_sample_value(name, {"model": "model"}) or 0.0


def _run(loaded, requests, speculation):
    """Run `requests` in one batch to their end: ({(request, choice): (ids, logprobs)}, the steps each row
    took, summed), checking after every step that each row's cache holds its prompt and every token but
    its last (what a step wrote for drafts it did not keep is forgotten)."""
    batch = Batch(loaded, speculation=speculation)
    handles = [Generation(request) for request in requests]
    batch.admit(handles)
    while batch.filling:
        batch.fill(10_000)
    finished, steps = [], 0
    while batch.rows:
        for row in batch.rows:
            assert row.cache.length == len(row.request.prompt_ids) + len(row.ids) - 1
        steps += len(batch.rows)
        batch.step()
        finished += batch.evict()
    answers = {(handles.index(row.handle), row.index): (row.ids, row.logprobs) for row in finished}
    return answers, steps


def _requests(loaded, max_new=48, **how):
    return [GenerationRequest(loaded.encode_chat([{"role": "user", "content": question}]), max_new,
                              deadline=time.monotonic() + 300, **how) for question in QUESTIONS]


def test_a_draft_is_what_followed_the_latest_earlier_place_of_the_last_ngram():
    drafts = Drafts([1, 2, 3, 4, 5, 1, 2])
    assert drafts.propose([]) == [3, 4, 5]  # (1, 2) ended at index 1
    assert drafts.propose([3]) == [4, 5, 1]  # (1, 2, 3) ended at index 2: the longer n-gram
    assert drafts.propose([3, 9]) == []  # (3, 9) and (2, 3, 9) never seen before
    assert drafts.propose([3, 9, 1, 2]) == [3, 9, 1]  # (1, 2) last ended at index 6, after the first place
    assert drafts.propose([3, 9, 1, 2], 2) == [3, 9] and drafts.propose([3, 9, 1, 2], 0) == []
    assert Drafts([7]).propose([]) == [] and Drafts([]).propose([5]) == []


def test_auto_speculates_only_in_a_small_pass_that_prefills_nothing():
    assert [drafts_per_row("auto", rows, False) for rows in range(6)] == [0, 3, 1, 0, 0, 0]
    assert drafts_per_row("auto", 1, True) == 0
    assert drafts_per_row("ngram", 16, True) == 3 and drafts_per_row("off", 1, False) == 0


def test_token_seeds_differ_by_seed_and_position_and_stay_in_torchs_range():
    seeds = {token_seed(seed, position) for seed in (-(2**63), -1, 0, 1, 2**63 - 1) for position in range(50)}
    assert len(seeds) == 250
    assert all(-(2**63) <= seed < 2**63 for seed in seeds)


def test_greedy_answers_are_the_same_with_and_without_speculation_in_fewer_steps(reference):
    drafted, accepted = _counter("vibethinker_speculation_drafted_tokens_total"), \
        _counter("vibethinker_speculation_accepted_tokens_sum")
    plain, plain_steps = _run(reference, _requests(reference), "off")
    assert _counter("vibethinker_speculation_drafted_tokens_total") == drafted  # off: nothing drafted
    sped, sped_steps = _run(reference, _requests(reference), "ngram")
    assert sped == plain
    assert _counter("vibethinker_speculation_drafted_tokens_total") > drafted
    assert _counter("vibethinker_speculation_accepted_tokens_sum") > accepted
    assert sped_steps < plain_steps
    text, ids = greedy(reference, [{"role": "user", "content": QUESTIONS[0]}], 48)
    assert sped[0, 0][0] == ids


def test_one_row_at_a_time_auto_speculates_and_answers_as_transformers_does(reference):
    drafted = _counter("vibethinker_speculation_drafted_tokens_total")
    for question in QUESTIONS:
        request = GenerationRequest(reference.encode_chat([{"role": "user", "content": question}]), 160,
                                    deadline=time.monotonic() + 300)
        answers, _ = _run(reference, [request], "auto")
        assert answers[0, 0][0] == greedy(reference, [{"role": "user", "content": question}], 160)[1]
    assert _counter("vibethinker_speculation_drafted_tokens_total") > drafted


def _repeating(reference, text):
    """The tiny model made to answer `text` (then its end token) whatever its logits say (as the
    forced_output setting does): an answer that repeats itself, so that drafts are taken."""
    ids = reference.tokenizer(text, add_special_tokens=False)["input_ids"]
    return dataclasses.replace(reference, forced=(*ids, reference.tokenizer.eos_token_id))


@pytest.mark.parametrize("how", [{}, {"stop": ("sat on the mat, the dog",)}, {"max_new_tokens": 37}])
def test_a_repeating_answer_takes_its_drafts_and_ends_where_it_would_without_them(reference, how):
    loaded = _repeating(reference, "the cat sat on the mat, " * 8 + "the dog sat on the mat, " * 3)
    limit = how.pop("max_new_tokens", 200)

    def run(speculation):
        request = GenerationRequest(loaded.encode_chat([{"role": "user", "content": "a cat"}]), limit,
                                    deadline=time.monotonic() + 300, **how)
        batch = Batch(loaded, speculation=speculation)
        handle = Generation(request)
        batch.admit([handle])
        while batch.filling:
            batch.fill(10_000)
        steps = 0
        while batch.rows:
            [row] = batch.rows
            assert row.cache.length == len(request.prompt_ids) + len(row.ids) - 1
            batch.step()
            steps += 1
            batch.evict()
        return row.outcome(), steps

    (text, ids, reason), plain_steps = run("off")
    assert run("auto")[0] == run("ngram")[0] == (text, ids, reason)
    sped_steps = run("ngram")[1]
    assert sped_steps < plain_steps * 0.6  # most of the answer repeats: 4 tokens a step where drafts hold
    assert len(ids) <= limit and reason == ("stop" if how.get("stop") or limit == 200 else "length")
    if how.get("stop"):  # cut before the stop string, which drafts had run past
        assert text.endswith("the cat sat on the mat, the cat ") and "dog" not in text


def _knowing(answers, requests, wrong_every=3):
    """A drafter (in place of speculate.Drafts) that knows each row's answer from a run without speculation
    and drafts it, spoiling the second draft of every `wrong_every`-th guess: sampled rows of a random model
    seldom repeat an n-gram, and whatever the drafts, the answer must come out as without them."""
    known = {}
    for (request, _), (ids, _) in answers.items():
        known.setdefault(tuple(requests[request].prompt_ids), []).append(ids)

    class Knowing:
        guesses = 0

        def __init__(self, prompt):
            self.answers = known[tuple(prompt)]

        def propose(self, output, count=3):
            Knowing.guesses += 1
            for answer in self.answers:
                if answer[:len(output)] == output:
                    guess = list(answer[len(output):len(output) + count])
                    if Knowing.guesses % wrong_every == 0 and len(guess) > 1:
                        guess[1] = (guess[1] + 1) % 2048
                    return guess
            return []

    return Knowing


@pytest.mark.parametrize("how", [
    {"temperature": 1.0, "top_p": 0.9, "seed": 7, "n": 2},
    {"temperature": 0.7, "top_k": 20, "seed": -5},
    {"temperature": 0.0, "repetition_penalty": 1.3, "logprobs": 3},
    {"temperature": 0.9, "min_p": 0.05, "seed": 11, "repetition_penalty": 1.2, "logprobs": 2},
])
def test_sampled_penalised_and_logprob_answers_are_the_same_with_and_without_speculation(reference, how,
                                                                                          monkeypatch):
    requests = _requests(reference, 40, **how)
    plain, plain_steps = _run(reference, requests, "off")
    monkeypatch.setattr(speculate, "Drafts", _knowing(plain, requests))
    drafted, accepted = _counter("vibethinker_speculation_drafted_tokens_total"), \
        _counter("vibethinker_speculation_accepted_tokens_sum")
    sped, sped_steps = _run(reference, _requests(reference, 40, **how), "ngram")
    assert _counter("vibethinker_speculation_drafted_tokens_total") > drafted
    assert _counter("vibethinker_speculation_accepted_tokens_sum") > accepted
    # a request's other choices (forks, reading its first's prompt) do not draft: only the first saves steps
    assert sped_steps < plain_steps * (0.6 if how.get("n", 1) == 1 else 0.75)
    assert plain.keys() == sped.keys()
    for key, (ids, logprobs) in plain.items():
        assert sped[key][0] == ids
        if logprobs is not None:  # the same tokens, their log probabilities from logits of another pass shape
            other = sped[key][1]
            assert [entry.token for entry in other] == [entry.token for entry in logprobs]
            assert [entry.logprob for entry in other] == pytest.approx([entry.logprob for entry in logprobs],
                                                                       abs=1e-4)
            for mine, theirs in zip(other, logprobs):  # the alternatives: the same tokens, the same numbers
                assert [token for token, _ in mine.top] == [token for token, _ in theirs.top]
                assert [value for _, value in mine.top] == pytest.approx([value for _, value in theirs.top],
                                                                         abs=1e-4)


def test_a_seeded_answer_repeats_whoever_shares_the_batch_with_it(reference):
    how = {"temperature": 1.0, "seed": 3}
    alone, _ = _run(reference, _requests(reference, 40, **how)[:1], "ngram")
    together, _ = _run(reference, _requests(reference, 40, **how), "ngram")
    assert together[0, 0] == alone[0, 0]


@pytest.fixture(scope="module")
def bfloat16_cache(tiny_model):
    """The tiny model with a bfloat16 KV cache (the int8 and bfloat16 modes' own): a drafted token is checked
    in a piece whose attention must come out as a decoded token's would."""
    from service.inference import model

    return model.load(str(tiny_model), kv_dtype="bfloat16")


@pytest.mark.parametrize("document", ["", " ".join(f"Line {i}: x{i} = {i * 7 % 13}." for i in range(120))])
def test_with_a_bfloat16_cache_drafted_tokens_come_out_as_decoded_ones_short_or_deep(bfloat16_cache, document,
                                                                                      monkeypatch):
    def requests():
        return [GenerationRequest(bfloat16_cache.encode_chat([{"role": "user", "content": document + question}]),
                                  60, deadline=time.monotonic() + 300) for question in QUESTIONS[:3]]

    asked = requests()
    assert all((len(request.prompt_ids) > kvcache.SHORT) == bool(document) for request in asked)
    plain, plain_steps = _run(bfloat16_cache, asked, "off")
    monkeypatch.setattr(speculate, "Drafts", _knowing(plain, asked))
    sped, sped_steps = _run(bfloat16_cache, requests(), "ngram")
    assert sped == plain and sped_steps < plain_steps * 0.6


def test_a_draw_that_fails_past_a_draft_that_did_not_hold_fails_nothing(reference, monkeypatch):
    """Positions after a wrong draft are computed but never reached: their failure is not the row's; a failure
    at a position the row reaches is, with speculation as without it."""
    how = {"temperature": 1.0, "seed": 5}
    requests = _requests(reference, 24, **how)
    plain, _ = _run(reference, requests, "off")

    class Wrong:  # every guess's first draft is wrong, so nothing past it is reached
        def __init__(self, prompt):
            pass

        def propose(self, output, count=3):
            return [2047, 5, 6][:count]

    unreached = object()
    drawn = decoding.sample
    monkeypatch.setattr(speculate, "Drafts", Wrong)
    monkeypatch.setattr(rows.Row, "generator", lambda row, position: unreached if position > len(row.ids) else
                        rows.torch.Generator().manual_seed(rows.token_seed(row.seed, position)))

    def sample(logits, temperature, top_p, generator=None, top_k=0, min_p=0.0):
        if generator is unreached:
            raise RuntimeError("drawn where the row never goes")
        return drawn(logits, temperature, top_p, generator, top_k, min_p)

    monkeypatch.setattr(decoding, "sample", sample)
    assert _run(reference, _requests(reference, 24, **how), "ngram")[0] == plain

    def failing(*args, **kwargs):
        raise RuntimeError("every draw fails")

    monkeypatch.setattr(decoding, "sample", failing)
    for speculation in ("off", "ngram"):
        batch = Batch(reference, speculation=speculation)
        handle = Generation(_requests(reference, 24, **how)[0])
        batch.admit([handle])
        while batch.filling:
            batch.fill(10_000)
        assert [row.error for row in batch.evict()] and not batch.rows  # the first token's draw failed
