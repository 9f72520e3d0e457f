"""What the store accepts: user names, quota fields, and text safe to print.

Checked before anything is written (auth.store, auth.tokens), each refusal a
StoreError 400 that names the bad field.
"""

import re

from auth.errors import StoreError

MAX_SYSTEM_PROMPTS = 50
MAX_MODELS = 16
MODEL_NAME = r"[A-Za-z0-9][A-Za-z0-9._:/+-]{0,127}"  # as the settings allow a served model's name
# Bounds of the integer quotas: a database column holds 64 bits, and no real quota comes near these.
QUOTA_MAX = {"daily_tokens": 10**15, "max_concurrent": 10_000, "max_files": 10**6, "max_stored_bytes": 10**15,
             "max_open_batches": 10_000, "daily_batches": 10**6}
NAME_PATTERN = r"[a-z0-9_][a-z0-9._-]{0,63}"  # a user name: also the spec's pattern (service.api.contract)


def check_name(name, kind="user"):
    """Refuse (StoreError 400) a user (or team) name outside NAME_PATTERN."""
    if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
        raise StoreError(400, f"{kind} name must be 1-64 characters of a-z, 0-9, '.', '_', '-', "
                         "starting with a letter, digit or '_'", "invalid_name", "name")


def check_quotas(quotas):
    """Validate quota fields (None clears one); StoreError 400 naming the bad one."""
    from limits import parse_many

    rate = quotas.get("rate_limit")
    if rate is not None:
        try:
            if not parse_many(rate):
                raise ValueError(rate)
        except ValueError:
            raise StoreError(400, f"rate_limit {rate!r} is not a limit such as '60/minute;2000/day'",
                             "invalid_rate_limit", "rate_limit") from None
    for name, high in QUOTA_MAX.items():
        value = quotas.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high):
            raise StoreError(400, f"{name} must be an integer between 1 and {high}", "out_of_range", name)
    prompts = quotas.get("system_prompts")
    if prompts is not None and (not isinstance(prompts, list) or len(prompts) > MAX_SYSTEM_PROMPTS
                                or not all(isinstance(p, str) and len(p) <= 16384 for p in prompts)):
        raise StoreError(400, f"system_prompts must be a list of at most {MAX_SYSTEM_PROMPTS} strings "
                         "(null allows any)", "invalid_value", "system_prompts")
    for i, prompt in enumerate(prompts or ()):
        check_text(f"system_prompts.{i}", prompt, controls="\t\n")
    models = quotas.get("models")
    if models is not None and (not isinstance(models, list) or len(models) > MAX_MODELS or not all(
            isinstance(m, str) and re.fullmatch(MODEL_NAME, m) for m in models)):
        raise StoreError(400, f"models must be a list of at most {MAX_MODELS} model names (null allows any)",
                         "invalid_value", "models")
    return quotas


def check_text(name, value, limit=None, controls=""):
    """Stored text must be valid Unicode without control characters (bar `controls`): it is printed in
    terminals (vibethinker-admin) and logs, where an escape sequence or a newline could forge a row."""
    if limit is not None and len(value) > limit:
        raise StoreError(400, f"{name} is longer than {limit} characters", "too_long", name)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise StoreError(400, f"{name} is not valid Unicode (it has a lone surrogate)", "invalid_unicode",
                         name) from None
    bad = next((c for c in value if (c < " " or "\x7f" <= c <= "\x9f") and c not in controls), None)
    if bad is not None:
        raise StoreError(400, f"{name} contains the control character U+{ord(bad):04X}", "control_character",
                         name)
    return value
