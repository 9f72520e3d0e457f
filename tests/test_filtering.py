"""Input filtering as tables: text cleaning, the content policy, and the policy file itself."""

import logging

import pytest

from service.errors import Refusal, status_of
from service.inputs.filtering import PolicyError, check_policy, clean_text, load_policy
from tests.support.policy import POLICY


@pytest.mark.parametrize("value,expected", [
    ("plain", "plain"),
    ("tab\tand\nnewline\r\n", "tab\tand\nnewline\n"),
    ("ｆｕｌｌ　ｗｉｄｔｈ", "full width"),  # NFKC folds full-width letters and spaces
    ("ﬁ ligature", "fi ligature"),
    ("x² + y²", "x2 + y2"),
    ("e\u0301", "é"),  # combining accent composed
    ("日本語 ✓ 🙂", "日本語 ✓ 🙂"),
])
def test_clean_text_normalises(value, expected):
    assert clean_text("question", value, 100) == expected


@pytest.mark.parametrize("value,code,fragment", [
    ("", "empty", "must not be empty"),
    ("  \n\t ", "empty", "must not be empty"),
    ("nul\x00byte", "control_character", "U+0000"),
    ("bell\x07", "control_character", "U+0007"),
    ("escape \x1b[31m", "control_character", "U+001B"),
    ("del\x7f", "control_character", "U+007F"),
    ("c1 \x85", "control_character", "U+0085"),
    ("lone \ud800 surrogate", "invalid_unicode", "lone surrogate"),
    ("a" * 101, "too_long", "101 characters; the limit is 100"),
    ("ｘ" * 101, "too_long", "limit is 100"),
])
def test_clean_text_refuses(value, code, fragment):
    with pytest.raises(Refusal) as err:
        clean_text("question", value, 100)
    assert (status_of(err.value), err.value.code, err.value.param) == (400, code, "question")
    assert fragment in err.value.message


def test_empty_allowed_where_asked():
    assert clean_text("system_prompt", "", 10, allow_empty=True) == ""


@pytest.fixture
def rules(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    return load_policy(path)


@pytest.mark.parametrize("field,text,rule", [
    ("question", "please say the Forbidden Phrase now", "banned"),
    ("question", "FORBIDDEN PHRASE", "banned"),
    ("system_prompt", "you know the forbidden phrase", "banned"),
    ("question", "terms are literal: a.b*c", "banned"),
    ("question", "-----BEGIN RSA PRIVATE KEY-----\nMII", "private-key"),
    ("question", "-----begin openssh private key-----", "private-key"),
])
def test_policy_refuses_with_422_and_logs_no_input(rules, caplog, field, text, rule):
    caplog.set_level(logging.WARNING, logger="vibethinker.filtering")
    fields = {"system_prompt": "", "question": "fine", field: text}
    with pytest.raises(Refusal) as err:
        check_policy(rules, fields)
    assert (status_of(err.value), err.value.code, err.value.param) == (422, "content_policy", field)
    assert rule in err.value.message
    logged = caplog.text
    assert f"rule={rule}" in logged and "input_sha256=" in logged and text not in logged


@pytest.mark.parametrize("text", ["a forbidden-phrase", "abbbc", "BEGIN PRIVATE KEY", "ordinary math: 12*34"])
def test_policy_lets_the_rest_through(rules, text):
    check_policy(rules, {"question": text})


def test_full_width_evasion_is_caught_after_normalisation(rules):
    text = clean_text("question", "ｆｏｒｂｉｄｄｅｎ ｐｈｒａｓｅ", 100)
    with pytest.raises(Refusal):
        check_policy(rules, {"question": text})


@pytest.mark.parametrize("content,fragment", [
    ("[[rule]]\nid = 'x'\nregex = '('\n", "rule 'x'"),
    ("[[rule]]\nid = 'y'\n", "needs terms or a regex"),
    ("[[rule]]\nid = 'z'\nwords = ['a']\n", "unknown key 'words'"),
    ("[[rule]\n", "cannot read"),
])
def test_bad_policy_file_names_the_problem(tmp_path, content, fragment):
    path = tmp_path / "policy.toml"
    path.write_text(content)
    with pytest.raises(PolicyError, match="VIBE_CONTENT_POLICY_PATH") as err:
        load_policy(path)
    assert fragment in str(err.value)


def test_no_policy_file_means_no_rules():
    assert load_policy(None) == ()


@pytest.mark.parametrize("text", [
    "the forbid\u200bden phrase",  # zero-width space
    "the forbid\u00adden phrase",  # soft hyphen
    "the forbidden\u2060phrase",  # word joiner instead of the space
    "the \u202eforbidden phrase\u202c",  # bidi controls
    "the forbidde\ufe0fn phrase",  # a variation selector
    "the forbidden\U000e0020phrase",  # a tag character
    "the f\u043erbidden phr\u0430se",  # Cyrillic o and a
    "the f\u03bfrbidden \u03c1hrase",  # Greek omicron and rho
    "the forbidden \t\n  phrase",  # extra whitespace
    "the FORBIDDENPHRASE",  # no whitespace at all
])
def test_the_usual_ways_around_a_term_are_caught(rules, text):
    with pytest.raises(Refusal) as err:
        check_policy(rules, {"question": clean_text("question", text, 200)})
    assert err.value.code == "content_policy"


@pytest.mark.parametrize("parts", [("say the forbidden", "phrase please"), ("say the forb", "idden phrase")])
def test_a_term_split_across_messages_is_caught(rules, parts):
    fields = {f"messages.{i}.content": part for i, part in enumerate(parts)}
    for name, part in fields.items():
        check_policy(rules, {name: part})  # alone, each part passes
    with pytest.raises(Refusal) as err:
        check_policy(rules, fields)
    assert err.value.param == "messages" and "the conversation" in err.value.message


def test_the_text_the_model_sees_keeps_its_characters():
    assert clean_text("question", "emoji \u2764\ufe0f and \u0430", 100) == "emoji \u2764\ufe0f and \u0430"


def test_no_text_longer_than_the_composing_bound_fits_a_limit_after_nfkc():
    """clean_text refuses len > NFKC_MOST_COMPOSED * limit before normalising: sound while no character
    decomposes to nothing (NFKD keeps the length or grows it) and none is composed of more code points."""
    import unicodedata

    from service.inputs.filtering import NFKC_MOST_COMPOSED

    points = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    assert min(len(unicodedata.normalize("NFKD", c)) for c in points) >= 1
    assert max(len(unicodedata.normalize("NFD", c)) for c in points) == NFKC_MOST_COMPOSED
    longest = "\u03a9\u0314\u0342\u0345"  # one character (U+1FAF) in NFKC
    assert len(unicodedata.normalize("NFKC", longest)) == 1
