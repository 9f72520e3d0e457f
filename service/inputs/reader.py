"""A reader of its own: one document read per process, from a socket on stdin to the same socket on stdout.

Under systemd (systemd/vibethinker-reader.socket, Accept=yes) each
connection from a worker starts `python -m service.inputs.reader` in a unit
of its own with a dynamic user, no network and no access to the service's
keys or database; the worker (service.inputs.documents.Reader, with
`document_reader_socket` set) sends one request and reads one reply:

- request: a JSON line {"media_type", "limits": Limits' fields}, then the
  document's bytes to the end of the stream;
- reply: a JSON line, {"document": Document's fields} or {"error": [kind,
  code, message]} (a DocumentError's args).
"""

import dataclasses
import json
import math
import signal
import sys


def serve(source, sink):
    """Read one request from `source` (binary), write its reply to `sink` (binary)."""
    from service.inputs.documents import Limits
    from service.inputs.extraction import DocumentError, confine, extract

    header = json.loads(source.readline())
    limits = Limits(**header["limits"])
    confine(limits.max_memory)
    signal.alarm(math.ceil(limits.timeout_s) + 1)  # past its time limit the reader ends itself (SIGALRM's default)
    data = source.read(limits.max_bytes + 1)
    try:
        reply = {"document": dataclasses.asdict(extract(data, header["media_type"], limits))}
    except DocumentError as exc:
        reply = {"error": list(exc.args)}
    except MemoryError:  # past the cap outside the decoders' own handling
        reply = {"error": ["too_large", "document_too_large", "the document needs more memory to read than a "
                           "reading process may use"]}
    sink.write(json.dumps(reply).encode() + b"\n")
    sink.flush()


if __name__ == "__main__":
    serve(sys.stdin.buffer, sys.stdout.buffer)
