"""A webhook receiver on loopback: what budget alerts (Apprise's json:// target) deliver, as the tests see it."""

import http.server
import json
import threading

from tests.support.servers import free_port


class Webhook:
    """Collects each POSTed JSON body; the first `failures` POSTs are answered 500 (a target that is down)."""

    def __init__(self, failures=0):
        self.received, self.attempts, self.failures = [], 0, failures
        self.arrived = threading.Condition()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.arrived:
                    receiver.attempts += 1
                    failing = receiver.attempts <= receiver.failures
                    if not failing:
                        receiver.received.append(json.loads(body))
                        receiver.arrived.notify_all()
                self.send_response(500 if failing else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args):
                pass

        self.port = free_port()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.url = f"json://127.0.0.1:{self.port}/alerts"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *_exc):
        self.server.shutdown()
        self.server.server_close()

    def wait_for(self, count, timeout=30.0):
        """The bodies received, once there are at least `count` (or the timeout passed)."""
        with self.arrived:
            self.arrived.wait_for(lambda: len(self.received) >= count, timeout)
            return list(self.received)
