"""Reading a running server's /metrics."""

import re

import requests


def counter(server, name, **labels):
    """The sum of metric `name`'s samples on `server` whose labels include `labels`."""
    text = requests.get(server.url("/metrics"), timeout=10).text
    wanted = "".join(f'(?=[^}}]*{key}="{value}")' for key, value in labels.items())
    return sum(float(v) for v in re.findall(rf"^{name}\{{{wanted}[^}}]*\}} (\S+)$", text, re.MULTILINE))
