"""Budget alerts: sent to the configured Apprise targets by a thread in each worker, never on a request's path.

An alert is raised by the counters in the same atomic step that settles a
lease (service.admission.counters): one per user or team, UTC day and
threshold, whichever worker or server settled the request that reached it,
into an outbox that every server shares (Redis's). Each worker's `Alerts`
thread takes alerts from the outbox and sends each to every target; a target
that fails is tried again (`retries` times, waiting 1, 2, 4 ... s, at most 5
minutes), each failure logged by the target's number and kind, never its URL
(it holds the service's secret). A worker that stops puts what it has not yet
delivered back in the outbox, for another worker to send.
"""

import logging
import threading
import time

log = logging.getLogger("vibethinker.alerts")
POLL_S = 1.0  # how often an idle worker looks at the outbox
BACKOFF_MAX_S = 300.0


def message(alert):
    """(title, body) of an alert {who, day, threshold, limit, total[, refused]}: `refused`, the tokens of a request
    the budget refused (its 100 % alert, raised when the budget no longer fits a request)."""
    kind, name = alert["who"].split(":", 1)
    whose = f"user {name}" if kind == "user" else f"team {name}"
    total, limit = int(alert["total"]), int(alert["limit"])
    title = f"VibeThinker: {whose} reached {alert['threshold']}% of its daily token budget"
    used = f"{whose} has used {total:,} of its {limit:,} tokens on {alert['day']} ({100 * total // limit}%, " \
           "requests in flight included)"
    if "refused" in alert:
        used += f", and a request for {int(alert['refused']):,} more was refused"
    return title, used + ". The budget resets at 00:00 UTC; an admin can raise it."


def apprise_sender(url):
    """A function that sends (title, body) to one Apprise URL: True when it was delivered."""
    import apprise

    logging.getLogger("apprise").setLevel(logging.CRITICAL)  # its lines may quote the URL, secret and all
    notifier = apprise.Apprise()
    if not notifier.add(url):
        raise ValueError("not an Apprise URL this server can send to")

    def send(title, body):
        return bool(notifier.notify(title=title, body=body, notify_type=apprise.NotifyType.WARNING))
    return send


def kind_of(url):
    """The scheme of a target, safe to log (json, mailtos, slack ...)."""
    return url.split("://", 1)[0]


class Alerts:
    """The delivery thread of one worker: `start`, then `stop` as the worker ends."""

    def __init__(self, counters, targets, retries=5, sender=apprise_sender, clock=time.monotonic, poll_s=POLL_S):
        self.counters, self.retries, self.clock, self.poll_s = counters, retries, clock, poll_s
        self.targets = []  # (number, kind, send)
        for number, url in enumerate(targets, 1):
            try:
                self.targets.append((number, kind_of(url), sender(url)))
            except Exception as exc:  # noqa: BLE001 - a bad target must not keep the service down
                log.error("alert target %d (%s) cannot be used: %s", number, kind_of(url), type(exc).__name__)
        self.pending = []  # [alert, targets not yet reached, tries so far, when to try again]
        self._stop = threading.Event()
        self._thread = None
        self._storage_down = False

    def start(self):
        if self.targets:
            self._thread = threading.Thread(target=self._run, name="vibethinker-alerts", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout=5.0):
        """End the thread; alerts not delivered yet go back to the outbox (undelivered targets: all again)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        left = [alert for alert, *_ in self.pending]
        if left:
            try:
                self.counters.return_alerts(left)
            except Exception:  # noqa: BLE001 - storage gone: say what is lost
                log.error("%d budget alert(s) not delivered and not put back: the counter storage did not answer",
                          len(left))
        self.pending = []

    def _run(self):
        while not self._stop.is_set():
            try:
                busy = self.step()
            except Exception:  # noqa: BLE001 - the thread must outlive any one failure
                log.exception("budget alert delivery failed")
                busy = False
            if not busy:
                self._stop.wait(self.poll_s)

    def step(self):
        """Take new alerts and try every due delivery once; True if it did anything."""
        try:
            fresh = self.counters.take_alerts()
            self._storage_down = False
        except Exception:  # noqa: BLE001 - logged once per outage; the outbox keeps them meanwhile
            if not self._storage_down:
                log.warning("budget alerts: the counter storage did not answer; trying again")
            self._storage_down, fresh = True, []
        now = self.clock()
        self.pending += [[alert, list(self.targets), 0, now] for alert in fresh]
        due = [item for item in self.pending if item[3] <= now]
        for item in due:
            self._deliver(item)
        return bool(fresh or due)

    def _deliver(self, item):
        alert, targets, tries, _ = item
        title, body = message(alert)
        failed = []
        for target in targets:
            number, kind, send = target
            try:
                sent = send(title, body)
            except Exception:  # noqa: BLE001 - a target's failure is a failed delivery like any other
                sent = False
            if not sent:
                failed.append(target)
                log.warning("budget alert to target %d (%s) failed (try %d of %d)", number, kind, tries + 1,
                            self.retries + 1, extra={"fields": {"who": alert["who"], "threshold": alert["threshold"]}})
        if not failed:
            self.pending.remove(item)
            log.info("budget alert sent", extra={"fields": {"who": alert["who"], "threshold": alert["threshold"],
                                                            "day": alert["day"]}})
        elif tries >= self.retries:
            self.pending.remove(item)
            log.error("budget alert given up after %d tries to target(s) %s", tries + 1,
                      ", ".join(str(number) for number, *_ in failed),
                      extra={"fields": {"who": alert["who"], "threshold": alert["threshold"], "day": alert["day"]}})
        else:
            item[1:] = [failed, tries + 1, self.clock() + min(BACKOFF_MAX_S, 2.0 ** tries)]
