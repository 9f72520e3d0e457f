"""What a test asks from inside a helper process (run there through its pool): what the process can see."""

import os
import resource
import socket


def inside():
    """The process's environment, open file descriptors and address-space limit."""
    return {"environ": dict(os.environ), "files": _open_files(),
            "address_space": resource.getrlimit(resource.RLIMIT_AS)[0]}


def can_open(path):
    """Whether the process can open `path` for reading: True, or the error's name."""
    try:
        with open(path, "rb"):
            return True
    except OSError as exc:
        return type(exc).__name__


def can_connect(host, port):
    """Whether the process can open a TCP connection to host:port: True, or the error's name."""
    try:
        socket.create_connection((host, port), timeout=3).close()
        return True
    except OSError as exc:
        return type(exc).__name__


def _open_files():
    """What this process's open file descriptors point at (files, pipes, sockets)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the listing's own descriptor, closed by now
            pass
    return found
