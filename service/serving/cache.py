"""The response cache: a deterministic request asked again is answered from the first answer.

Only deterministic requests are cached: greedy (temperature 0), or sampled
with a `seed`. The key is a digest of the model's name, numeric mode and
revision (its files' identity: a replaced model never serves old answers),
the prompt's token ids (the normalised, chat-templated messages), the
answer's `reasoning_format`, and every sampling parameter as the client gave it (`max_new_tokens` before the
server sizes it to the deadline), under the owner: the user (the default,
`cache = "user"`: no user learns from timing or content what another asked)
or everyone (`cache = "shared"`). Only whole answers are stored: ended by
the model (`stop`) or at the asked length, never one the server cut
(deadline, sizing), cancelled or failed, and none over
`cache_max_entry_bytes`.

Entries live in a Redis of their own (`cache_storage_uri`, which evicts the
least recently used when full) with a TTL, apart from the counters: a full
cache must never refuse a counter's write. Without that setting they share
the counter storage (dev; a warning at start); with `memory://` they live
in this process. Storage that does not answer or refuses a write means no
cache: a lookup misses, a store is skipped, and the request goes on.
"""

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from service.records import metrics

log = logging.getLogger("vibethinker.cache")
PREFIX = "vibethinker:answer:"
SHARED = "~shared"  # the owner of shared entries: "~" is never in a user name
MEMORY_ENTRIES = 2048  # entries the in-process (dev) cache keeps, least recently used dropped first


@dataclass(frozen=True)
class Key:
    """Where one request's answer is cached, and what makes an answer complete enough to store."""

    name: str  # the storage key
    model: str  # the served model's name (a metric label)
    max_new_tokens: int  # the length the client asked for (or the default): an answer ending there is whole


def model_tag(name):
    return hashlib.sha256(name.encode()).hexdigest()[:16]


def key(settings, served, user, ids, params):
    """The cache key of a request, or None when it is not cached (cache off, or sampled without a seed)."""
    if settings.cache == "off" or (params.temperature > 0 and params.seed is None):
        return None
    material = {"model": served.name, "mode": served.mode, "revision": served.revision, "ids": list(ids),
                "max_new_tokens": params.max_new_tokens, "temperature": params.temperature,
                "top_p": params.top_p, "top_k": params.top_k, "min_p": params.min_p,
                "repetition_penalty": params.repetition_penalty, "stop": list(params.stop), "seed": params.seed,
                "reasoning_format": params.reasoning_format, "n": params.n, "logprobs": params.logprobs,
                "thinking": [params.thinking_budget, settings.answer_tokens, settings.thinking_closing,
                             settings.loop_period, settings.loop_tokens]}
    digest = hashlib.sha256(json.dumps(material, separators=(",", ":")).encode()).hexdigest()
    owner = SHARED if settings.cache == "shared" else user
    return Key(f"{PREFIX}{model_tag(served.name)}:{owner}:{digest}", served.name, params.max_new_tokens)


ENDED_AS_ASKED = ("budget", "length", "loop")  # thinkings ended early the same way every time (not "deadline")


def storable(key, result, used=None):
    """True for a whole answer: in every choice the model ended it, or it reached the length the client asked
    for, or the answer's room after a thinking ended early by the request's own numbers. `used`: the length it
    ran with, when the server lowered it (sized to the deadline): then a thinking ended early is the server's
    doing, and not stored."""
    if result is None:
        return False
    sized = used is not None and used != key.max_new_tokens
    return all(choice.thinking_ended in ((None,) if sized else (None, *ENDED_AS_ASKED)) and (
        choice.finish_reason == "stop" or (choice.finish_reason == "length" and (
            len(choice.token_ids) == key.max_new_tokens or choice.thinking_ended is not None)))
        for choice in result.choices)


class Cache:
    """Lookups and stores over a storage (RedisAnswers or MemoryAnswers); never raises for the storage."""

    def __init__(self, storage, ttl_s, max_entry_bytes):
        self.storage, self.ttl_s, self.max_entry_bytes = storage, ttl_s, max_entry_bytes

    def lookup(self, key):
        """The cached GenerationResult of `key`, or None (a miss, or the storage did not answer)."""
        try:
            raw = self.storage.get(key.name)
        except Exception:  # noqa: BLE001 - any storage failure: no cache for this request
            log.warning("response cache lookup failed: answering without the cache", exc_info=True)
            metrics.CACHE.labels(key.model, "error").inc()
            return None
        if raw is None:
            metrics.CACHE.labels(key.model, "miss").inc()
            return None
        metrics.CACHE.labels(key.model, "hit").inc()
        from service.inference.generation import GenerationResult  # here: the admin CLI purges without torch

        from service.inference.generation import Logprob

        entry = json.loads(raw)
        choices = [GenerationResult(
            choice["text"], choice["token_ids"], entry["prompt_tokens"], choice["finish_reason"], 0.0, 0.0,
            forced_tokens=choice.get("forced_tokens", 0), thinking_ended=choice.get("thinking_ended"),
            logprobs=None if choice.get("logprobs") is None else
            [Logprob(token, logprob, tuple(map(tuple, top)), thinking)
             for token, logprob, top, thinking in choice["logprobs"]], index=index)
            for index, choice in enumerate(entry.get("choices") or [entry])]
        choices[0].others = tuple(choices[1:])
        choices[0].cached_tokens = entry["prompt_tokens"]  # a replay computed nothing: its whole prompt was cached
        return choices[0]

    def store(self, key, result, used=None):
        """Keep a whole answer (see `storable`; `used`: the length it ran with) under `key`; True if stored."""
        if not storable(key, result, used):
            return False
        choices = [{"text": choice.text, "token_ids": choice.token_ids, "finish_reason": choice.finish_reason,
                    "forced_tokens": choice.forced_tokens, "thinking_ended": choice.thinking_ended,
                    "logprobs": choice.logprobs} for choice in result.choices]
        raw = json.dumps({"prompt_tokens": result.prompt_tokens, "choices": choices},
                         separators=(",", ":")).encode()
        if len(raw) > self.max_entry_bytes:
            return False
        try:
            self.storage.set(key.name, raw, self.ttl_s)
        except Exception:  # noqa: BLE001 - the answer is delivered; only its reuse is lost
            log.warning("response cache store failed", exc_info=True)
            return False
        return True

    def purge(self, user=None, model=None):
        """Drop the entries of `user` (None: every owner) for `model` (None: every model); how many.
        Raises when the storage does not answer (an admin asked: they must know)."""
        owner = "*" if user is None else user
        tag = "*" if model is None else model_tag(model)
        return self.storage.delete_matching(f"{PREFIX}{tag}:{owner}:*")


class RedisAnswers:
    """Entries in Redis, shared by every worker and server on it."""

    def __init__(self, uri):
        import redis

        url = uri.removeprefix("redis+") if uri.startswith("redis+unix://") else uri
        self._redis = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1, health_check_interval=30)

    def get(self, name):
        return self._redis.get(name)

    def set(self, name, raw, ttl_s):
        self._redis.set(name, raw, px=int(ttl_s * 1000))

    def delete_matching(self, pattern):
        count, names = 0, []
        for name in self._redis.scan_iter(match=pattern, count=1000):
            names.append(name)
            if len(names) >= 1000:
                count += self._redis.unlink(*names)
                names = []
        if names:
            count += self._redis.unlink(*names)
        return count


class MemoryAnswers:
    """Entries in this process (`make run`'s memory:// dev mode): lost on restart, bounded in count."""

    def __init__(self, clock=time.monotonic, entries=MEMORY_ENTRIES):
        self._lock, self._entries, self._clock, self._max = threading.Lock(), OrderedDict(), clock, entries

    def get(self, name):
        with self._lock:
            raw, expires = self._entries.get(name, (None, 0))
            if raw is None or expires <= self._clock():
                self._entries.pop(name, None)
                return None
            self._entries.move_to_end(name)
            return raw

    def set(self, name, raw, ttl_s):
        with self._lock:
            self._entries[name] = (raw, self._clock() + ttl_s)
            self._entries.move_to_end(name)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)

    def delete_matching(self, pattern):
        import fnmatch

        with self._lock:
            names = [name for name in self._entries if fnmatch.fnmatchcase(name, pattern)]
            for name in names:
                del self._entries[name]
            return len(names)


def served_name(settings, model):
    """The served name of `model` (a name or alias, any case), None for None; SettingsError if not served."""
    from service.settings import SettingsError

    if model is None:
        return None
    for spec in settings.served_models():
        if model.lower() in {name.lower() for name in (spec.name, *spec.aliases)}:
            return spec.name
    names = ", ".join(repr(spec.name) for spec in settings.served_models())
    raise SettingsError(f"model {model[:128]!r} is not served here; the served ones: {names}")


def purge(cache, store, user, model, actor, source):
    """Purge (Cache.purge) and audit it; how many entries went. StorageUnavailable-like errors raise."""
    try:
        count = cache.purge(user, model)
    except Exception as exc:  # noqa: BLE001 - the storage did not answer: the admin must know
        raise CacheUnavailable(f"the cache storage did not answer ({type(exc).__name__}); nothing purged") from exc
    store.record_event("cache.purge", user or "*", {"model": model, "purged": count}, actor=actor, source=source)
    return count


class CacheUnavailable(Exception):
    """The cache storage did not answer a purge."""


def storage_uri(settings):
    """Where the cached answers live: their own storage, else (dev) the counters'."""
    return settings.cache_storage_uri or settings.ratelimit_storage_uri


def open_cache(settings):
    """The app's cache, or None when the cache is off."""
    if settings.cache == "off":
        return None
    uri = storage_uri(settings)
    if uri == settings.ratelimit_storage_uri and not uri.startswith("memory://"):
        log.warning("the response cache shares the counters' Redis (cache_storage_uri is unset or the same): a "
                    "full cache there refuses the counters' writes and every request; give the cache a Redis of "
                    "its own with maxmemory-policy allkeys-lru")
    storage = MemoryAnswers() if uri.startswith("memory://") else RedisAnswers(uri)
    return Cache(storage, settings.cache_ttl_s, settings.cache_max_entry_bytes)
