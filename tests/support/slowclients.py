"""Slow clients against nginx, and how long a prober waits meanwhile: the edge test's and the bench's."""

import socket
import ssl
import threading
import time

import requests


class SlowBodies:
    """TLS connections to nginx on 127.0.0.1:`port` that each send a request's headers, declaring a large body,
    then one body byte every `every_s` seconds: the slow uploads that once held every app thread. Connection i
    comes from 127.0.0.(2 + i % addresses), so per-address limits see many clients. `requests` are (path,
    headers) pairs, used in turn."""

    def __init__(self, port, requests_, count, every_s=2.0, addresses=50, declared=10_000_000):
        self.port, self.requests, self.count, self.every_s = port, requests_, count, every_s
        self.addresses, self.declared, self.socks, self.dropped = addresses, declared, [], 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._trickle, daemon=True)

    def open(self):
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        for i in range(self.count):
            path, headers = self.requests[i % len(self.requests)]
            raw = socket.socket()
            raw.bind((f"127.0.0.{2 + i % self.addresses}", 0))
            raw.settimeout(10)
            raw.connect(("127.0.0.1", self.port))
            sock = context.wrap_socket(raw, server_hostname="localhost")
            lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: localhost\r\n{lines}"
                         f"Content-Length: {self.declared}\r\n\r\n".encode())
            self.socks.append(sock)
        self._thread.start()
        return self

    def _trickle(self):
        while not self._stop.wait(self.every_s):
            for sock in list(self.socks):
                try:
                    sock.sendall(b"x")
                except OSError:
                    self.socks.remove(sock)
                    self.dropped += 1

    @property
    def alive(self):
        return len(self.socks)

    def close(self):
        self._stop.set()
        self._thread.join(timeout=self.every_s + 5)
        for sock in self.socks:
            sock.close()


def slow_requests(auth):
    """The slow bodies that once held the app's threads: uploads and chat bodies, without a token and with
    `auth` (Authorization headers)."""
    multipart, json_body = {"Content-Type": "multipart/form-data; boundary=b"}, {"Content-Type": "application/json"}
    return [("/v1/files", multipart), ("/v1/files", {**multipart, **auth}),
            ("/v1/chat/completions", json_body), ("/v1/chat/completions", {**json_body, **auth})]


def probe_latencies(base, cert, token, seconds):
    """Durations of /healthz and an authenticated /v1/me, in turn, for `seconds`, on one kept-alive connection;
    each must answer 200."""
    durations, stop = [], time.monotonic() + seconds
    with requests.Session() as session:
        while time.monotonic() < stop:
            for path, headers in (("/healthz", {}), ("/v1/me", {"Authorization": f"Bearer {token}"})):
                started = time.monotonic()
                answer = session.get(base + path, headers=headers, verify=cert, timeout=15)
                durations.append(time.monotonic() - started)
                assert answer.status_code == 200, answer.text
    return durations


def p99(seconds):
    """The 99th percentile of a list of durations."""
    ordered = sorted(seconds)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
