"""Batch input files and waiting for a batch, through the openai client."""

import io
import json
import time

MODEL = "VibeThinker-1.5B"
DONE = ("completed", "failed", "cancelled", "expired")


def jsonl(items):
    """`items` as a JSON Lines file object, for an upload."""
    return io.BytesIO("".join(json.dumps(item) + "\n" for item in items).encode())


def chat_line(i, max_tokens=6, **body):
    """Batch line `i`: a greedy chat question, `body` overriding its fields."""
    return {"custom_id": f"problem-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": f"Problem {i}: what is {i} + {i}?"}],
                     "max_tokens": max_tokens, "temperature": 0, **body}}


def wait(client, batch_id, timeout=120, until=DONE):
    """Poll the batch until its status is one of `until`: (the batch, each (status, completed) seen)."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        seen.append((batch.status, batch.request_counts.completed))
        if batch.status in until:
            return batch, seen
        time.sleep(0.2)
    raise AssertionError(f"batch {batch_id} still {seen[-1]} after {timeout} s")
