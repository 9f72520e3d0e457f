"""Prometheus metrics, named as model servers name them (vibethinker_...).

No per-user labels anywhere (cardinality): per-user totals live in the usage
table. Every label value comes from a fixed set: the route is the matched
rule (or "unmatched"), the method one of HTTP's (else "other"), the status
one the app answers with, the model a served model's name from the settings
(never the name a client sent). The engine records generation figures here; the app records HTTP ones.
/metrics (service.api.health) exposes them.
"""

from prometheus_client import Counter, Gauge, Histogram, Info

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

HTTP_REQUESTS = Counter("vibethinker_http_requests_total", "HTTP requests by route, method and status.",
                        ["route", "method", "status"])
REQUEST_DURATION = Histogram("vibethinker_request_duration_seconds", "Wall time of HTTP requests by route.",
                             ["route"], buckets=LATENCY_BUCKETS)
PHASE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, *LATENCY_BUCKETS)
PHASES = Histogram("vibethinker_request_phase_seconds", "Time of each phase of a generation (service.records.timing: "
                   "auth, limits, admission, queue, documents, template, prefill, decode, record, and total from the "
                   "edge), by route (a batch line's: /v1/batches).", ["route", "phase"], buckets=PHASE_BUCKETS)
REFUSALS = Counter("vibethinker_refusals_total", "Requests refused, by reason.", ["reason"])
TTFT = Histogram("vibethinker_time_to_first_token_seconds", "From submission to the first generated token.",
                 ["model"], buckets=LATENCY_BUCKETS)
INTER_TOKEN = Histogram("vibethinker_inter_token_latency_seconds", "Time between generated tokens.", ["model"],
                        buckets=TOKEN_BUCKETS)
QUEUE_WAIT = Histogram("vibethinker_queue_wait_seconds", "Time a generation waited in the queue.", ["model"],
                       buckets=LATENCY_BUCKETS)
BATCH_SIZE = Histogram("vibethinker_batch_size", "Sequences generated together per engine step.", ["model"],
                       buckets=(1, 2, 4, 8, 16, 32, 64))
RUNNING = Gauge("vibethinker_requests_running", "Generations running now.", ["model"])
DECODE_SPEED = Gauge("vibethinker_decode_tokens_per_second", "Decode speed of one request at the current batch size "
                     "and context, from the measured step times (0 until measured).", ["model"])
DECODE_CONTEXT = Gauge("vibethinker_decode_context_tokens", "Mean tokens of context a running row holds (what a "
                       "decode step's attention reads per row).", ["model"])
KV_CACHE = Gauge("vibethinker_kv_cache_bytes", "KV cache bytes: reserved by the running rows (their whole possible "
                 "length), used (written), free (left to reserve) and bound (0: no bound).", ["model", "state"])
WAITING = Gauge("vibethinker_requests_waiting", "Generations waiting in the queue.", ["model"])
PROMPT_TOKENS = Counter("vibethinker_prompt_tokens_total", "Prompt tokens processed.", ["model"])
PREFILL_TOKENS = Counter("vibethinker_prefill_tokens_total", "Prompt tokens run through the model; those read from "
                         "the prefix cache are not.", ["model"])
PREFIX_TOKENS = Counter("vibethinker_prefix_cache_tokens_total", "Prompt tokens looked up in the prefix cache, by "
                        "outcome: hit (read from it, or from a request prefilling the same prefix) or miss.",
                        ["model", "outcome"])
PREFIX_EVICTIONS = Counter("vibethinker_prefix_cache_evictions_total", "Blocks evicted from the prefix cache "
                           "(least recently used first) for room.", ["model"])
PREFIX_BYTES = Gauge("vibethinker_prefix_cache_bytes", "Bytes the prefix cache's blocks hold.", ["model"])
SPECULATION_ACCEPTED = Histogram("vibethinker_speculation_accepted_tokens", "Drafted tokens accepted per row and "
                                 "speculating step (service.inference.speculate): each is a token the step gave "
                                 "beyond its own.", ["model"], buckets=(0, 1, 2, 3))
SPECULATION_DRAFTED = Counter("vibethinker_speculation_drafted_tokens_total", "Tokens drafted by prompt lookup and "
                              "verified; accepted ones are in vibethinker_speculation_accepted_tokens_sum.", ["model"])
GENERATION_TOKENS = Counter("vibethinker_generation_tokens_total", "Tokens generated.", ["model"])
FINISHED = Counter("vibethinker_request_finish_total", "Finished generations by finish reason.",
                   ["model", "finish_reason"])
THINKING_ENDED = Counter("vibethinker_thinking_ended_total", "Thinkings ended early by the engine (a closing fed "
                         "in), by why: budget, length, deadline or loop.", ["model", "reason"])
MODEL_LOAD = Gauge("vibethinker_model_load_seconds", "Seconds the model took to load.", ["model"])
MODEL_INFO = Info("vibethinker_model", "A model this server serves.", ["model"])
CACHE = Counter("vibethinker_cache_lookups_total", "Response-cache lookups by result (hit, miss, error: the "
                "storage did not answer).", ["model", "result"])
ROUTING_TIMEOUTS = Counter("vibethinker_routing_timeouts_total", "Questions on which a routing rule ran past its "
                           "bound (service.routing): they went to the default model. By the rule's number in the "
                           "settings (1: the first).", ["rule"])
DOCUMENTS = Counter("vibethinker_documents_total", "Documents read for requests, by kind (pdf, image) and how "
                    "(text, ocr, text+ocr).", ["kind", "method"])
DOCUMENT_PAGES = Counter("vibethinker_document_pages_total", "Pages of documents read (an image is one).", ["kind"])
DOCUMENT_IMAGES = Counter("vibethinker_document_images_total", "Images read by OCR (photos, scanned PDF pages).")
DOCUMENT_SECONDS = Histogram("vibethinker_document_read_seconds", "Time reading one document took, its wait for a "
                             "reading process included.", ["kind"], buckets=LATENCY_BUCKETS)

# Error codes -> refusal reasons (a small, fixed label set).
REASONS = {
    "missing_token": "auth", "invalid_token": "auth", "token_expired": "auth", "token_revoked": "auth",
    "token_in_query": "auth", "account_disabled": "auth", "insufficient_scope": "auth",
    "rate_limit_exceeded": "rate_limit", "too_many_auth_failures": "rate_limit",
    "daily_token_quota_exceeded": "budget", "concurrency_limit_exceeded": "concurrency",
    "queue_full": "queue_full", "content_policy": "content_policy", "system_prompt_not_allowed": "content_policy",
    "model_loading": "not_ready", "model_failed": "not_ready", "ratelimit_storage_unavailable": "storage",
    "deadline_exceeded": "deadline", "body_too_large": "validation",
    **dict.fromkeys(("document_too_large", "too_many_documents", "too_many_pages", "image_too_large",
                     "file_type_mismatch", "encrypted_pdf", "invalid_pdf", "invalid_image", "empty_document",
                     "document_too_slow", "unreadable_document", "unsupported_url", "invalid_data_url",
                     "documents_busy"), "document"),
}

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

def refusal_reason(status, code):
    """The refusal label of an error response, or None for a success or a server error."""
    if status < 400 or status in (404, 405, 499, 500):
        return None
    return REASONS.get(code, "validation" if status in (400, 413, 415) else "other")


def method_label(method):
    """The method as a label: one of METHODS, else "other" (any upper-case word reaches the app)."""
    return method if method in METHODS else "other"
