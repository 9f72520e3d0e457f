"""Input filtering: plain functions, no Flask.

Text fields are checked for broken Unicode and control characters, NFKC
normalised (so look-alike and full-width characters cannot slip past the
policy), bounded in characters, then matched against the content policy.
Token bounds are checked where the tokenizer is (service.api.generation).

The content policy is a TOML file named by VIBE_CONTENT_POLICY_PATH:

    [[rule]]
    id = "private-keys"
    regex = "-----BEGIN [A-Z ]*PRIVATE KEY-----"

    [[rule]]
    id = "banned-terms"
    terms = ["example forbidden phrase", "another one"]

Matching is case-insensitive, on the normalised system prompt and question. A
refusal is a 422 with code `content_policy`; the log gets the rule id and a
hash of the input, never the input.
"""

import hashlib
import logging
import re
import tomllib
import unicodedata
from dataclasses import dataclass

from service.errors import APIError

log = logging.getLogger("vibethinker.filtering")
ALLOWED_CONTROLS = {"\t", "\n", "\r"}


class PolicyError(Exception):
    """The policy file is unreadable or has a bad rule; the message says which."""


@dataclass(frozen=True)
class Rule:
    id: str
    pattern: re.Pattern


def clean_text(name, value, max_chars, allow_empty=False):
    """The NFKC-normalised text, or APIError 400 saying what is wrong with it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"{name} is not valid Unicode (it has a lone surrogate escape)", "invalid_unicode",
                       name) from None
    bad = next((c for c in value if unicodedata.category(c) == "Cc" and c not in ALLOWED_CONTROLS), None)
    if bad is not None:
        raise APIError(400, f"{name} contains the control character U+{ord(bad):04X}; only tab and newline "
                       "are allowed", "control_character", name)
    value = unicodedata.normalize("NFKC", value)
    if not allow_empty and not value.strip():
        raise APIError(400, f"{name} must not be empty", "empty", name)
    if len(value) > max_chars:
        raise APIError(400, f"{name} is {len(value)} characters; the limit is {max_chars}", "too_long", name)
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
            rules.append(Rule(rule_id, _compile(entry)))
        except (re.error, TypeError, ValueError) as exc:
            raise PolicyError(f"VIBE_CONTENT_POLICY_PATH: {path}: rule {rule_id!r}: {exc}") from None
    return tuple(rules)


def _compile(entry):
    unknown = set(entry) - {"id", "terms", "regex"}
    if unknown:
        raise ValueError(f"unknown key {sorted(unknown)[0]!r} (use id, terms, regex)")
    parts = [re.escape(unicodedata.normalize("NFKC", t)) for t in entry.get("terms", [])]
    if entry.get("regex"):
        parts.append(f"(?:{entry['regex']})")
    if not parts:
        raise ValueError("a rule needs terms or a regex")
    return re.compile("|".join(parts), re.IGNORECASE)


def check_policy(rules, fields):
    """APIError 422 if any field matches a rule; logs the rule id and an input hash only."""
    for name, text in fields.items():
        for rule in rules:
            if text and rule.pattern.search(text):
                digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
                log.warning("content policy refusal: rule=%s field=%s input_sha256=%s", rule.id, name, digest)
                raise APIError(422, f"{name} was refused by the content policy (rule {rule.id})",
                               "content_policy", name)


def check_allowed_prompt(system_prompt, allowed):
    """APIError 403 unless the user's allow-list (None: any) holds this system prompt."""
    if allowed is None:
        return
    if system_prompt not in {unicodedata.normalize("NFKC", p) for p in allowed}:
        raise APIError(403, "this system prompt is not on your account's allow-list; omit system_prompt for "
                       "the default or ask an admin", "system_prompt_not_allowed", "system_prompt")
