"""Which model answers a question when the client asks for "auto": the routing rules of the settings.

Rules are tried in order; the first whose regex matches the question, or
that holds one of its keywords as a whole word (any case), names the model.
No rule matching: the default model (the first served). A rule naming a
model the caller may not call is passed over, as if it did not match, so
"auto" only ever picks a model the caller may use. Plain functions over
settings.RoutingRule, with no Flask and no torch: tested with a table.

An admin writes the regexes and any user writes the questions, so no match
may take long: rules are compiled with the `regex` module (the keyword rules
need look-arounds, which linear-time engines lack) and every match has a
bound (MATCH_TIMEOUT_S, and QUESTION_BUDGET_S for all of a question's
matches together). A match that runs past it ends the routing: the
question goes to the default model, and the rule's number (never the
question) is logged and counted in /metrics. A rule that backtracks
catastrophically on a probe string (`backtracks`) is refused when the
settings load, with a message naming it.
"""

import logging
import string
import time
from dataclasses import dataclass

import regex

log = logging.getLogger("vibethinker.routing")
MATCH_TIMEOUT_S = 0.05  # the most one rule may take on one question
PROBE_TIMEOUT_S = 0.05  # the most a rule may take on a probe string when the settings load
PROBE_LENGTH = 32  # characters a probe repeats: 2^32 steps for an exponential rule, a few hundred for a sane one
PROBE_ENDS = ("\x00", "!", " ", "")  # what follows the repeats: something no repeat matches, or nothing
QUESTION_BUDGET_S = 0.1  # the most all the rules together may take on one question
LEADING_FLAGS = regex.compile(r"^(?:\(\?[a-zA-Z]+\))*\^?")
LITERAL = regex.compile(r"[^\\.^$*+?{}\[\]|()]*")
PROBE_UNITS = tuple(string.ascii_letters + string.digits + " \t\n-_.,;:!?()[]{}+*/=<>'\"\\@#$%&|^~`") + (
    "ab", "a1", "a ", "1 ", "a.", "é", "\u4e00")


@dataclass(frozen=True)
class Rule:
    """One compiled routing rule: questions it matches go to `model` (a served model's name); `number` is its
    place among the rules (1: the first), its name in logs and metrics."""

    model: str
    pattern: regex.Pattern
    number: int = 0

    def matches(self, text, timeout=MATCH_TIMEOUT_S):
        """Whether `text` matches; TimeoutError past `timeout` seconds."""
        return self.pattern.search(text, timeout=timeout) is not None


def compile_pattern(text):
    """A rule's regex as the rules run it; regex.error when it is not one."""
    return regex.compile(text)


def backtracks(pattern):
    """A probe string on which `pattern` runs past PROBE_TIMEOUT_S (it backtracks catastrophically), or
    None. The probes repeat one unit (a character, a pair) and end in something else: where nested or
    overlapping repeats explode; each also after the literal text the pattern starts with, which would
    otherwise stop it at once. A best effort: every match keeps its own bound all the same."""
    for prefix in dict.fromkeys(("", leading_literal(pattern.pattern))):
        for unit in PROBE_UNITS:
            for end in PROBE_ENDS:
                probe = prefix + unit * (PROBE_LENGTH // len(unit)) + end
                try:
                    pattern.search(probe, timeout=PROBE_TIMEOUT_S)
                except TimeoutError:
                    return probe
    return None


def leading_literal(source):
    """The plain text a regex starts with (after its inline flags and a ^), up to its first special
    character; a quantified last character is left out."""
    source = LEADING_FLAGS.sub("", source)
    literal = LITERAL.match(source)[0]
    if literal and source[len(literal):len(literal) + 1] in ("*", "+", "?", "{"):
        literal = literal[:-1]
    return literal


def compile_rules(rules, canonical):
    """Rules from settings.RoutingRule tables; `canonical(name)` gives the served name of a name or alias."""
    compiled = []
    for number, rule in enumerate(rules, 1):
        if rule.regex is not None:
            pattern = compile_pattern(rule.regex)
        else:
            words = "|".join(regex.escape(word.strip()) for word in rule.keywords)
            pattern = regex.compile(rf"(?<!\w)(?:{words})(?!\w)", regex.IGNORECASE)
        compiled.append(Rule(canonical(rule.model), pattern, number))
    return tuple(compiled)


def route(rules, text, default, allowed=None, timed_out=lambda number: None):
    """The model for `text`: the first matching rule's (among models in `allowed`, when given), else
    `default` if allowed, else the first allowed model (`allowed` keeps the served order); None if the
    caller may call no model. A rule that runs past its bound ends the search there (`timed_out(number)` is
    told): the text goes to the default."""
    permitted = (lambda name: True) if allowed is None else (lambda name: name in allowed)
    ends = time.monotonic() + QUESTION_BUDGET_S
    for rule in rules:
        if not permitted(rule.model):
            continue
        try:
            if rule.matches(text, max(0.001, min(MATCH_TIMEOUT_S, ends - time.monotonic()))):
                return rule.model
        except TimeoutError:
            log.warning("routing rule %d (to %s) ran past its bound on a question (%g s a rule, %g s all "
                        "together); it went to the default model", rule.number, rule.model, MATCH_TIMEOUT_S,
                        QUESTION_BUDGET_S)
            timed_out(rule.number)
            break
    if permitted(default):
        return default
    return next(iter(allowed), None)
