"""One typed settings object, read from VIBE_* variables and an optional TOML file.

Precedence: explicit arguments, then environment variables (`VIBE_MODEL_PATH`),
then the TOML file named by `VIBE_CONFIG` (keys without the prefix:
`model_path = "/srv/model"`), then the defaults below. There are no default
secrets. This module imports nothing of ours and no torch, so gunicorn's master
can read it without loading the model stack.
"""

import os
import re
from pathlib import Path
from typing import Literal

import regex
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from service import routing

ENV_PREFIX = "VIBE_"


class SettingsError(Exception):
    """Invalid configuration; the message names the setting."""


AUTO = "auto"  # the model name that asks the service to pick one by the question (the routing rules)
MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9._:/+-]{0,127}$"  # it is a metric label and a log field: plain characters
# The longest a console sign-in link, an idle console session and any console session may last.
CONSOLE_TIMES = {"console_link_ttl": 24 * 3600, "console_idle_timeout": 24 * 3600,
                 "console_session_lifetime": 7 * 24 * 3600}
TRANSCRIPT_RETENTION = (86400, 730 * 86400)  # seconds: the shortest and longest transcripts may be kept
WEIGHTS_SHARE = 0.8  # of the memory ceiling the models' weights may take; the rest: caches, activations, Python
CACHE_SHARE = 0.9  # of the memory ceiling the weights and the KV caches may take together by default


def retention_seconds(value):
    """Seconds of a retention such as 30d, 12w or 36h."""
    return int(value[:-1]) * {"h": 3600, "d": 86400, "w": 7 * 86400}[value[-1]]


class ModelSpec(BaseModel):
    """One served model (a `[[models]]` table); dtype and quantization default to the top-level settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=MODEL_NAME, description="What clients pass as `model`.")
    path: Path = Field(description="Local Hugging Face model folder.")
    dtype: Literal["float32", "bfloat16"] | None = None
    quantization: Literal["none", "int8"] | None = None
    aliases: tuple[str, ...] = Field((), max_length=16, description="Other names clients may pass.")
    description: str = Field("", max_length=200, description="One line: what this model is for.")
    reasoning_start: str = Field("<think>", max_length=32, description="The tag that opens the model's "
                                 "reasoning (empty with reasoning_end: a model that does not mark it; empty "
                                 "alone: its text always starts inside the reasoning).")
    reasoning_end: str = Field("</think>", max_length=32, description="The tag that ends the model's reasoning; "
                               "the answer follows it.")

    @model_validator(mode="after")
    def _check_reasoning(self):
        if self.reasoning_start and not self.reasoning_end:
            raise ValueError(f"model {self.name!r} has a reasoning_start without a reasoning_end: the answer "
                             "could never be told from the thinking")
        return self

    @field_validator("aliases")
    @classmethod
    def _check_aliases(cls, value):
        bad = next((alias for alias in value if not re.fullmatch(MODEL_NAME, alias)), None)
        if bad is not None:
            raise ValueError(f"alias {bad!r} is not a plain name ({MODEL_NAME})")
        return value


class RoutingRule(BaseModel):
    """For model "auto": questions matching `regex`, or holding any of `keywords` (whole words, any case), go
    to `model`. The first rule that matches wins."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1, max_length=128)
    regex: str | None = Field(None, min_length=1, max_length=2000)
    keywords: tuple[str, ...] = Field((), max_length=200)

    @model_validator(mode="after")
    def _check_match(self):
        if (self.regex is None) == (not self.keywords):
            raise ValueError(f"the rule for {self.model!r} needs exactly one of regex or keywords")
        if self.regex is not None:
            try:
                pattern = routing.compile_pattern(self.regex)
            except regex.error as exc:
                raise ValueError(f"the rule for {self.model!r} has a bad regex: {exc}") from None
            probe = routing.backtracks(pattern)
            if probe is not None:
                raise ValueError(f"the rule for {self.model!r} backtracks catastrophically: its regex "
                                 f"{self.regex!r} ran past {routing.PROBE_TIMEOUT_S:g} s on the probe {probe!r} "
                                 "(nested or overlapping repeats such as (a+)+); rewrite it") from None
        if any(not word.strip() or len(word) > 100 for word in self.keywords):
            raise ValueError(f"the rule for {self.model!r} has an empty keyword or one over 100 characters")
        return self


class Settings(BaseSettings):
    """Every knob of the service, with its default, bounds and meaning."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True, validate_default=True)

    # --- the model ---
    model_path: Path | None = Field(
        None, description="Local Hugging Face model folder (config.json, safetensors, tokenizer)."
    )
    model_name: str = Field(
        "VibeThinker-1.5B", pattern=MODEL_NAME, description="Name reported in responses and /v1/models."
    )
    models: tuple[ModelSpec, ...] = Field(
        (), max_length=16, description="Several models (TOML [[models]] tables), the first being the default; "
        "instead of model_path and model_name.",
    )
    routing: tuple[RoutingRule, ...] = Field(
        (), max_length=200, description="TOML [[routing]] tables: how model \"auto\" (and /predict without a "
        "model) picks a model by the question; the first match wins, else the default model.",
    )
    memory_limit_bytes: int | None = Field(
        None, ge=1, description="Memory the service may use; the weights of every model must fit in "
        f"{WEIGHTS_SHARE:.0%} of it. Default: the service's cgroup limit (systemd MemoryMax), else the machine's.",
    )
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Numeric type the weights are loaded in.")
    quantization: Literal["none", "int8"] = Field(
        "none", description="int8: the decoder's and output head's linear layers in int8 (about 3x faster decode "
        "on a CPU; dtype then does not apply).",
    )
    int8_kernel: Literal["auto", "own", "fbgemm"] = Field(
        "auto", description="int8 only: which kernel computes the int8 linear layers. own: the service's AVX512-VNNI "
        "kernel (service/inference/int8kernel.py); fbgemm: torch's. auto: own where this CPU has AVX512-VNNI and "
        "the kernel was built, else fbgemm. own where it cannot run starts on fbgemm with a warning; /readyz says "
        "which runs.",
    )
    kv_dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto", description="What the KV cache is stored in: bfloat16 (half of float32's bytes read per decode "
        "step, and half the memory) or float32. auto: bfloat16, except float32 for float32 weights (the exact "
        "mode).",
    )
    kv_cache_bytes: int | None = Field(
        None, ge=1 << 20, description="Bound on each served model's KV cache: a request reserves its prompt and "
        "max_tokens' worth when it starts, waits while the bound would be passed, and is refused (400) when it "
        f"could never fit. Default: {CACHE_SHARE:.0%} of the memory ceiling (memory_limit_bytes) less the "
        "weights, shared equally by the models.",
    )
    prefix_cache_bytes: int | None = Field(
        None, ge=0, description="Bytes each served model's prefix cache may hold: the KV blocks of earlier "
        "prompts, kept so a later prompt that begins the same way reads them instead of prefilling them again. "
        "Default: a quarter of the model's KV cache bound (kv_cache_bytes), or 512 MiB when that has no bound. "
        "0 turns the prefix cache off. Its blocks live in what the rows' caches leave free and give way when a "
        "row needs the room.",
    )
    prefix_cache_scope: Literal["model", "user"] = Field(
        "model", description="Which requests share a prompt prefix in the prefix cache. model: any requests to "
        "the same model whose prompts are identical up to it. user: only one user's own requests, so nobody's "
        "time to first token or usage.prompt_tokens_details.cached_tokens tells them anything about another "
        "user's prompts.",
    )
    prefill_step_tokens: int | None = Field(
        None, ge=1, le=65536, description="Prompt tokens one engine step may prefill beside its decode rows (a "
        "longer prompt is prefilled over several steps; with nothing decoding, a step prefills up to 2,048). "
        "Default: sized from the measured speeds so that a step with prefill takes about three decode steps.",
    )
    speculate: Literal["auto", "off", "ngram"] = Field(
        "auto", description="Prompt-lookup speculation: each decode step also checks up to 3 tokens guessed "
        "from the request's own prompt and answer so far, keeping those the model would have chosen anyway "
        "(the same answers, sooner; in the bfloat16 mode and the int8 mode on the fbgemm kernel, as close as "
        "batching keeps them). ngram: always; auto: while a step stays within "
        "4 tokens and prefills nothing (one answer drafts 3, two answers 1 each: there the extra tokens cost "
        "almost nothing); off: never.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where the model runs: cuda (a GPU; the CUDA build of torch), cpu, or auto (cuda "
        "when torch sees a GPU). int8 runs on the CPU only.",
    )
    prefill_float32: Literal["auto", "on", "off"] = Field(
        "auto", description="bfloat16 only: run prefill matmuls in float32; auto does so on CPUs without "
        "bfloat16 units.",
    )
    torch_threads: int = Field(
        default_factory=lambda: max(1, len(os.sched_getaffinity(0))),
        ge=1,
        le=256,
        description="Torch intra-op threads; keep workers x threads <= free cores.",
    )

    # --- generation bounds ---
    default_system_prompt: str = Field(
        "You are a careful assistant for math and code. Reason step by step, then give the final answer.",
        max_length=8192,
        description="System prompt used when a request gives none.",
    )
    default_max_new_tokens: int = Field(512, ge=1, description="max_new_tokens when a request gives none.")
    max_new_tokens_limit: int = Field(
        2048, ge=1, le=131072, description="Largest max_new_tokens a request may ask for."
    )
    # Sampling defaults: a request's value wins, then the setting, then the model folder's generation_config.json,
    # then the fallback each description names (service.serving.params.resolve). Unset is not a value.
    default_temperature: float | None = Field(
        None, ge=0.0, le=2.0, description="Sampling temperature when a request gives none; 0 is greedy. Unset: "
        "the model's generation_config.json value, else 0.6."
    )
    default_top_p: float | None = Field(
        None, gt=0.0, le=1.0, description="Nucleus sampling mass when a request gives none. Unset: the model's, "
        "else 0.95."
    )
    default_top_k: int | None = Field(
        None, ge=-1, le=1000, description="Sample among this many most likely tokens when a request gives no "
        "top_k; 0 or -1: no limit. Unset: the model's, else 0."
    )
    default_min_p: float | None = Field(
        None, ge=0.0, le=1.0, description="Drop tokens less likely than this times the most likely one when a "
        "request gives no min_p. Unset: the model's, else 0."
    )
    default_repetition_penalty: float | None = Field(
        None, ge=0.01, le=2.0, description="Repetition penalty when a request gives none (1: none; above 1, tokens "
        "of the prompt and the reply so far are less likely; at least 0.01, as a request's). Unset: the model's, "
        "else 1."
    )
    max_prompt_tokens: int = Field(4096, ge=16, description="Longest chat-templated prompt accepted, in tokens.")
    max_question_chars: int = Field(
        16384, ge=1, description="Longest question or system prompt accepted, in characters."
    )
    request_deadline_s: float = Field(
        60.0, gt=0.0, le=3600.0, description="Wall-clock budget of one whole (non-streamed) answer, queue wait "
        "included. A request that asks for more tokens than fit in it at the measured speed is refused at once.",
    )
    stream_deadline_s: float = Field(
        3600.0, gt=0.0, le=86400.0, description="Wall-clock budget of one streamed answer: long reasoning "
        "streams past the whole-answer deadline.",
    )
    answer_check_timeout_s: float = Field(
        3.0, gt=0.0, le=60.0, description="Longest time checking one final answer against expected_answer "
        "(math-verify, in a process of its own) may take; past it `correct` is null.",
    )
    answer_tokens: int = Field(
        1024, ge=1, le=131072, description="Room kept for the answer after a thinking ended early: the thinking "
        "is ended (a closing sentence and the end tag fed in) when what is left of max_tokens, or of the deadline "
        "at the measured speed, would not fit this many more (half of what is left, for shorter requests); the "
        "answer that follows is capped at it.",
    )
    thinking_closing: str = Field(
        "\n\nConsidering the limited time, I have to stop thinking here and give the final answer now.\n",
        min_length=1, max_length=512, description="The sentence fed into a thinking ended early, before the "
        "model's end tag (reasoning_end).",
    )
    reasoning_effort_budgets: dict[Literal["none", "minimal", "low", "medium", "high"], int] = Field(
        {"none": 0, "minimal": 256, "low": 1024, "medium": 4096, "high": 16384},
        description="Thinking tokens each reasoning_effort allows (a request's thinking_token_budget sets its "
        "own). A missing level is a request without a budget.",
    )
    loop_period: int = Field(
        256, ge=1, le=4096, description="The longest span of tokens the loop check looks for repeating.")
    loop_tokens: int = Field(
        512, ge=0, le=131072, description="A thinking whose last tokens repeat one span (of at most loop_period) "
        "this far past its first copy is looping, and is ended; 0 turns the check off.",
    )
    max_n: int = Field(8, ge=1, le=64, description="Most choices (n) one request may ask for (and at most "
                       "max_batch_size): prefilled once, each its own row.")
    forced_output: str | None = Field(
        None, min_length=1, max_length=4096, description="Tests only: a demo model (its folder has "
        "DEMO_MODEL.txt) emits this text's tokens instead of its own choices, then its end token.",
    )
    max_batch_size: int = Field(16, ge=1, le=256, description="Requests generated together: rows of the running batch.")
    queue_size: int = Field(
        32, ge=1, le=100000, description="Requests that may wait for the engine; more get 503 at once."
    )

    # --- the response cache ---
    cache: Literal["off", "user", "shared"] = Field(
        "user", description="Cache deterministic answers (greedy, or with a seed) in the counter storage: per "
        "user (no user can tell what another asked), shared by every user, or off.",
    )
    cache_ttl_s: float = Field(86400.0, gt=0.0, le=90 * 86400.0, description="How long a cached answer lives.")
    cache_max_entry_bytes: int = Field(
        262144, ge=256, le=16 * 1024 * 1024, description="Largest answer cached, in bytes of its stored form.")
    cache_storage_uri: str | None = Field(
        None, min_length=1, description="Where cached answers live: in production a Redis instance of their "
        "own that evicts (maxmemory-policy allkeys-lru), so a full cache never refuses a counter's write. Unset: "
        "the counter storage (ratelimit_storage_uri; for development, with a warning at start).",
    )

    # --- state and tokens ---
    db_url: str = Field(
        "sqlite:///var/vibethinker.db",
        min_length=1,
        description="SQLAlchemy URL of users, tokens and audit (SQLite in WAL mode, or PostgreSQL).",
    )
    jwt_key_dir: Path = Field(
        Path("var/keys"), description="Folder of the Ed25519 signing keys (mode 0700, files 0600)."
    )
    jwt_issuer: str = Field(
        "vibethinker", min_length=1, description="`iss` of issued tokens; checked on every request."
    )
    jwt_audience: str = Field(
        "vibethinker-api", min_length=1, description="`aud` of issued tokens; checked on every request."
    )
    token_ttl: str = Field("30d", pattern=r"^\d+[smhdw]$", description="Lifetime of a token when `--ttl` is not given.")
    token_max_ttl: str = Field(
        "365d", pattern=r"^\d+[smhdw]$", description="Longest lifetime a token may be issued with."
    )
    token_cache_entries: int = Field(
        4096, ge=0, le=1000000, description="Verified tokens a worker keeps, skipping the decode and the database "
        "while nothing changed who may do what (needs Redis; 0 turns it off).",
    )

    # --- the admins' console (service.console) ---
    console_url: str | None = Field(
        None, pattern=r"^https?://[A-Za-z0-9.:\[\]-]+(:\d+)?$",
        description="The address admins reach the service at (https://api.example.org): the base of sign-in links "
        "and of the OpenID Connect callback. Unset: http://BIND (dev).",
    )
    console_link_ttl: str = Field("10m", pattern=r"^\d+[smh]$", description="How long a one-time sign-in link "
                                  "(`vibethinker-admin console-link`) works.")
    console_idle_timeout: str = Field("15m", pattern=r"^\d+[smh]$", description="A console session ends after "
                                      "this long without a request.")
    console_session_lifetime: str = Field("8h", pattern=r"^\d+[smhd]$", description="A console session ends "
                                          "this long after sign-in, however active.")
    console_oidc_issuer: str | None = Field(
        None, pattern=r"^https?://\S+$", description="The organisation's OpenID Connect provider (its issuer URL, "
        "discovery at /.well-known/openid-configuration); unset: sign-in by one-time link only.",
    )
    console_oidc_client_id: str = Field("", max_length=200, description="The console's client id at the provider.")
    console_oidc_client_secret: str = Field("", max_length=500, description="Its client secret (a secret: in the "
                                            "configuration file, mode 0640, written from the vault).")
    console_oidc_claim: str = Field("email", pattern=r"^[A-Za-z0-9_.:-]{1,64}$", description="The ID token's "
                                    "claim that names the admin (email: only when email_verified is true).")
    console_oidc_admins: dict[str, str] = Field(
        {}, max_length=1000, description="TOML table: the claim's value -> an existing admin user's name "
        "(\"alice@example.org\" = \"alice\"). Signing in creates no user; an unmapped one is refused.",
    )

    # --- budget alerts (service.records.alerts) ---
    alert_targets: list[str] = Field(
        [], max_length=20, description="Where budget alerts go: Apprise URLs (json://host/path for a webhook, "
        "mailtos://..., slack://..., and Apprise's other services). They hold secrets: in the configuration file "
        "(mode 0640, written from the vault) or VIBE_ALERT_TARGETS as a JSON list, never in a log. Empty: no "
        "alerts.",
    )
    alert_thresholds: list[int] = Field(
        [80, 100], min_length=1, max_length=10, description="Percentages of a user's or a team's daily token "
        "budget: each reached sends one alert per day, whichever worker or server settled the request that "
        "reached it; 100 also when the budget refuses a request.",
    )
    alert_retries: int = Field(5, ge=0, le=20, description="How often a failed alert delivery is tried again "
                               "(waiting 1, 2, 4... s, at most 5 minutes), each failure logged.")

    # --- quotas and admission ---
    ratelimit_storage_uri: str = Field(
        "memory://",
        min_length=1,
        description=(
            "Where rate limits, token budgets and concurrency counts live: redis+unix:///run/redis/redis.sock or "
            "redis://host:6379 in production (shared by every worker, kept across restarts); memory:// only for dev."
        ),
    )
    ratelimit_fail_open: bool = Field(
        False,
        description="If the counter storage is down: false refuses with 503 "
        "(fail closed), true serves without limits (and logs it).",
    )
    default_rate_limit: str = Field("60/minute;2000/day", description="Per-user request limit when the user has none.")
    anonymous_rate_limit: str = Field("30/minute", description="Failed-authentication requests allowed per client IP.")
    default_daily_tokens: int = Field(
        200000, ge=1, description="Per-user daily prompt+completion tokens when the user has none."
    )
    default_max_concurrent: int = Field(
        2, ge=1, le=1000, description="Per-user simultaneous generations when the user has none."
    )
    content_policy_path: Path | None = Field(
        None, description="TOML file of content rules (terms and regexes); none: no policy."
    )

    # --- HTTP ---
    bind: str = Field("127.0.0.1:8000", min_length=1, description="Gunicorn bind: HOST:PORT or unix:/path.")
    http_threads: int | None = Field(
        None, ge=1, le=1024,
        description="Gunicorn gthread threads: concurrent HTTP requests held. Unset: twice max_batch_size, so the "
        "engine's batch fills (each generation holds a thread) with as many again waiting or on other routes.")
    server_timing: Literal["on", "admin", "off"] = Field(
        "on",
        description="Who sees a generation's phases (Server-Timing header, a stream's usage chunk, a batch "
        "line's body): everyone (on), admin-scope tokens only (admin), nobody (off). The log line and /metrics "
        "have them whatever this says.")
    proxy_fix_hops: int = Field(
        0,
        ge=0,
        le=5,
        description="Proxies in front that set X-Forwarded-For/-Proto "
        "(1 behind nginx); 0 trusts none, so a direct client cannot forge its address.",
    )
    stream_keepalive_s: float = Field(
        10.0,
        gt=0.0,
        le=300.0,
        description="Seconds of silence before a stream "
        "sends a keep-alive comment (also how soon a gone client is noticed).",
    )
    max_body_bytes: int = Field(
        65536, ge=1024, le=16 * 1024 * 1024, description="Largest request body; nginx's client_max_body_size matches."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level of the service.")

    # --- documents (PDFs and images as questions: service.inputs.documents) ---
    document_max_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, le=64 * 1024 * 1024, description="Largest document (PDF or image) of one "
        "request, all its documents together, in bytes. The bodies of /v1/predict and /v1/chat/completions may be "
        "this much larger than max_body_bytes (base64 included); nginx allows the same there.",
    )
    document_max_pages: int = Field(20, ge=1, le=1000, description="Most pages of one PDF.")
    document_max_pixels: int = Field(
        40_000_000, ge=10_000, le=400_000_000, description="Most pixels of one image (or image in a PDF), "
        "checked before it is decoded.",
    )
    document_timeout_s: float = Field(
        30.0, gt=0.0, le=600.0, description="Longest time reading one document may take (queue wait included); "
        "it counts toward the request's deadline.",
    )
    document_workers: int = Field(
        1, ge=1, le=16, description="Processes per worker that read documents (PDF parsing, OCR).",
    )
    documents_per_request: int = Field(4, ge=1, le=32, description="Most documents in one request.")
    document_queue_s: float = Field(
        5.0, gt=0.0, le=60.0, description="Longest wait for a turn at a reading process (within the time limit) "
        "before 503 documents_busy.",
    )
    document_reader_socket: str = Field(
        "", description="A socket where systemd starts a reader unit of its own per document "
        "(systemd/vibethinker-reader.socket); empty: the worker's own pool of reading processes.",
    )
    document_memory_mb: int = Field(
        2048, ge=256, le=65536, description="Address space a reading process may map (RLIMIT_AS), in MiB: a "
        "decoder that would need more fails with 413/422 instead of swelling.",
    )

    # --- batch jobs (the OpenAI Batch API) ---
    files_dir: Path = Field(Path("var/files"), description="Folder of uploaded batch input files and outputs.")
    max_upload_bytes: int = Field(
        100 * 1024 * 1024, ge=1024, le=2 * 1024**3, description="Largest uploaded file (POST /v1/files); nginx "
        "allows this size on /v1/files only.",
    )
    max_batch_lines: int = Field(10000, ge=1, le=1_000_000, description="Most lines (requests) in one batch.")
    max_open_batches: int = Field(10, ge=1, le=10000, description="Batches a user may have open at once when the "
                                  "user has no max_open_batches of their own.")
    default_daily_batches: int = Field(
        100, ge=1, le=10**6, description="Batches a user may create per UTC day (failed ones included) when the "
        "user has no daily_batches of their own.")
    default_max_files: int = Field(
        100, ge=1, le=10**6, description="Files a user may store (uploads and batch outputs) when the user has no "
        "max_files of their own.")
    default_max_stored_bytes: int = Field(
        1024**3, ge=1024, le=10**15, description="Bytes of files a user may store when the user has no "
        "max_stored_bytes of their own.")
    file_expiry_s: int = Field(
        30 * 86400, ge=3600, le=10 * 365 * 86400, description="Seconds an uploaded or output file is kept when "
        "the upload gives no expires_after; expired files are purged.")
    transcript_retention: str = Field(
        "30d", pattern=r"^\d+[hdw]$", description="How long the transcripts of users who opted in are kept (1 day "
        "to 730 days, e.g. 30d, 12w); older ones are purged hourly by the service and by `vibethinker-admin "
        "transcripts purge`.")
    poll_rate_limit: str = Field(
        "600/minute", description="Per-user limit of polling (file and batch retrieves and lists, downloads), "
        "apart from the request rate limit that uploads and batch creates count against.")
    batch_reserved_rows: int = Field(
        4, ge=0, le=256, description="Rows of the running batch that batch lines leave free for interactive "
        "requests.",
    )
    batch_window_s: float = Field(
        86400.0, gt=0.0, description="How long a batch may run before it expires (its completion_window, 24h).")
    batch_lease_s: float = Field(
        30.0, ge=10.0, le=3600.0, description="A batch line's runner renews its hold every 5 s; a line not "
        "renewed for this long (its server stopped) runs again on another server. Server clocks must agree "
        "within it.",
    )

    @field_validator("default_rate_limit", "anonymous_rate_limit", "poll_rate_limit")
    @classmethod
    def _check_limit(cls, value):
        from limits import parse_many

        if not parse_many(value):
            raise ValueError(f"{value!r} is not a rate limit such as '60/minute;2000/day'")
        return value

    @field_validator("alert_targets")
    @classmethod
    def _check_targets(cls, value):
        for i, target in enumerate(value):  # the target itself is never quoted: it holds its service's secret
            if not re.fullmatch(r"[a-z][a-z0-9+.-]{0,31}://\S{1,2000}", target):
                raise ValueError(f"target {i + 1} is not an Apprise URL such as json://host/path")
        return value

    @field_validator("alert_thresholds")
    @classmethod
    def _check_thresholds(cls, value):
        if not all(1 <= pct <= 100 for pct in value) or len(set(value)) != len(value):
            raise ValueError("give distinct percentages between 1 and 100, such as [80, 100]")
        return sorted(value)

    @field_validator("console_link_ttl", "console_idle_timeout", "console_session_lifetime")
    @classmethod
    def _check_console_time(cls, value, info):
        seconds = int(value[:-1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[value[-1]]
        longest = CONSOLE_TIMES[info.field_name]
        if not 60 <= seconds <= longest:
            raise ValueError(f"must be between 1 minute and {longest // 3600} hours")
        return value

    @field_validator("transcript_retention")
    @classmethod
    def _check_retention(cls, value):
        if not TRANSCRIPT_RETENTION[0] <= retention_seconds(value) <= TRANSCRIPT_RETENTION[1]:
            raise ValueError("must be between 1 day and 730 days")
        return value

    @field_validator("ratelimit_storage_uri", "cache_storage_uri")
    @classmethod
    def _check_storage(cls, value):
        schemes = ("memory://", "redis://", "rediss://", "redis+unix://", "unix://")
        if value is not None and not value.startswith(schemes):
            raise ValueError("use memory://, redis://HOST:PORT or redis+unix:///path/to/redis.sock")
        return value

    @property
    def threads(self):
        """The HTTP threads a worker runs: http_threads, or twice max_batch_size."""
        return self.http_threads or 2 * self.max_batch_size

    @model_validator(mode="after")
    def _check_bounds(self):
        if self.default_max_new_tokens > self.max_new_tokens_limit:
            raise ValueError(
                f"default_max_new_tokens ({self.default_max_new_tokens}) exceeds "
                f"max_new_tokens_limit ({self.max_new_tokens_limit})"
            )
        if self.models and self.model_path is not None:
            raise ValueError("give either model_path (one model) or [[models]] tables, not both")
        specs = self.served_models() if self.models or self.model_path else ()
        if self.device == "cuda" and "int8" in {self.quantization, *(spec.quantization for spec in specs)}:
            raise ValueError("quantization int8 runs on the CPU only (fbgemm kernels): with device cuda, set "
                             "quantization none (bfloat16 on the GPU), or device cpu")
        names = {}
        for spec in specs:
            for name in (spec.name, *spec.aliases):
                if name.lower() == AUTO:
                    raise ValueError(f"{AUTO!r} is reserved (it asks the service to pick a model): rename it")
                if name.lower() in names:
                    raise ValueError(f"the model name {name!r} is used twice")
                names[name.lower()] = spec.name
        unknown = next((rule.model for rule in self.routing if rule.model.lower() not in names), None)
        if specs and unknown is not None:
            raise ValueError(f"a routing rule names {unknown!r}, which is not a served model")
        if self.console_oidc_issuer and not (self.console_oidc_client_id and self.console_oidc_client_secret
                                             and self.console_url):
            raise ValueError("console_oidc_issuer needs console_oidc_client_id, console_oidc_client_secret and "
                             "console_url (the provider sends admins back to it)")
        return self

    @property
    def console_base(self):
        """Where admins reach the service: console_url, else this server's bind address (dev)."""
        if self.console_url:
            return self.console_url
        return "http://" + (self.bind if not self.bind.startswith("unix:") else "localhost")

    @property
    def document_body_bytes(self):
        """The body limit of the routes that take documents: max_body_bytes plus document_max_bytes in base64.
        nginx/vibethinker.conf.j2 computes the same for those locations."""
        return self.max_body_bytes + (self.document_max_bytes + 2) // 3 * 4

    @property
    def transcript_retention_delta(self):
        """transcript_retention as a timedelta."""
        from datetime import timedelta

        return timedelta(seconds=retention_seconds(self.transcript_retention))

    def served_models(self):
        """The models this server serves, the default first: the [[models]] tables, or the one model of
        model_path, each with its dtype and quantization filled in."""
        specs = self.models or (ModelSpec(name=self.model_name, path=self.model_path or Path()),)
        return tuple(spec.model_copy(update={"dtype": spec.dtype or self.dtype,
                                             "quantization": spec.quantization or self.quantization})
                     for spec in specs)

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):
        sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
        config_file = os.environ.get(ENV_PREFIX + "CONFIG")
        if config_file:
            sources += (TomlConfigSettingsSource(settings_cls, toml_file=config_file),)
        return sources


def load_settings(**overrides):
    """Read and validate the settings; raise SettingsError naming the bad setting."""
    config_file = os.environ.get(ENV_PREFIX + "CONFIG")
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields} | {ENV_PREFIX + "CONFIG"}
    unknown = sorted(name for name in os.environ if name.startswith(ENV_PREFIX) and name not in known)
    if unknown:  # a typo such as VIBE_MODLE_PATH must not be silently ignored
        raise SettingsError(f"invalid settings: {unknown[0]}: unknown setting")
    if config_file and not Path(config_file).is_file():
        raise SettingsError(f"VIBE_CONFIG: {config_file} is not a readable file")
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise SettingsError(_describe(exc)) from None
    except ValueError as exc:  # a malformed TOML file, or an environment variable that is not the JSON it needs
        field = re.search(r'field "(\w+)" from source "EnvSettingsSource"', str(exc))
        if field:
            raise SettingsError(f"invalid settings: {ENV_PREFIX}{field.group(1).upper()}: not valid JSON "
                                "(a table or list setting is JSON in the environment)") from None
        raise SettingsError(f"VIBE_CONFIG: {config_file}: {exc}") from None


def _describe(exc):
    """Turn pydantic's errors into one line per setting, named as the operator writes it."""
    lines = []
    for err in exc.errors():
        loc = [str(part) for part in err["loc"] if isinstance(part, str)]
        name = (ENV_PREFIX + loc[0].upper()) if loc else "settings"
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown setting"
        lines.append(f"{name}: {message}")
    return "invalid settings: " + "; ".join(lines)


def require_models(settings):
    """The served models (settings.served_models), or SettingsError if none is set or a path is not a model."""
    if settings.model_path is None and not settings.models:
        raise SettingsError(
            "VIBE_MODEL_PATH: not set; point it at a model folder (python -m service.demo_model DIR builds a demo "
            "one), or list [[models]] in the VIBE_CONFIG file"
        )
    specs = settings.served_models()
    for spec in specs:
        where = "VIBE_MODEL_PATH" if not settings.models else f"VIBE_MODELS: {spec.name}"
        if not (spec.path / "config.json").is_file():
            raise SettingsError(f"{where}: {spec.path} has no config.json; it is not a model folder")
        if settings.forced_output and not (spec.path / "DEMO_MODEL.txt").is_file():
            raise SettingsError(f"VIBE_FORCED_OUTPUT: only for a demo model; {spec.path} is not one")
    return specs
