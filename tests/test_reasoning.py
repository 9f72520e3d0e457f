"""The thinking apart from the answer, in process: the splitter (whole and streamed), the boxed extractor, the
template probe, the OpenAI default fields, and the cache key's reasoning_format."""

from pathlib import Path

import pytest

from service.errors import BadRequest
from service.inputs.schemas import ChatRequest, parse
from service.api.answer_models import ChatCompletion, Prediction
from service.inference.generation import GenerationResult
from service.serving import cache, params, shapes
from service.serving.caller import Caller
from service.serving.job import Job
from service.serving.answers import Checker, final_answer
from service.serving.models import Served
from service.serving.reasoning import Markers, Splitter, split
from service.settings import ModelSpec, Settings

THINK = Markers()
OPENED = Markers(opened=True)
NONE = Markers("", "")
TEXT = "<think>a < b, and </thin is not the end</think>\n\nThe answer: \\boxed{3}"


@pytest.mark.parametrize("text,markers,reasoning,answer", [
    (TEXT, THINK, "a < b, and </thin is not the end", "\n\nThe answer: \\boxed{3}"),
    ("\n <think>x</think>y", THINK, "x", "y"),  # whitespace before the thinking is not answer
    ("<think>cut by length", THINK, "cut by length", ""),  # never closed: all thinking
    ("<think></think>only", THINK, "", "only"),
    ("no thinking at all", THINK, None, "no thinking at all"),
    ("<thin", THINK, None, "<thin"),  # a partial tag at the end is text after all
    ("x</think>y", OPENED, "x", "y"),  # the template opened it: the text starts inside
    ("<think>x</think>y", OPENED, "x", "y"),  # ... and a model that writes the tag again is read the same
    ("still thinking", OPENED, "still thinking", ""),
    ("<think>x</think>y", NONE, None, "<think>x</think>y"),  # a model that does not mark its reasoning
])
def test_split(text, markers, reasoning, answer):
    parts = split(text, markers)
    assert (parts.reasoning, parts.answer) == (reasoning, answer)


def fed(text, size, markers=THINK, raw=False):
    splitter = Splitter(markers, raw)
    parts = [part for start in range(0, len(text), size) for part in splitter.feed(text[start:start + size])]
    return parts + splitter.flush()


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13, len(TEXT)])
@pytest.mark.parametrize("markers", [THINK, OPENED])
def test_a_stream_fed_in_any_pieces_splits_as_the_whole_text(size, markers):
    text = TEXT if markers is THINK else TEXT.removeprefix("<think>")
    parts = fed(text, size, markers)
    whole = split(text, markers)
    assert "".join(t for kind, t in parts if kind == "reasoning") == whole.reasoning
    assert "".join(t for kind, t in parts if kind == "content") == whole.answer
    assert not any("think>" in t or t.endswith(("<", "</", "</t")) for _, t in parts[:-1])


@pytest.mark.parametrize("size", [1, 2, 3, 4, 7])
def test_a_raw_stream_never_cuts_a_tag(size):
    parts = fed(TEXT, size, raw=True)
    assert {kind for kind, _ in parts} == {"content"} and "".join(t for _, t in parts) == TEXT
    edges, at = set(), 0
    for _, piece in parts:
        at += len(piece)
        edges.add(at)
    for tag in ("<think>", "</think>"):
        start = TEXT.index(tag)
        assert not edges & set(range(start + 1, start + len(tag))), (tag, parts)


@pytest.mark.parametrize("text,expected", [
    ("so \\boxed{x=3}.", "x=3"),
    ("\\boxed{1} then \\boxed{2}", "2"),  # the last one
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
    ("\\fbox{7}", "7"),
    ("\\boxed { 4 }", "4"),
    ("\\boxed{5} and an unclosed \\boxed{6", "5"),  # the last balanced one
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
    ("no box here: 3", None),
    ("", None),
    (None, None),
])
def test_final_answer(text, expected):
    assert final_answer(text) == expected


@pytest.mark.parametrize("template,opens", [
    ("{{ messages[0]['content'] }}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", False),
    ("{{ messages[0]['content'] }}{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}", True),
])
def test_the_template_probe_sees_whether_the_template_opens_the_thinking(tiny_model, template, opens):
    from transformers import AutoTokenizer

    from service.inference.model import opens_reasoning

    tokenizer = AutoTokenizer.from_pretrained(tiny_model, local_files_only=True)
    tokenizer.chat_template = template
    assert opens_reasoning(tokenizer, "<think>") is opens
    assert opens_reasoning(tokenizer, "") is False


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_the_openai_default_fields_are_accepted():
    body = parse(ChatRequest, {**CHAT, "presence_penalty": 0, "frequency_penalty": 0.0, "logprobs": False,
                               "store": False, "metadata": {"run": "1"}, "parallel_tool_calls": True,
                               "service_tier": "auto", "tool_choice": "none", "tools": []})
    assert params.refuse_unsupported(body) is None


@pytest.mark.parametrize("field,value", [
    ("presence_penalty", 0.5), ("frequency_penalty", -1), ("service_tier", "flex"),
    ("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "auto"),
])
def test_what_the_service_cannot_do_is_refused_by_name(field, value):
    with pytest.raises(BadRequest) as refused:
        params.refuse_unsupported(parse(ChatRequest, {**CHAT, field: value}))
    assert refused.value.param == field and refused.value.code == "unsupported_value"
    assert field in refused.value.message or "functions" in refused.value.message


def test_the_cache_key_holds_the_reasoning_format():
    settings = Settings(cache="user")
    served = Served(ModelSpec(name="m", path=Path("/m"), dtype="float32", quantization="none"), None, "r")
    keys = {cache.key(settings, served, "ann", (1, 2), params.Params(8, 0.0, 1.0, reasoning_format=fmt)).name
            for fmt in ("auto", "none")}
    assert len(keys) == 2


def test_a_model_with_only_an_end_tag_starts_inside_its_thinking_and_a_start_tag_alone_is_refused(tmp_path):
    implied = Served(ModelSpec(name="m", path=tmp_path, reasoning_start=""), None, "r1")
    assert implied.markers.opened and split("x</think>y", implied.markers) == split("<think>x</think>y", THINK)
    with pytest.raises(ValueError, match="reasoning_start without a reasoning_end"):
        ModelSpec(name="m", path=tmp_path, reasoning_end="")


def test_an_answer_full_of_unclosed_boxes_is_read_in_bounded_time():
    text = "\\boxed{" * 50_000 + " \\boxed{7}"
    assert final_answer(text) == "7"
    assert final_answer("\\boxed{1} " + "\\boxed{" * 20) is None  # only the last boxes are tried


def test_a_checked_pair_is_answered_from_memory_and_a_busy_pool_is_not_remembered():
    checker, asked = Checker(timeout_s=1), []

    def check(expected, given):
        asked.append((expected, given))
        return ((None, "too many answers are being checked now"), False) if given == "busy" else ((True, None), True)

    checker._check = check
    assert checker.check("3", "x=3") == checker.check("3", "x=3") == (True, None)
    assert checker.check("3", "busy") == checker.check("3", "busy") == (None, "too many answers are being checked now")
    assert asked == [("3", "x=3"), ("3", "busy"), ("3", "busy")]


def answered(kind, cached_tokens):
    """A job of `kind` and its finished result of two choices, as the engine gives them: the request's cached
    prompt tokens on the first choice, 0 on the other."""
    served = Served(ModelSpec(name="m", path=Path("/m"), dtype="float32", quantization="none"), None, "r")
    job = Job(Caller("ann"), kind=kind, served=served, params=params.Params(8, 0.0, 1.0, n=2),
              echo={"input": "q", "system_prompt": "s"})
    result = GenerationResult("no thinking: \\boxed{4}", [1, 2, 3], 12, "stop", 0.0, 0.0, forced_tokens=1,
                              cached_tokens=cached_tokens)
    result.others = (GenerationResult("4", [5], 12, "stop", 0.0, 0.0, index=1),)
    return job, result


@pytest.mark.parametrize("cached_tokens", [0, 7, 12])
def test_a_chat_usage_says_how_many_prompt_tokens_the_prefix_cache_gave_in_openais_shape(cached_tokens):
    job, result = answered("chat", cached_tokens)
    body = shapes.completion(None, job, result)
    assert body["usage"] == {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16,
                             "prompt_tokens_details": {"cached_tokens": cached_tokens},
                             "completion_tokens_details": {"reasoning_tokens": 0, "forced_tokens": 1}}
    assert shapes.chat_usage(job, result) == body["usage"]  # a stream's usage chunk: the same
    assert ChatCompletion.model_validate(body).usage.prompt_tokens_details.cached_tokens == cached_tokens
    del body["usage"]["prompt_tokens_details"]
    with pytest.raises(ValueError, match="prompt_tokens_details"):  # the schema holds it: the fuzz checks it
        ChatCompletion.model_validate(body)


@pytest.mark.parametrize("cached_tokens", [0, 7, 12])
def test_a_prediction_usage_says_how_many_prompt_tokens_the_prefix_cache_gave_beside_the_forced(cached_tokens):
    job, result = answered("predict", cached_tokens)
    body = shapes.answer(None, job, result)
    assert body["usage"] == {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16, "forced_tokens": 1,
                             "cached_tokens": cached_tokens, "prompt_tokens_details": {"cached_tokens": cached_tokens}}
    usage = Prediction.model_validate(body).usage
    assert usage.cached_tokens == usage.prompt_tokens_details.cached_tokens == cached_tokens
    del body["usage"]["cached_tokens"]
    with pytest.raises(ValueError, match="cached_tokens"):
        Prediction.model_validate(body)
