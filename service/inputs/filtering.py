"""Input filtering: plain functions, no Flask.

Text fields are checked for broken Unicode and control characters, their line
ends made `\n`, NFKC normalised and bounded in characters, then matched
against the content policy. Token bounds are checked where the tokenizer is
(service.serving.prompts).

The content policy is a TOML file named by VIBE_CONTENT_POLICY_PATH:

    [[rule]]
    id = "private-keys"
    regex = "-----BEGIN [A-Z ]*PRIVATE KEY-----"

    [[rule]]
    id = "banned-terms"
    terms = ["example forbidden phrase", "another one"]

Matching is on a policy form of the text, so the usual ways around a term do
not work: invisible format characters (zero-width space, soft hyphen, word
joiner, bidi controls, variation selectors, tag characters) are dropped,
look-alike letters of other scripts are folded to Latin with Unicode's
confusables table (UTS #39, through confusable-homoglyphs), case is folded
and whitespace runs collapse (a term's words match with any whitespace, or
none, between them). Terms are also matched with combining marks taken off
their letters (`e\u0323`, `ẹ`: `e`), and a term of FOLDED_TERM_LETTERS
letters or more also in a folded reading: separators inside a word
(`for-bid.den_phrase`) and between spaced-out letters (`f o r b`, `f. o. r`)
removed, and the leetspeak readings of that (`0 o, 1 i or l, 3 e, 4 a, 5 s,
7 t, @ a, $ s`, in words that hold a letter, so `3.14` stays a number).
Shorter terms are not folded so: `sys.exit` holds "sex" once folded, and
`5ex` reads "sex". Regex rules match the plain policy form, as written.
Each field is matched, then the whole conversation as one text, then the
user's own messages as one text without the turns between them, so a term
split across messages, even around an assistant's turn, is found too. A
refusal is a 422 with code `content_policy`; the log gets the rule id and a
hash of the input, never the input nor what matched.

The text the model sees is the cleaned field, not its policy form.
"""

import functools
import hashlib
import json
import logging
import re
import tomllib
import unicodedata
from dataclasses import dataclass
from importlib import resources

from service.errors import BadRequest, Forbidden, Unprocessable

log = logging.getLogger("vibethinker.filtering")
ALLOWED_CONTROLS = {"\t", "\n", "\r"}
LINE_ENDS = re.compile(r"\r\n?")
# NFKC composes at most this many code points into one (a letter and three marks, as U+1FAF), so a text
# longer than this many times a limit is over it however it normalises.
NFKC_MOST_COMPOSED = 4
WHITESPACE = re.compile(r"\s+")
FOLDED_TERM_LETTERS = 5  # a term this long is also matched in the folded readings (shorter ones collide)
SEPARATORS = "\\-._/*'\u00b7\u2010-\u2015\u2027\u2219"  # hyphens, dots, slashes, stars, apostrophes, dashes
SEPARATED = re.compile(rf"(?<=\w)[{SEPARATORS}]+(?=\w)")  # inside a word
SPACED_OUT = re.compile(rf"(?<!\w)\w(?:[ {SEPARATORS}]+\w)+(?!\w)")  # single characters, spaced out
NOT_WORD = re.compile(r"\W+")
LEET_WORD = re.compile(r"[\w@$]+")  # a word (with its symbols): read as leet if it holds a letter
LETTER = re.compile(r"[^\W\d_]")
LEET = tuple(str.maketrans(table) for table in (
    {"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s"},
    {"0": "o", "1": "l", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s"}))
# Characters that render as nothing (or only change their neighbour's look): dropped before matching.
INVISIBLE_RANGES = ((0xFE00, 0xFE0F), (0xE0100, 0xE01EF), (0x034F, 0x034F), (0x115F, 0x1160), (0x3164, 0x3164))


class PolicyError(Exception):
    """The policy file is unreadable or has a bad rule; the message says which."""


@dataclass(frozen=True)
class Rule:
    """A policy rule: its regex (on the policy form), its terms (on the term form) and its long terms (also on
    the folded readings); None where it has none."""

    id: str
    regex: re.Pattern | None = None
    terms: re.Pattern | None = None
    folded: re.Pattern | None = None

    def matches(self, forms):
        """Whether any of a text's Forms matches this rule."""
        return bool((self.regex and self.regex.search(forms.policy))
                    or (self.terms and self.terms.search(forms.terms))
                    or (self.folded and any(self.folded.search(reading) for reading in forms.readings)))


class Forms:
    """The forms of one text the rules match, made once each and only when asked."""

    def __init__(self, text):
        self.text = text

    @functools.cached_property
    def policy(self):
        return policy_form(self.text)

    @functools.cached_property
    def terms(self):
        return term_form(self.text)

    @functools.cached_property
    def readings(self):
        return readings(fold(self.terms))


def clean_text(name, value, max_chars, allow_empty=False):
    """The NFKC-normalised text, or BadRequest saying what is wrong with it."""
    if len(value) > max_chars * NFKC_MOST_COMPOSED:  # hopeless however it normalises: before the per-char work
        raise BadRequest(f"{name} is {len(value)} characters; the limit is {max_chars}", "too_long", name)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{name} is not valid Unicode (it has a lone surrogate escape)", "invalid_unicode",
                         name) from None
    bad = next((c for c in value if unicodedata.category(c) == "Cc" and c not in ALLOWED_CONTROLS), None)
    if bad is not None:
        raise BadRequest(f"{name} contains the control character U+{ord(bad):04X}; only tab, newline and "
                         "carriage return are allowed", "control_character", name)
    value = unicodedata.normalize("NFKC", LINE_ENDS.sub("\n", value))
    if not allow_empty and not value.strip():
        raise BadRequest(f"{name} must not be empty", "empty", name)
    if len(value) > max_chars:
        raise BadRequest(f"{name} is {len(value)} characters; the limit is {max_chars}", "too_long", name)
    return value


def load_policy(path):
    """The rules of a policy file (none if `path` is None); PolicyError on a bad file."""
    if path is None:
        return ()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PolicyError(f"VIBE_CONTENT_POLICY_PATH: cannot read {path}: {exc}") from None
    rules = []
    for index, entry in enumerate(data.get("rule", [])):
        rule_id = entry.get("id") or f"rule-{index + 1}"
        try:
            rules.append(_compile(rule_id, entry))
        except (re.error, TypeError, ValueError) as exc:
            raise PolicyError(f"VIBE_CONTENT_POLICY_PATH: {path}: rule {rule_id!r}: {exc}") from None
    return tuple(rules)


def _compile(rule_id, entry):
    unknown = set(entry) - {"id", "terms", "regex"}
    if unknown:
        raise ValueError(f"unknown key {sorted(unknown)[0]!r} (use id, terms, regex)")
    terms = entry.get("terms", [])
    if not terms and not entry.get("regex"):
        raise ValueError("a rule needs terms or a regex")
    forms = [term_form(term) for term in terms]
    empty = next((term for term, form in zip(terms, forms) if not form.strip()), None)
    if empty is not None:
        raise ValueError(f"the term {empty!r} is empty once folded (it would match every text)")
    long = [form for form in forms if sum(c.isalpha() for c in form) >= FOLDED_TERM_LETTERS]
    folded = {reading for form in long for reading in readings(fold(form))}
    return Rule(rule_id, re.compile(entry["regex"], re.IGNORECASE) if entry.get("regex") else None,
                _alternatives(forms), _alternatives(sorted(folded)))


def _alternatives(forms):
    """One pattern matching any of `forms`, each form's words with any whitespace (or none) between them."""
    if not forms:
        return None
    return re.compile("|".join(r"\s*".join(map(re.escape, form.split())) for form in forms))


def check_policy(rules, fields, whole="messages", authored=None):
    """Unprocessable if any field, or all of them as one text (param `whole`), or the fields named in
    `authored` (the user's own messages) as one text, matches a rule; logs the rule id and an input hash
    only."""
    if not rules:
        return
    texts = {name: text for name, text in fields.items() if text}
    candidates = [(name, Forms(text)) for name, text in texts.items()]
    if len(texts) > 1:
        candidates.append((whole, Forms("".join(texts.values()))))
    own = [texts[name] for name in authored or () if name in texts]
    if 1 < len(own) < len(texts):  # the turns between them left out
        candidates.append((whole, Forms("".join(own))))
    for name, forms in candidates:
        for rule in rules:
            if rule.matches(forms):
                digest = hashlib.sha256(forms.text.encode("utf-8")).hexdigest()[:16]
                log.warning("content policy refusal: rule=%s field=%s input_sha256=%s", rule.id, name, digest)
                what = "the conversation" if name == whole and len(texts) > 1 else name
                raise Unprocessable(f"{what} was refused by the content policy (rule {rule.id})",
                                    "content_policy", name)


def policy_form(text):
    """The text as regex rules match it: NFKC, invisible characters dropped, confusables folded to Latin,
    case folded, whitespace runs made one space."""
    return _folded(unicodedata.normalize("NFKC", text), lambda c: not _invisible(c))


def term_form(text):
    """The text as terms match it: the policy form, with combining marks taken off their letters first."""
    decomposed = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", text))
    return _folded(decomposed, lambda c: not _invisible(c) and not _mark(c))


def _folded(text, keep):
    """`text` with only the characters `keep` keeps, confusables folded to Latin, case folded, whitespace runs
    made one space: the tail both forms share."""
    text = "".join(c for c in text if keep(c)).translate(_confusables())
    return WHITESPACE.sub(" ", text.casefold())


def fold(form):
    """A term form with the separators inside words, and between spaced-out letters, removed."""
    form = SPACED_OUT.sub(lambda match: NOT_WORD.sub("", match[0]), form)
    return SEPARATED.sub("", form)


def readings(form):
    """A folded form and its leetspeak readings (digits and symbols as letters, in words holding a letter)."""
    found = [form]
    for table in LEET:
        reading = LEET_WORD.sub(lambda match: match[0].translate(table) if LETTER.search(match[0]) else match[0],
                                form)
        if reading not in found:
            found.append(reading)
    return found


def _mark(char):
    return unicodedata.category(char) in ("Mn", "Me")


def _invisible(char):
    point = ord(char)
    return unicodedata.category(char) == "Cf" or any(low <= point <= high for low, high in INVISIBLE_RANGES)


@functools.cache
def _confusables():
    """str.translate table: each non-ASCII character that Unicode lists as confusable with an ASCII letter
    or digit (Cyrillic а, Greek ο, ...) becomes that character."""
    data = json.loads(resources.files("confusable_homoglyphs").joinpath("confusables.json").read_text("utf-8"))
    table = {}
    for char, glyphs in data.items():
        if len(char) != 1 or char.isascii():
            continue
        ascii_glyphs = [g["c"] for g in glyphs if len(g["c"]) == 1 and g["c"].isascii() and g["c"].isalnum()]
        letters = [g for g in ascii_glyphs if g.isalpha()] or ascii_glyphs
        if letters:
            table[ord(char)] = letters[0]
    return table


def check_allowed_prompt(system_prompt, allowed):
    """Forbidden unless the user's allow-list (None: any) holds this system prompt."""
    if allowed is None:
        return
    if system_prompt not in {unicodedata.normalize("NFKC", p) for p in allowed}:
        raise Forbidden("this system prompt is not on your account's allow-list; omit system_prompt for "
                        "the default or ask an admin", "system_prompt_not_allowed", "system_prompt")
