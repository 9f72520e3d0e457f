"""Gunicorn configuration: `gunicorn -c service/gunicorn_conf.py "service.app:create_app()"`.

Values come from the same settings as the app (VIBE_* variables and the TOML
file named by VIBE_CONFIG). This file runs in gunicorn's master, which must
never import torch or load the model: PyTorch's thread pools do not survive
fork, and the model must exist once per server.
"""

import json
import sys

from gunicorn import util

from auth.keys import KeyFolderError, KeySet
from service.admission.counters import reclaim_orphans, reclaim_worker
from service.errors import error_body
from service.inputs.filtering import PolicyError, load_policy
from service.records.logs import GUNICORN_LOGCONFIG
from service.inference.footprint import check as check_footprint
from service.settings import SettingsError, load_settings, require_models

try:
    _settings = load_settings()
    # Fail in the master, with one clear line, not in a worker boot loop.
    check_footprint(require_models(_settings), _settings.memory_limit_bytes)
    KeySet(_settings.jwt_key_dir)
    load_policy(_settings.content_policy_path)
except (SettingsError, KeyFolderError, PolicyError) as exc:
    print(f"vibethinker: {exc}", file=sys.stderr)
    sys.exit(2)

# --- Server socket ---
# HOST:PORT (127.0.0.1:8000 in dev) or unix:/run/vibethinker/gunicorn.sock behind nginx.
bind = [_settings.bind]
# Mode of a unix socket: 0660, so nginx (in the socket's group, www-data) can
# connect and nobody else can; the unit's UMask=0077 would otherwise make it 0600.
umask = 0o117
# Connections the kernel queues before accept; nginx holds the rest. Range 64-2048.
backlog = 256

# --- Worker processes ---
# Exactly one worker: each worker would load its own copy of the model (3 GB bf16),
# and two workers would fight over the same cores. Scale out with more servers.
workers = 1
# gthread: a thread per in-flight HTTP request; they wait on the engine's queue
# while one engine thread runs the model. Async workers would gain nothing.
worker_class = "gthread"
# Concurrent HTTP requests the worker holds (waiting or generating); beyond this
# connections queue in the backlog. From VIBE_HTTP_THREADS, 1-1024; unset, twice
# VIBE_MAX_BATCH_SIZE, so the engine's batch can fill.
threads = _settings.threads
# Seconds of worker silence before the master kills it. The gthread main loop
# keeps heart-beating while requests generate, so this only catches a hung
# process; it also bounds model loading, which runs in a background thread.
timeout = 120
# Seconds a worker gets on restart or stop to finish in-flight requests: above
# the longest generation (the request deadline) so none is cut off.
graceful_timeout = int(_settings.request_deadline_s) + 15
# Seconds an idle keep-alive connection stays open; nginx reuses connections.
keepalive = 5
# Load the app in the worker, after fork, never in the master (see above).
preload_app = False
# Recycling the worker would reload the model; never do it on a request count.
max_requests = 0

# --- Requests ---
# Request line and header bounds (bytes / count): defaults, stated for review.
limit_request_line = 4094
limit_request_fields = 100
limit_request_field_size = 8190

# What gunicorn answers itself (a request it cannot parse, past those bounds) is
# the app's one JSON error shape too, not its HTML page.
GUNICORN_ERRORS = {
    400: "invalid_http_request", 403: "forbidden", 414: "request_line_too_long", 417: "expectation_failed",
    431: "headers_too_large", 500: "internal_error", 501: "unsupported_transfer_coding",
}
GUNICORN_MESSAGES = {
    414: f"request line is longer than {limit_request_line} bytes",
    431: f"request headers are too large: at most {limit_request_fields} fields of {limit_request_field_size} "
         "bytes each",
    500: "internal error",
}


def write_json_error(sock, status_int, reason, mesg):
    """gunicorn.util.write_error, in the one error shape (the worker calls it through the module)."""
    message = GUNICORN_MESSAGES.get(status_int) or f"malformed HTTP request: {mesg[:200]}".rstrip(": ")
    body = (json.dumps(error_body(status_int, message, GUNICORN_ERRORS.get(status_int, "invalid_http_request")))
            + "\n").encode()
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1")
    util.write_nonblock(sock, head + body)


util.write_error = write_json_error

# --- Server hooks ---
# A worker that dies (kill -9, out of memory) cannot release its concurrency
# slots and budget reservations: the master gives them back before it starts
# the next worker, and at its own start for workers of a master that is gone.
def on_starting(server):
    count = reclaim_orphans(_settings.ratelimit_storage_uri, warn=server.log.warning)
    if count:
        server.log.warning(f"gave back {count} lease(s) held by workers of a previous run")


def child_exit(server, worker):
    count = reclaim_worker(_settings.ratelimit_storage_uri, worker.pid, warn=server.log.warning)
    if count:
        server.log.warning(f"worker {worker.pid} ended holding {count} lease(s): slots freed, reservations "
                           "given back")


def worker_exit(server, worker):
    """In the worker, as it ends: stop its document-reading and answer-checking processes, and put the budget
    alerts it has not delivered back in the outbox."""
    from service.state import KEY

    held = getattr(getattr(worker, "wsgi", None), "extensions", {}).get(KEY)  # the app's State
    for pool in (held.documents, held.checker) if held is not None else ():
        if pool is not None:
            pool.close()
    if held is not None and held.alerts is not None:
        held.alerts.stop()


# --- Logging ---
# Gunicorn's own lines as JSON on stderr (journald under systemd), like the app's;
# no access log: the app writes one JSON line per request, with user and tokens.
errorlog = "-"
loglevel = _settings.log_level
accesslog = None
logconfig_dict = GUNICORN_LOGCONFIG

# --- Process naming ---
proc_name = "vibethinker"

# --- Control ---
# Gunicorn's runtime control socket lives under $HOME by default, which the
# hardened unit makes read-only; reload and stop go through signals (systemd).
control_socket_disable = True
