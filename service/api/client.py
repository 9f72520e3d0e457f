"""Whether the client of this request is still there, asked of its socket while an answer is computed.

A non-streamed answer writes nothing until it is done, so a client that left
is noticed only by looking: gunicorn hands the connection's socket to the
app (`gunicorn.socket`), and a peer that closed it makes it readable with
nothing to read. Data waiting there (a pipelined request) means it is still
there. Behind nginx, nginx closes its upstream connection when its client
goes away, so the same check sees that.
"""

import select
import socket

from flask import request

CLIENT_GONE = 499  # nginx's status for a request whose client closed the connection


def gone():
    """True once the client of the current request has closed its connection."""
    sock = request.environ.get("gunicorn.socket")
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except (OSError, ValueError):  # reset, or already closed
        return True
