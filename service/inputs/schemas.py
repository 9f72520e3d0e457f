"""Request bodies: JSON decoding and typed request models with precise 400s.

Types are strict (a string is not a number, a boolean is not an integer) and
unknown fields are refused by name, so a typo such as `max_new_token` is never
silently ignored. Bounds that come from settings are checked after parsing.
"""

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.errors import BadRequest, UnsupportedMedia

EXPECTED_CHARS = 1000  # an expected final answer: an expression, not a document
SEED_RANGE = (-(2**63), 2**63 - 1)  # what torch's generators take, and what OpenAI clients send

TYPE_NAMES = {"string_type": "a string", "int_type": "an integer", "float_type": "a number",
              "bool_type": "a boolean", "list_type": "a list", "dict_type": "an object",
              "model_type": "an object", "int_from_float": "an integer", "finite_number": "a finite number",
              "literal_error": "one of the allowed values"}


Effort = Literal["none", "minimal", "low", "medium", "high"]


class StrictModel(BaseModel):
    """Base of request models: strict types, no unknown fields."""

    model_config = ConfigDict(strict=True, extra="forbid")


class PredictRequest(StrictModel):
    """POST /predict and /v1/predict."""

    question: str
    system_prompt: str | None = None
    model: str | None = Field(None, max_length=256)  # a served model's name or alias; none or "auto": routed
    max_new_tokens: int | None = None
    temperature: Annotated[float, Field(allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(allow_inf_nan=False)] | None = None
    top_k: int | None = None  # vLLM's sampling extensions; their bounds: service.serving.params.resolve
    min_p: Annotated[float, Field(allow_inf_nan=False)] | None = None
    repetition_penalty: Annotated[float, Field(allow_inf_nan=False)] | None = None
    expected_answer: str | None = Field(None, min_length=1, max_length=EXPECTED_CHARS)
    thinking_token_budget: int | None = None  # vLLM's: thinking tokens before the thinking is ended
    reasoning_effort: Effort | None = None  # OpenAI's: a thinking budget from settings


class TextPart(StrictModel):
    """A message content part of text."""

    type: Literal["text"]
    text: str


class ImageURL(StrictModel):
    url: str  # a data: URL only (the server fetches no URL): data:image/png;base64,...
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(StrictModel):
    """An image as OpenAI's clients send it; its text is read by OCR (service.inputs.documents)."""

    type: Literal["image_url"]
    image_url: ImageURL


class FileData(StrictModel):
    filename: str | None = Field(None, max_length=255)
    file_data: str | None = None  # data:application/pdf;base64,... (or an image's data: URL)
    file_id: str | None = None  # OpenAI's uploaded files: not taken here, the message says so


class FilePart(StrictModel):
    """A PDF (or image) as OpenAI's clients send it."""

    type: Literal["file"]
    file: FileData


ContentPart = Annotated[TextPart | ImagePart | FilePart, Field(discriminator="type")]


class ChatMessage(StrictModel):
    """One message of a conversation."""

    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None


class StreamOptions(StrictModel):
    include_usage: bool = False


class ChatRequest(StrictModel):
    """POST /v1/chat/completions, as the official openai client sends it."""

    model: str
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: Annotated[float, Field(allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(allow_inf_nan=False)] | None = None
    top_k: int | None = None  # vLLM's sampling extensions; their bounds: service.serving.params.resolve
    min_p: Annotated[float, Field(allow_inf_nan=False)] | None = None
    repetition_penalty: Annotated[float, Field(allow_inf_nan=False)] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    user: str | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    reasoning_format: Literal["auto", "deepseek", "none"] | None = None  # llama.cpp's; "none": the raw text
    expected_answer: str | None = Field(None, min_length=1, max_length=EXPECTED_CHARS)
    thinking_token_budget: int | None = None  # vLLM's: thinking tokens before the thinking is ended
    reasoning_effort: Effort | None = None  # OpenAI's: a thinking budget from settings
    vote: bool | None = None  # a majority vote over the n choices' final answers
    top_logprobs: int | None = None
    # OpenAI's fields its clients send by default: taken at the values that ask for nothing more
    # (service.serving.params.refuse_unsupported names the field otherwise).
    presence_penalty: Annotated[float, Field(allow_inf_nan=False)] | None = None
    frequency_penalty: Annotated[float, Field(allow_inf_nan=False)] | None = None
    logprobs: bool | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    parallel_tool_calls: bool | None = None
    service_tier: str | None = Field(None, max_length=32)
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None


def decode_body(raw, is_json):
    """The request body as a JSON object, or UnsupportedMedia or BadRequest saying what is wrong."""
    return check_unicode(load_object(raw, is_json))


def load_object(raw, is_json):
    """The body parsed as a JSON object (its strings not yet checked: check_unicode); UnsupportedMedia or BadRequest."""
    if not is_json:
        raise UnsupportedMedia("Content-Type must be application/json", "unsupported_media_type")
    try:
        data = json.loads(raw)
    except UnicodeDecodeError:
        raise BadRequest("request body is not valid UTF-8", "invalid_json") from None
    except json.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc.msg} at line {exc.lineno} "
                         f"column {exc.colno}", "invalid_json") from None
    except ValueError:  # Python refuses to convert an integer literal of more than 4300 digits
        raise BadRequest("request body has a number too long to read (over 4300 digits)",
                         "invalid_json") from None
    except RecursionError:
        raise BadRequest("request body nests arrays or objects too deeply", "invalid_json") from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object", "invalid_type")
    return data


def check_unicode(data):
    """`data` when every string and field name in it is valid Unicode, else BadRequest naming the first."""
    where = _lone_surrogate(data)
    if where is not None:  # a \ud800 escape decodes to one, which no database, log or tokenizer takes
        raise BadRequest(f"{where or 'a field name'} is not valid Unicode (it has a lone surrogate escape)",
                         "invalid_unicode", where or None)
    return data


def _lone_surrogate(data):
    """The dotted path of the first string (or field name: "") holding a lone surrogate, else None."""
    stack = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return path
        elif isinstance(value, (dict, list)):
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str) and _lone_surrogate(key) is not None:
                    return ""
                stack.append((f"{path}.{key}" if path else str(key), item))
    return None


def parse(model, data):
    """Validate `data` against `model`; BadRequest naming the first bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        # An unknown field is most often a typo of a missing one: name it first; then the deepest error, which
        # is the branch of a union (a message's content: a string, or a list of parts) that the input took.
        errors = sorted(exc.errors(), key=lambda err: (err["type"] != "extra_forbidden", -len(err["loc"])))
        raise _refusal(model, errors[0]) from None


def _path(loc):
    """The dotted name of a field from pydantic's location, without its labels of union branches
    ("str", "list[...]") and of the tag a tagged union's member was chosen by."""
    parts, tag_next = [], False
    for part in loc:
        if isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part):
            tag_next = tag_next or "tagged-union[" in part
            continue
        if tag_next and isinstance(part, str) and parts and isinstance(parts[-1], int):
            tag_next = False
            continue
        parts.append(part)
    return ".".join(str(part) for part in parts) or None


def _refusal(model, err):
    param = _path(err["loc"])
    kind = err["type"]
    if kind == "union_tag_not_found":
        return BadRequest(f"{param}.type is required", "missing", f"{param}.type")
    if kind == "union_tag_invalid":
        tags = err["ctx"]["expected_tags"]
        return BadRequest(f"{param}.type must be one of {tags}", "invalid_value", f"{param}.type")
    if kind == "missing":
        return BadRequest(f"{param} is required", "missing", param)
    if kind == "extra_forbidden":
        allowed = ", ".join(model.model_fields)
        return BadRequest(f"unknown field '{param}'; allowed fields: {allowed}", "unknown_field", param)
    if kind in TYPE_NAMES:
        return BadRequest(f"{param} must be {TYPE_NAMES[kind]}", "invalid_type", param)
    return BadRequest(f"{param}: {err['msg']}", "invalid_value", param)


def query_int(text, name, low, high):
    """A query parameter as an integer in [low, high]: ASCII digits only (int() also takes "٣"), else 400."""
    if not (text.isascii() and text.isdigit() and len(text) <= 9) or not low <= int(text) <= high:
        raise BadRequest(f"{name} must be an integer between {low} and {high}", "out_of_range", name)
    return int(text)


def check_range(name, value, low, high, integer=False, low_open=False):
    """BadRequest unless low <= value <= high (low < value if low_open)."""
    if not (low < value if low_open else low <= value) or value > high:
        kind = "an integer" if integer else "a number"
        span = f"greater than {low} and at most {high}" if low_open else f"between {low} and {high}"
        raise BadRequest(f"{name} must be {kind} {span}", "out_of_range", name)
    return value


class QuotaFields(StrictModel):
    """A user's quota fields; null clears one (the service default applies)."""

    rate_limit: str | None = None
    daily_tokens: int | None = None
    max_concurrent: int | None = None
    system_prompts: list[str] | None = None
    models: list[str] | None = None  # the models (names or aliases) the user may call; null: any
    max_files: int | None = None
    max_stored_bytes: int | None = None
    max_open_batches: int | None = None
    daily_batches: int | None = None


class AdminUserCreate(QuotaFields):
    """POST /admin/users."""

    name: str
    admin: bool = False


class AdminUserPatch(QuotaFields):
    """PATCH /admin/users/<name>: only the fields given change."""

    active: bool = None
    admin: bool = None
    transcripts: bool = None  # keep this user's generations (auth.transcripts)


class TeamFields(StrictModel):
    """The limits a team's members share; null clears one (no team limit of that kind)."""

    rate_limit: str | None = None
    daily_tokens: int | None = None
    max_concurrent: int | None = None


MemberName = Annotated[str, Field(max_length=64)]
MAX_MEMBER_CHANGES = 100  # users named in one change (a body of them stays far below the body limit)


class AdminTeamCreate(TeamFields):
    """POST /admin/teams."""

    name: str
    members: list[MemberName] = Field([], max_length=MAX_MEMBER_CHANGES)
    transcripts: bool = False  # keep the members' generations (auth.transcripts), whatever their own flag


class AdminTeamPatch(TeamFields):
    """PATCH /admin/teams/<name>: only the fields given change."""

    transcripts: bool = None


class AdminTeamMembers(StrictModel):
    """POST /admin/teams/<name>/members: users to add and to remove, in one change."""

    add: list[MemberName] = Field([], max_length=MAX_MEMBER_CHANGES)
    remove: list[MemberName] = Field([], max_length=MAX_MEMBER_CHANGES)


class CachePurge(StrictModel):
    """POST /admin/cache/purge: which cached answers to drop (nothing given: all)."""

    user: str | None = Field(None, max_length=64)
    model: str | None = Field(None, max_length=128)


class AdminTokenRequest(StrictModel):
    """POST /admin/tokens."""

    user: str
    scope: str = "generate"
    ttl: str | None = None
    label: str = ""


class AdminTokenRotate(StrictModel):
    """POST /admin/tokens/<jti>/rotate: how long the old token keeps working beside its successor."""

    grace: str = Field(max_length=16, description="0 (none), or a number and a unit s, m, h, d or w, at most 30d; "
                       "never past the old token's own expiry")


class BatchCreate(StrictModel):
    """POST /v1/batches, as the official openai client sends it."""

    input_file_id: str
    endpoint: Literal["/v1/chat/completions", "/v1/predict"]
    completion_window: Literal["24h"]
    metadata: dict[str, str] | None = None
