"""Where a generation's time went: its phases, for `Server-Timing`, the log line, /metrics and batch lines.

A request's `Timings` runs from the moment the edge read it (the outermost
WSGI layer stamps the environ: `stamp`) and is moved along by laps: `lap(phase)`
gives the time since the last mark to `phase`. Each phase spans:

- `auth`: the request read and the token checked (flask's request set-up, the
  token cache or the JWT decode and the database);
- `limits`: the request rate limit: for a token the worker holds, one Redis
  script that also brings the access epoch (service.admission.ratestore),
  else one per window of the limit;
- `template`: the body read and validated, its texts cleaned and checked
  against the content policy, the model picked, the chat template applied and
  the prompt tokenized, documents excepted;
- `documents`: reading the documents, their wait for a reader included;
- `admission`: the budget lease and concurrency slot (one Redis script), the
  answer sized to the deadline, the request queued on the engine;
- `queue`, `prefill`, `decode`: the engine's, from its result: waiting to
  join the batch, joining to the first token (the prompt's pieces run beside
  other rows' steps), first token to the last;
- `record`: the lease settled, the answer shaped, the usage row committed
  (a refusal made before the prompt was ready: its work is `template`'s);
- `cache` (only when the response cache is on): its lookup.

`total` is not their sum: it is the wall time from the stamp to the
response's head (a whole answer: all of it; a stream: the head, sent before
the first token; its usage chunk and log line have the whole). What no phase
covers is the wait for the engine's result to wake the request and the
framework's own steps between the phases.
"""

import time

PHASES = ("auth", "limits", "admission", "queue", "documents", "template", "prefill", "decode", "record")
EDGE_KEY = "vibethinker.edge_started"  # the environ key the outermost WSGI layer stamps


class Timings:
    """Seconds per phase of one generation, moved along by laps from `started` (time.monotonic)."""

    def __init__(self, started=None):
        self.started = time.monotonic() if started is None else started
        self.mark = self.started
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._engine = False  # the engine's phases are in

    def lap(self, phase, now=None):
        """Give the time since the last mark to `phase`; the mark moves to now."""
        now = time.monotonic() if now is None else now
        self.seconds[phase] = self.seconds.get(phase, 0.0) + max(0.0, now - self.mark)
        self.mark = now

    def skip(self, now=None):
        """Move the mark to now: the time since belongs to no phase."""
        self.mark = time.monotonic() if now is None else now

    def engine(self, result, replayed=False):
        """The engine's phases of a finished generation (none for a replayed answer); the time waited for it
        belongs to them, so the mark moves to now, once."""
        if self._engine:
            return
        self._engine = True
        if result is not None and not replayed:
            self.seconds.update(queue=result.queue_seconds, prefill=result.prefill_seconds,
                                decode=max(0.0, result.run_seconds - result.prefill_seconds))
        self.skip()

    def total(self, now=None):
        """Seconds since the edge read the request."""
        return (time.monotonic() if now is None else now) - self.started

    def milliseconds(self, total):
        """{phase: ms} with `total`, rounded to microseconds: the log line's and a batch line's form."""
        return {**{phase: round(s * 1000, 3) for phase, s in self.seconds.items()}, "total": round(total * 1000, 3)}

    def header(self, total):
        """The W3C Server-Timing value: each phase's duration in milliseconds, then the total."""
        return ", ".join(f"{phase};dur={ms:g}" for phase, ms in self.milliseconds(total).items())


def shown(setting, scopes):
    """Whether a response (or a stream's usage chunk) shows its phases: `on`, or `admin` for a token with the
    admin scope; `off` never. The log line and /metrics have them whatever the setting."""
    return setting == "on" or (setting == "admin" and "admin" in scopes)


def stamp(wsgi_app):
    """Wrap the outermost WSGI app: each request's environ gets the moment the app was handed it."""
    def stamped(environ, start_response):
        environ[EDGE_KEY] = time.monotonic()
        return wsgi_app(environ, start_response)
    return stamped


def observe(histogram, route, timings, total):
    """Each phase (and the total) into `histogram`, labelled by route and phase (fixed sets: no user, no
    client text)."""
    for phase, seconds in timings.seconds.items():
        histogram.labels(route, phase).observe(seconds)
    histogram.labels(route, "total").observe(total)
