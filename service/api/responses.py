"""The shapes of the routes' answers, as pydantic models: the response schemas of the OpenAPI document.

service.api.contract writes them into `GET /openapi.json` (their class
names are the schema names, their docstrings and field descriptions the
schema descriptions); the routes' answers follow them, which the fuzz
against the live service checks (tests/test_openapi.py). The error shape
itself is made in one place (service.errors); `Error` describes it.
"""

from typing import Any, Literal

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str


class Error(BaseModel):
    """The one error shape of every 4xx and 5xx."""

    error: ErrorDetail
    success: Literal[False] | None = None  # /predict's original contract adds it


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    ready: bool
    state: Literal["loading", "ready", "failed"]
    mode: str
    aliases: list[str]
    description: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]


class ModelStatus(BaseModel):
    name: str
    state: Literal["loading", "ready", "failed"]
    mode: str
    device: Literal["cpu", "cuda"] | None  # None until loaded
    load_seconds: float | None
    queued: int
    running: int
    decode_tokens_per_s: float | None  # one request's measured speed at the current batch size
    decode_batch_size: int


class Ready(BaseModel):
    """Every model loaded; the top-level model fields are the default model's."""

    status: Literal["ready"]
    version: str
    model: str
    mode: str
    device: Literal["cpu", "cuda"]
    load_seconds: float
    queued: int
    running: int
    decode_tokens_per_s: float | None  # one request's measured speed at the current batch size
    decode_batch_size: int
    models: list[ModelStatus]


class CachePurged(BaseModel):
    purged: int
    cache: Literal["off", "user", "shared"]


class User(BaseModel):
    id: int
    name: str
    admin: bool
    active: bool
    rate_limit: str | None
    daily_tokens: int | None
    max_concurrent: int | None
    system_prompts: list[str] | None
    models: list[str] | None
    max_files: int | None  # the storage quotas (service.batches.quotas); null: the server's default
    max_stored_bytes: int | None
    max_open_batches: int | None
    daily_batches: int | None
    team: str | None  # the team whose limits the user shares, and those limits
    team_rate_limit: str | None
    team_daily_tokens: int | None
    team_max_concurrent: int | None
    team_transcripts: bool | None  # the team's transcripts flag (a member's are kept when theirs or this is on)
    transcripts: bool  # whether the user's generations are kept (an admin's choice; off by default)
    created_at: str


class Team(BaseModel):
    id: int
    name: str
    rate_limit: str | None  # null: no team limit of that kind (each member's own still applies)
    daily_tokens: int | None
    max_concurrent: int | None
    transcripts: bool  # whether the members' generations are kept, whatever their own flag
    members: list[str]
    created_at: str


class TeamList(BaseModel):
    object: Literal["list"]
    data: list[Team]


class UserRemoved(BaseModel):
    """What was deleted with a user; their usage rows and the audit trail stay."""

    name: str
    removed: Literal[True]
    tokens: int
    transcripts: int
    batches: int  # finished batches (with their lines)


class TranscriptMeta(BaseModel):
    id: str
    user: str
    team: str | None  # the team the request counted against
    created_at: str
    model: str | None
    route: str
    status: int
    request_id: str
    kid: str  # the transcripts key it is encrypted under


class TranscriptList(BaseModel):
    object: Literal["list"]
    data: list[TranscriptMeta]


class Transcript(TranscriptMeta):
    """One transcript, decrypted (reading it is audited as transcript.read)."""

    kind: str
    messages: list[dict[str, Any]]
    documents: list[str]
    params: dict[str, Any] | None
    phases: dict[str, float]
    cached: bool
    choices: list[dict[str, Any]]
    error: dict[str, str] | None
    expected_answer: str | None = None
    usage: dict[str, Any] | None = None


class UserList(BaseModel):
    object: Literal["list"]
    data: list[User]


class TokenMeta(BaseModel):
    jti: str
    user: str
    scope: str
    label: str
    kid: str
    issued_at: str
    expires_at: str


class Token(TokenMeta):
    revoked_at: str | None  # still ahead while a rotated token's grace runs
    revoked_by: str | None
    replaces: str | None  # the token this one was issued to replace
    replaced_by: str | None  # its successor, once rotated
    status: Literal["active", "grace", "revoked", "expired"]


class IssuedToken(TokenMeta):
    token: str  # shown once; never stored


class RotatedToken(IssuedToken):
    replaces: str
    grace_ends_at: str  # when the replaced token stops working


class TokenList(BaseModel):
    object: Literal["list"]
    data: list[Token]


class UsageDay(BaseModel):
    day: str
    user: str | None = None  # per user (by=user), or
    team: str | None = None  # per team (by=team): the team each request counted against then
    requests: int
    succeeded: int
    cached: int  # requests answered from the response cache (their tokens are not in the sums)
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    forced_tokens: int  # of the completion's: fed in to end thinkings early
    cached_tokens: int  # of the prompt's: read from the engine's prefix cache, not prefilled


class UsageList(BaseModel):
    object: Literal["list"]
    data: list[UsageDay]


class AuditEvent(BaseModel):
    id: int
    at: str
    actor: str
    action: str
    target: str | None
    source: str | None
    detail: dict[str, Any]


class AuditList(BaseModel):
    object: Literal["list"]
    data: list[AuditEvent]


class MeToken(BaseModel):
    jti: str
    scope: list[str]
    label: str
    issued_at: str
    expires_at: str


class Me(BaseModel):
    user: str
    admin: bool
    active: bool
    transcripts: bool  # whether this user's generations are kept (set by an admin)
    token: MeToken
    limits: dict[str, Any]
    effective_limits: dict[str, Any]
    today: dict[str, int]
    storage: dict[str, dict[str, Any]]  # the storage quotas: the user's own, in effect, and what is used
    team: dict[str, Any] | None  # the user's team: its name, the limits its members share and its use today


class FileObject(BaseModel):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    expires_at: int | None  # after it the file is gone (files from before expiry: null)
    filename: str
    purpose: str
    status: str
    status_details: str | None


class FileList(BaseModel):
    object: Literal["list"]
    data: list[FileObject]
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"]
    deleted: bool


class BatchError(BaseModel):
    code: str
    message: str
    param: str | None
    line: int | None


class BatchErrors(BaseModel):
    object: Literal["list"]
    data: list[BatchError]


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class Batch(BaseModel):
    id: str
    object: Literal["batch"]
    endpoint: str
    errors: BatchErrors | None
    input_file_id: str
    completion_window: str
    status: Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling",
                    "cancelled"]
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: RequestCounts
    metadata: dict[str, str] | None


class BatchList(BaseModel):
    object: Literal["list"]
    data: list[Batch]
    first_id: str | None
    last_id: str | None
    has_more: bool
