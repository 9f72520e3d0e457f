"""Budget alerts delivered by a worker's thread to Apprise targets: a real webhook receiver on loopback."""

import logging

from service.admission.counters import MemoryCounters
from service.records.alerts import Alerts, message
from tests.support.webhook import Webhook

ALERT = {"who": "team:squad", "day": "2026-12-07", "threshold": 80, "limit": 10000, "total": 8123}


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_an_alert_reaches_the_webhook_with_who_what_and_how_much():
    counters = MemoryCounters()
    counters.return_alerts([ALERT])
    with Webhook() as hook:
        alerts = Alerts(counters, [hook.url], poll_s=0.05).start()
        try:
            [received] = hook.wait_for(1)
        finally:
            alerts.stop()
    assert received["title"] == "VibeThinker: team squad reached 80% of its daily token budget"
    assert "team squad has used 8,123 of its 10,000 tokens on 2026-12-07 (81%" in received["message"]
    assert received["type"] == "warning" and counters.take_alerts() == []


def test_a_failed_delivery_is_tried_again_later_and_logged_without_its_url(caplog):
    counters, clock = MemoryCounters(), Clock()
    counters.return_alerts([ALERT])
    with Webhook(failures=2) as hook, caplog.at_level(logging.WARNING, "vibethinker.alerts"):
        secret_url = hook.url + "?token=s3cret"
        alerts = Alerts(counters, [secret_url], retries=5, clock=clock)
        assert alerts.step() and hook.attempts == 1 and hook.received == []
        assert not alerts.step() and hook.attempts == 1  # waits 1 s before the second try
        clock.now = 1.0
        alerts.step()
        assert hook.attempts == 2
        clock.now = 3.0  # then 2 s
        alerts.step()
        assert hook.attempts == 3 and len(hook.received) == 1 and alerts.pending == []
    failures = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(failures) == 2 and "target 1 (json)" in failures[0].getMessage()
    assert "s3cret" not in caplog.text and "127.0.0.1" not in caplog.text


def test_a_target_that_keeps_failing_is_given_up_after_the_retries(caplog):
    counters, clock = MemoryCounters(), Clock()
    counters.return_alerts([ALERT])
    with Webhook(failures=100) as hook, caplog.at_level(logging.WARNING, "vibethinker.alerts"):
        alerts = Alerts(counters, [hook.url], retries=2, clock=clock)
        for now in (0, 1, 3, 7, 15):
            clock.now = now
            alerts.step()
    assert hook.attempts == 3 and alerts.pending == []
    assert "given up after 3 tries to target(s) 1" in caplog.text


def test_only_the_failing_target_is_tried_again():
    counters, clock = MemoryCounters(), Clock()
    counters.return_alerts([ALERT])
    with Webhook() as good, Webhook(failures=1) as flaky:
        alerts = Alerts(counters, [good.url, flaky.url], clock=clock)
        alerts.step()
        clock.now = 1.0
        alerts.step()
    assert (good.attempts, len(good.received), flaky.attempts, len(flaky.received)) == (1, 1, 2, 1)


def test_a_stopping_worker_puts_undelivered_alerts_back_and_a_bad_target_is_refused_at_start(caplog):
    counters, clock = MemoryCounters(), Clock()
    counters.return_alerts([ALERT])
    with Webhook(failures=1) as hook:
        alerts = Alerts(counters, [hook.url, "nosuchservice://x"], clock=clock)
        alerts.step()
        alerts.stop()
    assert counters.take_alerts() == [ALERT]  # another worker sends it
    assert "alert target 2 (nosuchservice) cannot be used" in caplog.text


def test_a_users_alert_names_the_user():
    title, body = message({**ALERT, "who": "user:alice", "threshold": 100, "total": 10000})
    assert title == "VibeThinker: user alice reached 100% of its daily token budget"
    assert body.startswith("user alice has used 10,000 of its 10,000 tokens on 2026-12-07 (100%")
