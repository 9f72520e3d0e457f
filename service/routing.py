"""Which model answers a question when the client asks for "auto": the routing rules of the settings.

Rules are tried in order; the first whose regex matches the question, or
that holds one of its keywords as a whole word (any case), names the model.
No rule matching: the default model (the first served). A rule naming a
model the caller may not call is passed over, as if it did not match, so
"auto" only ever picks a model the caller may use. Plain functions over
settings.RoutingRule, with no Flask and no torch: tested with a table.
"""

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    """One compiled routing rule: questions it matches go to `model` (a served model's name)."""

    model: str
    pattern: re.Pattern

    def matches(self, text):
        return self.pattern.search(text) is not None


def compile_rules(rules, canonical):
    """Rules from settings.RoutingRule tables; `canonical(name)` gives the served name of a name or alias."""
    compiled = []
    for rule in rules:
        if rule.regex is not None:
            pattern = re.compile(rule.regex)
        else:
            words = "|".join(re.escape(word.strip()) for word in rule.keywords)
            pattern = re.compile(rf"(?<!\w)(?:{words})(?!\w)", re.IGNORECASE)
        compiled.append(Rule(canonical(rule.model), pattern))
    return tuple(compiled)


def route(rules, text, default, allowed=None):
    """The model for `text`: the first matching rule's (among models in `allowed`, when given), else
    `default` if allowed, else the first allowed model (`allowed` keeps the served order); None if the
    caller may call no model."""
    permitted = (lambda name: True) if allowed is None else (lambda name: name in allowed)
    for rule in rules:
        if permitted(rule.model) and rule.matches(text):
            return rule.model
    if permitted(default):
        return default
    return next(iter(allowed), None)
