"""The served models: each with its engine and its files' revision, found by name, alias or routing rule.

Each served model has its own engine (thread, queue and batch) and its
revision: a digest of its files' names, sizes and modification times, and of
the numeric mode, so a replaced model folder never gets an old cached answer.
A request names a model (`model`, an alias, any case) or asks for "auto"
(chat's `model: "auto"`, /predict without a model): then the routing rules
pick one by the question (service.routing). A caller whose allow-list
(`models`) lacks the model is Forbidden, naming it; an unknown name is
NotFound, naming the served ones.
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path

from service import routing
from service.errors import Forbidden, NotFound
from service.records import metrics
from service.serving.reasoning import Markers
from service.settings import AUTO


@dataclass
class Served:
    """One served model: its settings, its engine, and the revision of its files."""

    spec: object  # service.settings.ModelSpec, dtype and quantization filled in
    engine: object  # service.inference.engine.Engine
    revision: str
    weight_bytes: int = 0

    @property
    def name(self):
        return self.spec.name

    @property
    def mode(self):
        return mode_of(self.spec)

    @property
    def markers(self):
        """How this model marks its reasoning, and whether its loaded chat template opens it."""
        loaded, spec = self.engine.model if self.engine is not None else None, self.spec
        implied = not spec.reasoning_start and bool(spec.reasoning_end)  # no opening tag: it starts thinking
        return Markers(spec.reasoning_start, spec.reasoning_end,
                       implied or bool(getattr(loaded, "opens_reasoning", False)))


def mode_of(spec):
    """The numeric mode a model spec runs in: int8, or its dtype."""
    return "int8" if spec.quantization == "int8" else spec.dtype


class Models:
    """The served models in settings order (the first is the default), found by name or alias in any case."""

    def __init__(self, served, rules=()):
        self.all = tuple(served)
        self._by_name = {name.lower(): item for item in self.all for name in (item.name, *item.spec.aliases)}
        self.rules = routing.compile_rules(rules, lambda name: self._by_name[name.lower()].name)

    @property
    def default(self):
        return self.all[0]

    def get(self, name):
        """The served model called `name` (or with it as an alias), or None."""
        return self._by_name.get(name.lower())

    def __iter__(self):
        return iter(self.all)

    def pick(self, requested, question, allowed=None, param="model"):
        """The model for a request naming `requested` (None or "auto": routed by `question`), for a caller
        whose allow-list is `allowed` (None: any); NotFound (unknown) or Forbidden (not allowed)."""
        permitted = None if allowed is None else self.permitted(allowed)
        if requested is None or requested.lower() == AUTO:
            name = routing.route(self.rules, question, self.default.name, permitted,
                                 timed_out=lambda number: metrics.ROUTING_TIMEOUTS.labels(str(number)).inc())
            if name is None:
                raise Forbidden("this account may call no model here; ask an admin", "model_not_allowed", param)
            return self._by_name[name.lower()]
        served = self.get(requested)
        if served is None:
            names = ", ".join(repr(item.name) for item in self.all)
            raise NotFound(f"model {requested[:128]!r} does not exist here; this server serves {names} "
                           f"(or {AUTO!r}: picked by the question)", "model_not_found", param)
        if permitted is not None and served.name not in permitted:
            raise Forbidden(f"this account may not call model {served.name!r}; ask an admin",
                           "model_not_allowed", param)
        return served

    def permitted(self, allowed):
        """The served names an allow-list (of names or aliases, any case) permits, in served order."""
        wanted = {name.lower() for name in allowed}
        return tuple(item.name for item in self.all
                     if any(name.lower() in wanted for name in (item.name, *item.spec.aliases)))


def revision(path, mode):
    """The identity of a model folder's files (names, sizes, modification times) and the numeric mode."""
    digest = hashlib.sha256(mode.encode())
    root = Path(path)
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        info = file.stat()
        digest.update(f"\0{file.relative_to(root)}\0{info.st_size}\0{info.st_mtime_ns}".encode())
    return digest.hexdigest()[:32]
