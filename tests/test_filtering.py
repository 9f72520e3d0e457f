"""Input filtering as tables: text cleaning, the content policy, and the policy file itself."""

import logging
import time
from pathlib import Path

import pytest

from service.errors import Refusal, status_of
from service.inputs.filtering import PolicyError, check_policy, clean_text, load_policy
from service.settings import Settings
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


@pytest.mark.parametrize("text", ["a forbidden phase", "abbbc", "BEGIN PRIVATE KEY", "ordinary math: 12*34"])
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


EVASIONS = [
    # combining marks after letters, and letters composed with them
    "the fo\u0323rbidden phrase", "f\u0301o\u0301r\u0301b\u0301i\u0301d\u0301d\u0301e\u0301n phrase",
    "the f\u1ecdrbidden phrase",
    # separators inside words
    "the forbidden-phrase", "forbidden_phrase", "for.bid.den phrase", "f-o-r-b-i-d-d-e-n p-h-r-a-s-e",
    # letter-spacing
    "f o r b i d d e n p h r a s e", "say f o r b i d d e n phrase",
    # leetspeak
    "f0rb1dd3n phr4s3", "f0rbidd3n phr@$e", "the f0rb1dden phra5e",
    # each with the earlier homoglyph and format-character tricks
    "f\u043er-b\u200bidden phr\u0430se", "f\u043e\u0323rbidden phrase", "f 0 r b 1 d d 3 n phr\u0430se",
    "\uff46\uff10\uff52\uff42\uff49\uff44\uff44\uff45\uff4e phrase", "f\u200b0rb1dd3n\u00adphrase",
    # mixed: separators and spaces, leet with separators, a Unicode dash
    "f-o r-b-i-d-d-e-n phrase", "f.0.r.b.1.d.d.3.n phrase", "f. o. r. b. i. d. d. e. n phrase",
    "forb\u2013idden phr\u00b7ase",
]


@pytest.mark.parametrize("text", EVASIONS)
def test_the_evasions_the_fold_now_sees_through_are_refused(rules, text):
    with pytest.raises(Refusal) as err:
        check_policy(rules, {"question": clean_text("question", text, 200)})
    assert err.value.code == "content_policy"


def test_a_term_split_around_an_assistants_turn_is_caught():
    """The user's own messages are matched joined, without the assistant's words between them."""
    from service.serving import prompts
    from service.inputs.schemas import ChatRequest

    class State:
        policy = load_policy(_policy_file())
        settings = Settings()

    body = ChatRequest.model_validate({"model": "auto", "messages": [
        {"role": "user", "content": "say the forbidden"}, {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "phrase"}]})
    with pytest.raises(Refusal) as err:
        prompts._clean_messages(State, None, body.messages)
    assert err.value.code == "content_policy" and err.value.param == "messages"


def _policy_file(extra=""):
    import tempfile

    path = Path(tempfile.mkdtemp()) / "policy.toml"
    path.write_text(POLICY + extra)
    return path


ORDINARY = [line for line in (Path(__file__).parent / "data" / "ordinary_questions.txt").read_text().splitlines()
            if line.strip()]
MORE_TERMS = '\n[[rule]]\nid = "more"\nterms = ["malware", "ransomware", "credit card dump", "make a bomb", ' \
             '"banned phrase", "example forbidden phrase"]\n'


def test_ordinary_math_and_code_is_never_refused_because_of_the_fold():
    """A corpus of ordinary math and code questions (x-1, 3.14, a_1, e^x, f(x) = 3x + 4, s.t., code): none is
    refused, nor are they as one conversation of user messages."""
    rules = load_policy(_policy_file(MORE_TERMS))
    assert len(ORDINARY) >= 90
    for line in ORDINARY:
        check_policy(rules, {"question": clean_text("question", line, 2000)})
    for i in range(0, len(ORDINARY), 10):  # as conversations: each joined, and the user's turns joined
        lines = ORDINARY[i:i + 10]
        fields = {f"messages.{j}.content": line for j, line in enumerate(lines)}
        check_policy(rules, fields, authored=[name for j, name in enumerate(fields) if j % 2 == 0])


@pytest.mark.parametrize("parts", [("say the forbid-", "den phrase"), ("f o r b", " i d d e n phrase")])
def test_a_term_folded_across_a_message_boundary_is_caught(rules, parts):
    fields = {f"messages.{i}.content": part for i, part in enumerate(parts)}
    with pytest.raises(Refusal):
        check_policy(rules, fields)


SHORT = '[[rule]]\nid = "short"\nterms = ["sex", "bomb"]\n[[rule]]\nid = "ssn"\nregex = "\\\\d{3}-\\\\d{2}-\\\\d{4}"\n'


@pytest.mark.parametrize("text", ["sys.exit(0)", "self.is_exact(x)", "os.execv(path)", "y = 5ex + 1",
                                  "b_o_m_b_count = 1", "let x = 5\nexplain why"])
def test_short_terms_are_not_folded_into_code_and_math(text):
    """A term under FOLDED_TERM_LETTERS letters matches as written (marks and look-alikes aside): folding it
    would refuse code such as sys.exit ("sex" once the dot goes) and math such as 5ex."""
    check_policy(load_policy(_policy_file(SHORT)), {"question": text})


def test_regex_rules_match_the_text_as_written():
    rules = load_policy(_policy_file(SHORT))
    with pytest.raises(Refusal) as err:
        check_policy(rules, {"question": "my number is 123-45-6789"})  # the dashes are the rule's own
    assert "ssn" in err.value.message
    with pytest.raises(Refusal):
        check_policy(rules, {"question": "a b\u00f3mb"})  # short terms still see through marks


@pytest.mark.parametrize("term", ["\u0301", " ", "\u200b"])
def test_a_term_empty_once_folded_is_refused_when_the_policy_loads(term):
    with pytest.raises(PolicyError, match="empty once folded"):
        load_policy(_policy_file(f'[[rule]]\nid = "e"\nterms = ["{term}"]\n'))


@pytest.mark.parametrize("text", ["1" * 16000, "$" * 16000, "a-" * 8000, "a " * 8000 + "aa", "1a" * 8000])
def test_folding_a_long_text_stays_linear(rules, text):
    """A hostile field at the length limit: folded and matched at once (the folds are linear), not minutes."""
    started = time.monotonic()
    check_policy(rules, {"messages.0.content": text, "messages.1.content": text},
                 authored=["messages.0.content", "messages.1.content"])
    assert time.monotonic() - started < 5  # about 0.1 s here; quadratic was minutes
