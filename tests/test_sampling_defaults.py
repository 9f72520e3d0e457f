"""Sampling beyond temperature and top_p: top_k, min_p and repetition_penalty (vLLM's names and semantics), and
where a request's defaults come from (the settings, the model's generation_config.json, the fallback).

The sampler and the penalty are tested directly; the defaults on a copy of the demo model whose
generation_config.json sets a temperature; the fields through the real app in process (Flask's test client).
"""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from werkzeug.test import encode_multipart

from service.inference.decoding import choose, penalize, sample
from service.inference.generation import GenerationRequest
from service.inference.model import sampling_defaults
from service.inputs.schemas import ChatRequest, PredictRequest, parse
from service.serving import cache, params, prompts
from service.serving.caller import Caller
from service.serving.job import Job
from service.serving.models import Served
from service.settings import ModelSpec, Settings, load_settings
from service.state import state
from tests.support.inprocess import bearer, make_app, stop_app
from tests.support.reference import greedy

LOGITS = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
QUESTION = "Write a long essay."


def draws(logits=LOGITS, times=400, temperature=1.0, top_p=1.0, **filters):
    """The token ids `sample` draws from `logits` over `times` seeds."""
    return {sample(logits, temperature, top_p, torch.Generator().manual_seed(seed), **filters)
            for seed in range(times)}


@pytest.mark.parametrize("temperature", [0.01, 1.0, 2.0])
def test_top_k_1_is_the_argmax(temperature):
    logits = torch.randn(300, generator=torch.Generator().manual_seed(0))
    assert draws(logits, 50, temperature=temperature, top_k=1) == {int(logits.argmax())}


@pytest.mark.parametrize("top_k,drawn", [(2, {0, 1}), (3, {0, 1, 2}), (0, {0, 1, 2, 3}), (-1, {0, 1, 2, 3}),
                                         (4, {0, 1, 2, 3}), (1000, {0, 1, 2, 3})])
def test_top_k_keeps_the_k_most_likely(top_k, drawn):
    assert draws(top_k=top_k) == drawn


@pytest.mark.parametrize("min_p,drawn", [(0.0, {0, 1, 2, 3}), (0.2, {0, 1, 2}), (0.5, {0, 1}), (0.9, {0}),
                                         (1.0, {0})])
def test_min_p_drops_tokens_below_its_share_of_the_top_probability(min_p, drawn):
    # probabilities 0.5, 0.3, 0.15, 0.05: min_p 0.2 keeps those of at least 0.1
    assert draws(min_p=min_p) == drawn


def test_top_p_after_top_k_is_a_nucleus_of_the_kept_tokens():
    # top_k 2 leaves 0.5 and 0.3, that is 0.625 and 0.375 of what is left: a top_p of 0.6 is the first alone.
    assert draws(top_k=2, top_p=0.6) == {0}
    assert draws(top_p=0.6) == {0, 1}  # of all four, 0.5 does not reach 0.6


def test_the_filters_together_stay_inside_each_filter():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    probs = torch.softmax(logits / 0.7, -1)
    above = {i for i in range(1000) if probs[i] >= 0.02 * probs.max()}
    top = set(logits.topk(50).indices.tolist())
    assert draws(logits, temperature=0.7, top_p=0.9, top_k=50, min_p=0.02) <= above & top


def test_a_seeded_draw_is_repeatable_and_another_seed_draws_otherwise():
    logits = torch.randn(5000, generator=torch.Generator().manual_seed(2))

    def run(seed):
        generator = torch.Generator().manual_seed(seed)
        return [sample(logits, 1.0, 0.95, generator, top_k=200, min_p=0.01) for _ in range(20)]

    assert run(7) == run(7) and run(7) != run(8)


def test_the_neutral_filters_draw_exactly_as_without_them():
    logits = torch.randn(5000, generator=torch.Generator().manual_seed(3))
    for top_p in (1.0, 0.9):
        plain = [sample(logits, 0.8, top_p, torch.Generator().manual_seed(s)) for s in range(30)]
        assert plain == [sample(logits, 0.8, top_p, torch.Generator().manual_seed(s), top_k=0, min_p=0.0)
                         for s in range(30)]


def test_the_penalty_divides_positive_logits_and_multiplies_negative_ones_of_seen_ids_once():
    logits = torch.tensor([2.0, -2.0, 3.0, -1.0, 0.0])
    penalised = penalize(logits, ([0, 1, 1], [1, 4, 0]), 2.0)
    assert penalised.tolist() == [1.0, -4.0, 3.0, -1.0, 0.0]  # ids 0, 1 and 4 seen (0 and 1 more than once)
    assert logits.tolist() == [2.0, -2.0, 3.0, -1.0, 0.0]  # left as it was
    assert penalize(logits, ([2], []), 0.5).tolist() == [2.0, -2.0, 6.0, -1.0, 0.0]  # below 1: a bonus
    assert penalize(logits, ([], []), 2.0) is logits


def row(prompt_ids, greedy_row=True, **how):
    """A batch row as `choose` reads it (service.inference.batching.Row)."""
    request = GenerationRequest(prompt_ids, 8, temperature=0.0 if greedy_row else 1.0, **how)
    failed = []
    return SimpleNamespace(loaded=SimpleNamespace(forced=()), request=request, ids=[], greedy=greedy_row,
                           generator=lambda position: torch.Generator().manual_seed(position), fail=failed.append,
                           failed=failed)


def test_choose_gives_a_greedy_row_its_penalty_and_leaves_the_others_as_they_were():
    logits = torch.tensor([[3.0, 2.0, -1.0]] * 3)
    plain, penalised, sampled = row([0]), row([0], repetition_penalty=2.0), row([0], False, top_k=1)
    penalised.ids = [2]
    assert choose(logits, [plain, penalised, sampled]).tolist() == [0, 1, 0]
    assert not (plain.failed or penalised.failed or sampled.failed)


def test_choose_penalises_the_generated_ids_too():
    logits = torch.tensor([[2.5, 2.0, 1.9]])
    generated = row([0], repetition_penalty=1.5)  # 2.5 becomes 1.67: id 1 is the argmax ...
    assert choose(logits, [generated]).tolist() == [1]
    generated.ids = [1]  # ... until the reply holds it: 1.33, below 1.9
    assert choose(logits, [generated]).tolist() == [2] and not generated.failed


# --- the defaults: the request's value, else the setting, else the model's own, else the fallback ---

@pytest.fixture(scope="module")
def tuned_model(tiny_model, tmp_path_factory):
    """The demo model whose generation_config.json sets a temperature (0.3) and nothing else to sample by."""
    folder = tmp_path_factory.mktemp("models") / "tuned"
    shutil.copytree(tiny_model, folder)
    config = folder / "generation_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "temperature": 0.3}))
    return folder


def test_only_what_the_file_sets_is_the_models_default(tiny_model, tuned_model, tmp_path):
    assert sampling_defaults(tiny_model) == {}  # do_sample: false and end tokens: nothing to sample by
    assert sampling_defaults(tuned_model) == {"temperature": 0.3}
    (tmp_path / "generation_config.json").write_text(json.dumps({
        "temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": 0.05, "repetition_penalty": 1.1, "do_sample": True}))
    # transformers 4's library defaults (temperature 1.0, top_k 50) count when the file sets them
    assert sampling_defaults(tmp_path) == {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": 0.05,
                                           "repetition_penalty": 1.1}
    (tmp_path / "generation_config.json").write_text(json.dumps({
        "temperature": "hot", "top_k": 2.5, "top_p": 0, "min_p": True, "repetition_penalty": 1e-300}))
    assert sampling_defaults(tmp_path) == {}  # no value a sampler takes
    (tmp_path / "generation_config.json").unlink()
    assert sampling_defaults(tmp_path) == {}


@pytest.mark.parametrize("setting,asked,temperature", [(None, None, 0.3), (0.9, None, 0.9), (None, 1.1, 1.1),
                                                       (0.9, 1.1, 1.1), (0.0, None, 0.0)])
def test_the_request_wins_then_the_setting_then_the_model(setting, asked, temperature):
    settings = load_settings(default_temperature=setting)
    resolved = params.resolve(settings, temperature=asked, model={"temperature": 0.3})
    assert resolved.temperature == temperature
    assert (resolved.top_p, resolved.top_k, resolved.min_p, resolved.repetition_penalty) == (0.95, 0, 0.0, 1.0)


def test_without_setting_or_model_value_the_fallbacks_apply_and_each_setting_is_a_default():
    assert params.resolve(load_settings()) == params.Params(512, 0.6, 0.95, 0, 0.0, 1.0)
    model = {"temperature": 0.3, "top_p": 0.8, "top_k": 20, "min_p": 0.1, "repetition_penalty": 1.05}
    assert params.resolve(load_settings(), model=model) == params.Params(512, 0.3, 0.8, 20, 0.1, 1.05)
    settings = load_settings(default_temperature=1.0, default_top_p=0.9, default_top_k=-1, default_min_p=0.2,
                             default_repetition_penalty=1.2)
    assert params.resolve(settings, model=model) == params.Params(512, 1.0, 0.9, 0, 0.2, 1.2)  # -1: 0, off
    assert params.resolve(settings, top_k=-1).top_k == 0


def test_the_cache_key_holds_each_of_them():
    served = Served(ModelSpec(name="m", path=Path("/m"), dtype="float32", quantization="none"), None, "r")
    key = lambda **how: cache.key(Settings(cache="user"), served, "ann", (1, 2),  # noqa: E731
                                  params.Params(8, 0.0, 1.0, **how))
    names = {key().name, key(top_k=5).name, key(min_p=0.1).name, key(repetition_penalty=1.2).name}
    assert len(names) == 4 and key(repetition_penalty=1.2) is not None  # greedy with a penalty: deterministic


@pytest.fixture(scope="module")
def app(tuned_model, tmp_path_factory):
    app = make_app(tuned_model, tmp_path_factory.mktemp("app"), max_prompt_tokens=4096)
    yield app
    stop_app(app)


@pytest.fixture(scope="module")
def headers(app):
    return bearer(app, "sampler", rate_limit="1000/minute")  # this module's requests, well within a minute


def test_a_request_left_to_the_defaults_samples_at_the_models_temperature(app):
    held = state(app)
    assert held.models.default.engine.model.defaults == {"temperature": 0.3}
    asked = prompts.predict(held, Job(Caller("ann")), parse(PredictRequest, {"question": "hi"})).params
    assert (asked.temperature, asked.top_p, asked.top_k) == (0.3, 0.95, 0)
    chat = {"model": "VibeThinker-1.5B", "messages": [{"role": "user", "content": "hi"}], "temperature": 1.1,
            "top_k": 40, "min_p": 0.05, "repetition_penalty": 1.2}
    asked = prompts.chat(held, Job(Caller("ann")), parse(ChatRequest, chat)).params
    assert (asked.temperature, asked.top_k, asked.min_p, asked.repetition_penalty) == (1.1, 40, 0.05, 1.2)


def post(app, headers, route, **fields):
    """A /predict or chat request of `fields` (beside the question and a short answer) through the app."""
    if route == "chat":
        body = {"model": "VibeThinker-1.5B", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        return app.test_client().post("/v1/chat/completions", json={**body, **fields}, headers=headers)
    if route == "form":
        fields = {"question": "hi", "max_new_tokens": "2", **{k: str(v) for k, v in fields.items()}}
        boundary, body = encode_multipart(fields)
        return app.test_client().post("/v1/predict", data=body, headers=headers,
                                      content_type=f"multipart/form-data; boundary={boundary}")
    return app.test_client().post("/v1/predict", json={"question": "hi", "max_new_tokens": 2, **fields},
                                  headers=headers)


ROUTES = ["predict", "chat"]
REFUSED = [("top_k", 1001, "out_of_range"), ("top_k", -2, "out_of_range"), ("top_k", 1.5, "invalid_type"),
           ("top_k", "5", "invalid_type"), ("top_k", True, "invalid_type"), ("min_p", -0.1, "out_of_range"),
           ("min_p", 1.5, "out_of_range"), ("min_p", "0.1", "invalid_type"), ("repetition_penalty", 0, "out_of_range"),
           ("repetition_penalty", 5e-324, "out_of_range"),  # once a 500: a logit divided by it is inf
           ("repetition_penalty", 0.009, "out_of_range"), ("repetition_penalty", -1.0, "out_of_range"),
           ("repetition_penalty", 2.5, "out_of_range")]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("field,value,code", REFUSED)
def test_a_value_out_of_bounds_is_a_400_naming_its_field(app, headers, route, field, value, code):
    response = post(app, headers, route, **{field: value})
    assert response.status_code == 400, response.get_json()
    error = response.get_json()["error"]
    assert (error["param"], error["code"], error["type"]) == (field, code, "invalid_request_error")
    assert field in error["message"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("field,value", [("top_k", -1), ("top_k", 0), ("top_k", 1), ("top_k", 1000),
                                         ("min_p", 0), ("min_p", 0.05), ("min_p", 1.0),
                                         ("repetition_penalty", 0.01), ("repetition_penalty", 1),
                                         ("repetition_penalty", 2.0)])
def test_a_value_in_bounds_is_answered(app, headers, route, field, value):
    response = post(app, headers, route, **{field: value, "temperature": 1.0})
    assert response.status_code == 200, response.get_json()


def test_the_form_of_v1_predict_takes_them_too(app, headers):
    answered = post(app, headers, "form", top_k=5, min_p=0.1, repetition_penalty=1.1)
    assert answered.status_code == 200, answered.get_json()
    refused = post(app, headers, "form", top_k=1001).get_json()["error"]
    assert (refused["param"], refused["code"]) == ("top_k", "out_of_range")
    refused = post(app, headers, "form", min_p="lots").get_json()["error"]
    assert (refused["param"], refused["code"]) == ("min_p", "invalid_type")


def test_top_k_1_answers_as_greedy_and_a_penalty_as_transformers_does(app, headers, reference):
    messages = [{"role": "system", "content": state(app).settings.default_system_prompt},
                {"role": "user", "content": QUESTION}]
    plain = greedy(reference, messages, 24)[0]

    def answer(**fields):
        response = post(app, headers, "predict", question=QUESTION, max_new_tokens=24, **fields)
        assert response.status_code == 200, response.get_json()
        return response.get_json()["response"]

    assert answer(temperature=1.5, top_k=1) == plain
    ids = torch.tensor([reference.encode_chat(messages)])
    with torch.inference_mode():
        out = reference.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                                       do_sample=False, repetition_penalty=1.5, pad_token_id=reference.pad_id)
    penalised = reference.decode(out[0, ids.shape[1]:].tolist())
    assert penalised != plain  # the penalty changes this answer: the comparison below means something
    assert answer(temperature=0, repetition_penalty=1.5) == penalised
