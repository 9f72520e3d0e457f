"""Client threads driving a server until stopped, every outcome kept: load during a fault."""

import threading
import time
import uuid

import requests


class Load:
    """Client threads calling `call(session, request_id)` until stopped; every outcome kept."""

    def __init__(self, clients, call):
        self.outcomes, self._lock, self._stop = [], threading.Lock(), threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(call,), daemon=True) for _ in range(clients)]

    def _loop(self, call):
        session = requests.Session()
        while not self._stop.is_set():
            request_id = uuid.uuid4().hex
            started = time.monotonic()
            try:
                response = call(session, request_id)
                outcome = (request_id, response.status_code, response.text, started, time.monotonic())
            except requests.RequestException as exc:
                outcome = (request_id, None, type(exc).__name__, started, time.monotonic())
            with self._lock:
                self.outcomes.append(outcome)

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)

    def statuses(self):
        with self._lock:
            return [status for _, status, *_ in self.outcomes]
