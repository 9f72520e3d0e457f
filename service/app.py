"""The Flask application factory: `gunicorn "service.app:create_app()"`.

create_app wires each concern's module; it loads settings, refuses to start
without a model folder, with models whose weights do not fit the memory, or
without a signing key, opens (and migrates) the store, and starts one engine
thread per served model; each loads its model in the background, one at a
time (/readyz answers 503 until all are done).
"""

import logging
import time
from functools import partial

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

from auth import guard
from auth.cache import TokenCache
from auth.keys import KeyFolderError, KeySet
from auth.store import Store
from auth.transcripts import Transcripts
from service import console
from service.admission import ratelimit
from service.admission.counters import epoch_publisher, open_counters
from service.api import access, accounting, admin, batches, body, chat, contract, errors, health, me, models, predict
from service.batches.records import BatchRecords
from service.batches.runner import BatchRunner
from service.inference import footprint
from service.inputs import filtering
from service.records import logs, metrics, timing
from service.records.alerts import Alerts
from service.records.transcriptlog import TranscriptLog
from service.records.usagelog import UsageLog
from service.serving import attachments
from service.serving.answers import Checker
from service.serving.cache import open_cache
from service.serving.models import Models, Served, mode_of, revision
from service.settings import SettingsError, load_settings, require_models
from service.state import State, attach

# How seeded draws are made (service.inference.rows.token_seed): part of each model's revision, so answers
# cached under an earlier way (2: keyed on each token's index, drawn in vocabulary order) are not replayed.
SAMPLING = 2


def create_app(settings=None):
    """Build the app around one engine per served model; each model is loaded once per process."""
    settings = settings or load_settings()
    specs = require_models(settings)
    sizes = footprint.check(specs, settings.memory_limit_bytes)
    logs.configure(settings.log_level)

    app = Flask(__name__)
    if settings.proxy_fix_hops:  # the real client address and scheme, as nginx saw them
        hops = settings.proxy_fix_hops
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops)
    app.wsgi_app = timing.stamp(app.wsgi_app)  # outermost: a request's total runs from here
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False  # no CORS here: OPTIONS is a 405 like any other method
    app.json.sort_keys = False
    counters = open_counters(settings.ratelimit_storage_uri)
    store, keyset = open_state(settings, counters)
    state = attach(app, State(settings, store, keyset, load_policy(settings), started_at=time.time(),
                              counters=counters, usage_log=UsageLog(store), cache=open_cache(settings),
                              batches=BatchRecords(store.engine, settings.files_dir, settings.file_expiry_s),
                              documents=attachments.open_reader(settings),
                              checker=Checker(settings.answer_check_timeout_s)))
    state.transcripts = Transcripts(store, settings.jwt_key_dir)
    state.transcript_log = TranscriptLog(state.transcripts.write,
                                         partial(state.transcripts.purge, settings.transcript_retention_delta))

    accounting.init_app(app)  # first: its after-request hook runs last, when every other one has run
    app.after_request(body.drain_unread_body)
    errors.init_app(app)
    guard.init_app(app, store=store, keyset=keyset, issuer=settings.jwt_issuer, audience=settings.jwt_audience,
                   needs_token=access.needs_token, scope_for=access.scope_for, respond=ratelimit.record_auth_failure,
                   cache=token_cache(settings, store, counters), fold=ratelimit.prefetch)
    app.before_request(accounting.lap("auth"))  # each phase's hook right after its own
    ratelimit.init_app(app, settings, limited_blueprints=[predict.bp, chat.bp, batches.bp],
                       polls=batches.POLLS)  # after the guard: keys on the user
    app.before_request(accounting.lap("limits"))
    app.register_blueprint(health.bp)
    app.register_blueprint(contract.bp)
    app.register_blueprint(me.bp)
    app.register_blueprint(models.bp)
    app.register_blueprint(admin.bp)
    app.register_blueprint(chat.bp)
    app.register_blueprint(batches.bp)
    console.init_app(app, state)
    predict.init_app(app)
    state.models = start_models(specs, sizes, settings)
    state.batch_runner = BatchRunner(state).start()
    state.alerts = Alerts(counters, settings.alert_targets, settings.alert_retries).start()
    for spec in specs:
        metrics.MODEL_INFO.labels(spec.name).info({"dtype": spec.dtype, "quantization": spec.quantization,
                                                   "device": settings.device, "version": health.version()})
    logging.getLogger("vibethinker.app").info("service starting", extra={"fields": {
        "models": [{"name": spec.name, "path": str(spec.path), "dtype": spec.dtype,
                    "quantization": spec.quantization, "weight_bytes": sizes[spec.name]} for spec in specs],
        "device": settings.device, "cache": settings.cache,
        "bind": settings.bind, "ratelimit_storage": settings.ratelimit_storage_uri.split(":")[0],
        "db": settings.db_url.split(":")[0], "version": health.version()}})
    return app


def open_state(settings, counters):
    """The (migrated) store, publishing access changes to `counters`, and the key set; SettingsError when the
    keys are missing or unsafe."""
    try:
        keyset = KeySet(settings.jwt_key_dir)
    except KeyFolderError as exc:
        raise SettingsError(str(exc)) from None
    return Store(settings.db_url, publish=epoch_publisher(counters)), keyset


def token_cache(settings, store, counters):
    """This worker's cache of verified tokens, where another process can tell it of a change (Redis)."""
    if not settings.token_cache_entries or not counters.shared:
        return None
    # Its wall clock is the store's, the one the guard checks a rotation's grace against.
    return TokenCache(store, counters.get_epoch, counters.set_epoch, max_entries=settings.token_cache_entries,
                      wall=lambda: store.clock().timestamp())


def load_policy(settings):
    """The content policy's rules; SettingsError when the file is bad."""
    try:
        return filtering.load_policy(settings.content_policy_path)
    except filtering.PolicyError as exc:
        raise SettingsError(str(exc)) from None


def start_models(specs, sizes, settings):
    """Start an engine thread per served model, taking turns at the processor; each imports torch and loads
    its model off the request path."""
    from service.inference import int8kernel, model
    from service.inference.engine import Engine, Turns

    turns, served = Turns(), []
    bounds = footprint.cache_bounds(sizes, settings.kv_cache_bytes, settings.memory_limit_bytes)
    for spec in specs:
        # int8: the kernel is chosen (and a fallback logged) here, as the answers depend on it
        kernel = int8kernel.choose(settings.int8_kernel) if mode_of(spec) == "int8" else None
        loader = partial(model.load, str(spec.path), spec.dtype, spec.quantization, settings.prefill_float32,
                         settings.device, spec.reasoning_start, settings.forced_output, settings.kv_dtype,
                         spec.reasoning_end, settings.thinking_closing, int8_kernel=kernel or "fbgemm")
        # before the engine starts: the files loaded; the KV cache's dtype and the int8 kernel change answers as
        # the mode does, and so did seeded sampling's keying on each token's index (SAMPLING)
        files = revision(spec.path, f"{mode_of(spec)} kv {settings.kv_dtype}" + (f" {kernel}" if kernel else "")
                         + f" sampling {SAMPLING}")
        engine = Engine(loader, settings.queue_size, settings.torch_threads, settings.max_batch_size,
                        name=spec.name, turns=turns, cache_bytes=bounds[spec.name],
                        prefix_bytes=settings.prefix_cache_bytes, revision=files,
                        step_tokens=settings.prefill_step_tokens, speculation=settings.speculate)
        served.append(Served(spec, engine.start(), files, sizes[spec.name]))
    return Models(served, settings.routing)
