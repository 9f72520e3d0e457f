"""Several models without HTTP: the settings that declare them, the routing rules (a table), picking a
model by name, alias or "auto" under an allow-list, the memory check, and the cache key."""

import json
import time
from pathlib import Path

import pytest

from service import routing
from service.serving import cache
from service.serving.params import Params
from service.serving.models import Models, Served, revision
from service.errors import Refusal, status_of
from service.inference import footprint
from service.settings import ModelSpec, RoutingRule, Settings, SettingsError, load_settings

RULES = (RoutingRule(model="code", regex=r"(?i)\b(python|function|code)\b"),
         RoutingRule(model="Logic", keywords=("knights", "knaves", "sudoku")),
         RoutingRule(model="math", regex=r"\d+\s*[-+*/^=]\s*\d+"))


def models(*allowed_aliases):
    specs = [ModelSpec(name="math", path=Path("/m"), aliases=("VibeThinker",)),
             ModelSpec(name="code", path=Path("/c"), aliases=("coder",)),
             ModelSpec(name="logic", path=Path("/l"))]
    return Models([Served(spec, engine=None, revision="r") for spec in specs], RULES)


@pytest.mark.parametrize("question,expected", [
    ("Write a Python function that reverses a list", "code"),
    ("what does this CODE print?", "code"),
    ("Pythonic ways to sort?", "math"),  # "python" only as a whole word; no rule matches: the default
    ("On the island of knights and KNAVES, who lies?", "logic"),  # keywords: whole words, any case
    ("Solve a sudoku.", "logic"),
    ("a knavesque tale", "math"),  # a keyword inside a word is no match
    ("Solve for x: x^2 - 5x + 6 = 0", "math"),
    ("Write code to solve 2 + 2", "code"),  # the first matching rule wins
    ("", "math"),
    ("hello there", "math"),
])
def test_the_first_matching_rule_wins_else_the_default(question, expected):
    assert models().pick("auto", question).name == expected
    assert models().pick(None, question).name == expected  # /predict without a model


@pytest.mark.parametrize("question,allowed,expected", [
    ("Write a Python function", ["logic", "math"], "math"),  # the code rule is passed over: the default
    ("Write a Python function", ["logic"], "logic"),  # nor the default: the first model allowed
    ("Write a Python function", ["CODER"], "code"),  # an alias in any case allows its model
    ("knights and knaves", ["vibethinker"], "math"),
])
def test_auto_only_picks_a_model_the_caller_may_call(question, allowed, expected):
    assert models().pick("auto", question, allowed).name == expected


def test_no_model_allowed_is_a_403_and_a_forbidden_name_says_which():
    with pytest.raises(Refusal) as no_model:
        models().pick("auto", "hi", [])
    assert status_of(no_model.value) == 403 and no_model.value.code == "model_not_allowed"
    with pytest.raises(Refusal) as forbidden:
        models().pick("coder", "hi", ["math"])
    assert status_of(forbidden.value) == 403 and "'code'" in forbidden.value.message


def test_names_and_aliases_pick_in_any_case_and_unknown_names_list_the_served_ones():
    assert models().pick("VIBETHINKER", "").name == "math"
    assert models().pick("Code", "").name == "code"
    with pytest.raises(Refusal) as unknown:
        models().pick("gpt-4o", "")
    assert status_of(unknown.value) == 404 and unknown.value.code == "model_not_found"
    assert all(f"'{name}'" in unknown.value.message for name in ("math", "code", "logic"))


def test_routing_rules_compile_keywords_as_escaped_whole_words():
    [rule] = routing.compile_rules([RoutingRule(model="m", keywords=("c++", "a.b"))], str)
    assert rule.matches("is C++ fast?") and rule.matches("a.b") and not rule.matches("axb")


def spec_tables(tmp_path, text):
    config = tmp_path / "config.toml"
    config.write_text(text)
    return config


@pytest.mark.parametrize("toml,message", [
    ('[[models]]\nname = "a"\npath = "/a"\n[[models]]\nname = "A"\npath = "/b"\n', "'A' is used twice"),
    ('[[models]]\nname = "a"\npath = "/a"\naliases = ["b"]\n[[models]]\nname = "b"\npath = "/b"\n', "used twice"),
    ('[[models]]\nname = "auto"\npath = "/a"\n', "reserved"),
    ('[[models]]\nname = "a b"\npath = "/a"\n', "VIBE_MODELS"),
    ('[[models]]\nname = "a"\npath = "/a"\n[[routing]]\nmodel = "z"\nregex = "x"\n', "'z', which is not a served"),
    ('[[models]]\nname = "a"\npath = "/a"\n[[routing]]\nmodel = "a"\nregex = "("\n', "bad regex"),
    ('[[models]]\nname = "a"\npath = "/a"\n[[routing]]\nmodel = "a"\n', "exactly one of regex or keywords"),
    ('model_path = "/a"\n[[models]]\nname = "a"\npath = "/a"\n', "not both"),
    ('[[models]]\nname = "a"\npath = "/a"\nquantization = "int8"\ndevice = "cuda"\n', "VIBE_MODELS"),
    ('device = "cuda"\n[[models]]\nname = "a"\npath = "/a"\nquantization = "int8"\n', "CPU only"),
])
def test_bad_model_tables_stop_start_up_with_a_message(tmp_path, monkeypatch, toml, message):
    monkeypatch.setenv("VIBE_CONFIG", str(spec_tables(tmp_path, toml)))
    with pytest.raises(SettingsError, match=message):
        load_settings()


def test_model_tables_fill_dtype_and_quantization_from_the_top_level(tmp_path, monkeypatch):
    monkeypatch.setenv("VIBE_CONFIG", str(spec_tables(tmp_path, 'dtype = "bfloat16"\n[[models]]\nname = "a"\n'
                                                      'path = "/a"\n[[models]]\nname = "b"\npath = "/b"\n'
                                                      'quantization = "int8"\n')))
    a, b = load_settings().served_models()
    assert (a.name, a.dtype, a.quantization) == ("a", "bfloat16", "none")
    assert (b.name, b.quantization) == ("b", "int8")


def test_weights_are_counted_from_the_headers_and_a_set_too_big_is_refused(tiny_model):
    spec = lambda **kw: ModelSpec(path=tiny_model, **{"name": "t", "dtype": "float32", "quantization": "none", **kw})  # noqa: E731
    float32 = footprint.weight_bytes(spec())
    params = sum(count for _, _, count in footprint.tensors(tiny_model))
    assert float32 == 4 * params
    assert footprint.weight_bytes(spec(dtype="bfloat16")) == 2 * params
    assert footprint.weight_bytes(spec(quantization="int8")) < float32
    both = [spec(), spec(name="u")]
    assert footprint.check(both, setting=10 * float32) == {"t": float32, "u": float32}
    with pytest.raises(SettingsError, match=r"do not fit in 80% of .*memory_limit_bytes"):
        footprint.check(both, setting=int(2 * float32 / 0.8) - 1)


def test_the_ceiling_is_the_smallest_cgroup_limit_on_the_way_up(tmp_path):
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text("0::/system.slice/vibethinker.service\n")
    (proc / "meminfo").write_text("MemTotal:       1000 kB\n")
    service = root / "system.slice" / "vibethinker.service"
    service.mkdir(parents=True)
    (service / "memory.max").write_text("max\n")
    assert footprint.ceiling(proc=proc, cgroup_root=root) == (1024000, "the machine's memory (MemTotal)")
    (root / "system.slice" / "memory.max").write_text("5000\n")
    assert footprint.ceiling(proc=proc, cgroup_root=root)[0] == 5000
    (service / "memory.max").write_text("4096\n")
    assert footprint.ceiling(proc=proc, cgroup_root=root)[0] == 4096
    assert footprint.ceiling(123, proc=proc, cgroup_root=root) == (123, "memory_limit_bytes")


def test_a_model_folder_changed_on_disk_has_another_revision(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    first = revision(tmp_path, "bfloat16")
    assert revision(tmp_path, "bfloat16") == first and revision(tmp_path, "int8") != first
    (tmp_path / "model.safetensors").write_bytes(b"x")
    assert revision(tmp_path, "bfloat16") != first


def test_cache_keys_separate_users_models_revisions_and_parameters():
    settings = Settings(cache="user")
    served = Served(ModelSpec(name="m", path=Path("/m"), dtype="float32", quantization="none"), None, "rev1")
    greedy = Params(max_new_tokens=8, temperature=0.0, top_p=1.0)
    key = lambda s=settings, m=served, user="ann", ids=(1, 2), p=greedy: cache.key(s, m, user, ids, p)  # noqa: E731
    assert key() == key() and key().max_new_tokens == 8
    others = [key(user="bob"), key(ids=(1, 3)), key(p=Params(9, 0.0, 1.0)), key(p=Params(8, 0.0, 0.9)),
              key(m=Served(served.spec, None, "rev2")),
              key(m=Served(served.spec.model_copy(update={"quantization": "int8"}), None, "rev1")),
              key(p=Params(8, 0.0, 1.0, stop=("x",))), key(p=Params(8, 0.0, 1.0, n=2)),
              key(p=Params(8, 0.0, 1.0, logprobs=0)), key(p=Params(8, 0.0, 1.0, thinking_budget=100)),
              key(s=settings.model_copy(update={"answer_tokens": 9})),
              key(s=settings.model_copy(update={"thinking_closing": "Enough."}))]
    assert len({k.name for k in others} | {key().name}) == len(others) + 1
    assert key(p=Params(8, 0.7, 1.0)) is None  # sampled without a seed: not deterministic, never cached
    assert key(p=Params(8, 0.7, 1.0, seed=3)) is not None
    shared = settings.model_copy(update={"cache": "shared"})
    assert key(s=shared, user="ann").name == key(s=shared, user="bob").name
    assert key(s=settings.model_copy(update={"cache": "off"})) is None


@pytest.mark.parametrize("reason,tokens,stored", [("stop", 3, True), ("length", 8, True), ("length", 5, False),
                                                  ("timeout", 8, False), ("cancelled", 2, False)])
def test_only_whole_answers_are_stored(reason, tokens, stored):
    from service.inference.generation import GenerationResult

    key = cache.Key("k", "m", 8)
    kept = cache.Cache(cache.MemoryAnswers(), 60, 10_000)
    assert kept.store(key, GenerationResult("t", [1] * tokens, 4, reason, 0, 0)) is stored
    assert (kept.lookup(key) is not None) is stored


@pytest.mark.parametrize("ended,used,stored", [("budget", 8, True), ("loop", 8, True), ("length", 8, True),
                                               ("deadline", 8, False), ("length", 6, False), (None, 6, True)])
def test_a_thinking_ended_early_is_stored_only_when_the_request_alone_decided_it(ended, used, stored):
    from service.inference.generation import GenerationResult, Logprob

    key = cache.Key("k", "m", 8)
    kept = cache.Cache(cache.MemoryAnswers(), 60, 10_000)
    first = GenerationResult("a", [1, 2], 4, "length" if ended else "stop", 0, 0, forced_tokens=1,
                             thinking_ended=ended, logprobs=[Logprob(1, -0.5, ((1, -0.5), (3, -2.0)), True)])
    first.others = (GenerationResult("b", [5], 4, "stop", 0, 0, index=1),)
    assert kept.store(key, first, used) is stored
    if stored:  # every choice comes back as it was
        hit = kept.lookup(key)
        assert [(c.index, c.text, c.token_ids, c.thinking_ended, c.forced_tokens) for c in hit.choices] == \
            [(0, "a", [1, 2], ended, 1), (1, "b", [5], None, 0)]
        assert hit.logprobs == first.logprobs and hit.completion_tokens == 3


def test_a_replay_computed_nothing_so_its_whole_prompt_was_cached_entries_from_before_included():
    import json

    from service.inference.generation import GenerationResult

    key = cache.Key("k", "m", 8)
    kept = cache.Cache(cache.MemoryAnswers(), 60, 10_000)
    first = GenerationResult("a", [1, 2], 9, "stop", 0, 0, cached_tokens=3)
    first.others = (GenerationResult("b", [5], 9, "stop", 0, 0, index=1),)
    assert kept.store(key, first)
    hit = kept.lookup(key)
    assert [c.cached_tokens for c in hit.choices] == [9, 0]  # the request's figure, on its first choice
    old = {"prompt_tokens": 6, "choices": [{"text": "c", "token_ids": [4], "finish_reason": "stop"}]}
    kept.storage.set("old", json.dumps(old).encode(), 60)  # stored before cached_tokens (and forced_tokens)
    hit = kept.lookup(cache.Key("old", "m", 8))
    assert (hit.text, hit.prompt_tokens, hit.cached_tokens, hit.forced_tokens) == ("c", 6, 6, 0)


def test_an_entry_over_the_size_cap_is_not_stored_and_entries_expire():
    from service.inference.generation import GenerationResult

    now = [0.0]
    small = cache.Cache(cache.MemoryAnswers(clock=lambda: now[0]), 10, 256)
    key = cache.Key("k", "m", 8)
    assert not small.store(key, GenerationResult("x" * 300, [1], 4, "stop", 0, 0))
    assert small.store(key, GenerationResult("x", [1], 4, "stop", 0, 0)) and small.lookup(key).text == "x"
    now[0] = 11.0
    assert small.lookup(key) is None


@pytest.mark.parametrize("rule", [r"(a|aa)+$", r"(?i)(ab|a|b)+$", r"(\s|\s\s)+$",
                                  r"x(a|aa)+$", r"(?i)proof: (\w|\w\w)+$"])  # after the text a rule starts with
def test_a_rule_that_backtracks_catastrophically_is_refused_when_the_settings_load(tmp_path, monkeypatch, rule):
    table = f'[[models]]\nname = "a"\npath = "/a"\n[[routing]]\nmodel = "a"\nregex = {json.dumps(rule)}\n'
    monkeypatch.setenv("VIBE_CONFIG", str(spec_tables(tmp_path, table)))
    with pytest.raises(SettingsError, match="backtracks catastrophically") as refused:
        load_settings()
    assert repr(rule) in str(refused.value) and "'a'" in str(refused.value)  # the rule, by its model and regex


def test_a_slow_rule_times_out_on_a_question_and_routes_it_to_the_default():
    """A rule the probes pass (polynomial, not exponential: quick on 32 characters) that a question built for
    it makes backtrack: the match ends at its bound, the question goes to the default model, the rule's
    number is counted."""
    from service.records import metrics

    slow = RoutingRule(model="code", regex=r"(.*,)(.*,)(.*,)(.*,)(.*,)x")  # accepted
    served = Models([Served(ModelSpec(name=name, path=Path(f"/{name}")), engine=None, revision="r")
                     for name in ("math", "code")], (slow,))
    before = metrics.ROUTING_TIMEOUTS.labels("1")._value.get()
    started = time.monotonic()
    assert served.pick("auto", "," * 400 + "!").name == "math"
    assert time.monotonic() - started < 1.0  # its bound is 0.05 s
    assert metrics.ROUTING_TIMEOUTS.labels("1")._value.get() == before + 1
    assert served.pick("auto", "a,b,c,d,e,x").name == "code"  # what it was written for still routes
    assert served.pick("auto", "a question").name == "math"
