"""Throughput, overhead and time to first token of the service, next to a seed-style baseline.

    python -m bench.throughput [--requests 3] [--tokens 64] [--rounds 3] [--real]

On the tiny demo model, in one run on this machine, prints JSON lines:
1. aggregate tokens/s at 1, 4, 8 and 16 concurrent clients with kept-alive
   connections, and at 16 with a new connection per request: the service
   with its default settings (real gunicorn, auth, limits, filtering,
   batching engine, with Redis as in production) against bench/seed_app.py (a Flask route calling generate, one
   request at a time) and `transformers serve` with continuous batching
   (Hugging Face's own server, installed by `make bench` through the `bench`
   extra); the service and transformers serve get the same conversation on
   the same chat route; the three run side by side and take turns, and each
   figure is the median of the rounds; at 16 clients, the goals and by how
   much a figure misses one;
2. the full stack's overhead per request over a direct in-process engine
   call, for a 1-token generation, and GET /healthz as the floor of any
   request (medians); the request path's own cost is full stack - engine -
   /healthz, and its goal is to cost no more than /healthz;
3. time to first token, p50 and p99, of streams under 16 clients;
4. with --real: batch 1 and 4 aggregate tokens/s at VibeThinker-1.5B's size
   (the random-weight preset in var/bench-model; slow).
"""

import argparse
import http.client
import itertools
import json
import os
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from urllib.parse import urlsplit

import requests

from bench.harness import build_demo_model, cached_demo_model, start_service, stop_all, wait_ready
from tests.support.databases import start_redis
from tests.support.servers import BIN, ROOT, free_port


CLIENTS = (1, 4, 8, 16)
# The goals at 16 clients (issue "The house in order"): against the seed-style server and transformers serve.
GOAL_OVER_SEED, GOAL_OVER_PEER = 8.0, 1.5


def compare(targets, tokens, per_client, rounds):
    """Median aggregate tokens/s per target and load, the targets taking turns.

    This machine's speed drifts by up to 2x over minutes, so the servers are
    measured alternately, round after round, never one block after another.
    `targets` maps a name to (url, headers, body_of); all are running. A load
    is (clients, kept-alive connections): every client count with kept-alive
    connections, and the most clients with a new connection per request.
    """
    for url, headers, body_of in targets.values():
        load(url, headers, 4, 1, tokens, body_of)  # warm-up: first calls pay one-off costs
    loads = [(n, True) for n in CLIENTS] + [(max(CLIENTS), False)]
    runs = {name: {at: [] for at in loads} for name in targets}
    for _ in range(rounds):
        for n, kept in loads:
            for name, (url, headers, body_of) in targets.items():
                runs[name][n, kept].append(load(url, headers, n, per_client, tokens, body_of, kept))
    return {name: {at: round(statistics.median(values), 1) for at, values in by_load.items()}
            for name, by_load in runs.items()}


def load(url, headers, clients, per_client, tokens, body_of, kept=True):
    """Aggregate completion tokens/s with `clients` threads sending `per_client` requests each.

    Each client keeps one http.client connection alive, as the openai client
    does (`requests` costs about 1 ms of client CPU per call, and 16 client
    threads in one process share one GIL and the two cores with the servers);
    or, not `kept`, opens a new one for each request, as curl in a loop does.
    """
    counts = [0] * clients
    where = urlsplit(url)

    def client(i):
        connection = http.client.HTTPConnection(where.hostname, where.port, timeout=600)
        try:
            for j in range(per_client):
                if not kept and j:
                    connection.close()
                    connection = http.client.HTTPConnection(where.hostname, where.port, timeout=600)
                connection.request("POST", where.path, body=json.dumps(body_of(i, j, tokens)),
                                   headers={**headers, "Content-Type": "application/json",
                                            **({} if kept else {"Connection": "close"})})
                response = connection.getresponse()
                data = json.loads(response.read())
                if response.status != 200:
                    raise RuntimeError(f"{url}: {response.status} {data}")
                counts[i] += data["usage"]["completion_tokens"] if "usage" in data else data["completion_tokens"]
        finally:
            connection.close()

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return round(sum(counts) / (time.monotonic() - started), 1)


ASKED = itertools.count()  # every question differs: the response cache (on by default) never answers one


def question(i, j, tokens):
    return {"question": f"client {i} asks question {j} (#{next(ASKED)}): what is {i} * {j}?",
            "max_new_tokens": tokens, "temperature": 0}


def start_seed(model_dir, port):
    env = {**os.environ, "SEED_MODEL_PATH": str(model_dir), "SEED_THREADS": str(len(os.sched_getaffinity(0)))}
    proc = subprocess.Popen([str(BIN / "gunicorn"), "-w", "1", "-k", "sync", "-b", f"127.0.0.1:{port}",
                             "--chdir", str(ROOT / "bench"), "seed_app:app"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_ready(f"http://127.0.0.1:{port}/predict")
    return proc


def start_transformers_serve(model_dir, port):
    """Hugging Face's server on the same model, continuous batching on, with a KV cache sized for 16 clients."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([str(BIN / "transformers"), "serve", str(model_dir), "--continuous-batching",
                             "--cb-num-blocks", "64", "--device", "cpu", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_ready(f"http://127.0.0.1:{port}/health")
    return proc


def chat_question(model_name):
    """The same conversation for every server that speaks chat: one user message, no system prompt."""
    def body(i, j, tokens):
        return {"model": model_name, "messages": [{"role": "user", "content": question(i, j, tokens)["question"]}],
                "max_tokens": tokens, "temperature": 0}
    return body


def overhead(model_dir, port, headers, samples=200):
    """Medians of a 1-token request, over HTTP and as a direct engine call, and of GET /healthz.

    The HTTP side uses one kept-alive http.client connection: `requests` adds
    about 1 ms of its own per call on this machine, which is the client's
    cost, not the service's. /healthz (no token, no engine) is the floor of
    any request here: HTTP, gunicorn, Flask and the app's hooks.
    """
    from service.inference import model
    from service.inference.engine import Engine
    from service.inference.generation import GenerationRequest
    from service.inference.model import chat_messages
    from service.settings import Settings

    system = Settings().default_system_prompt
    engine = Engine(lambda: model.load(str(model_dir)), 4, len(os.sched_getaffinity(0))).start()
    while not engine.ready:
        time.sleep(0.05)
    direct = []
    for i in range(samples):  # the same prompts as over HTTP: the engine's prefix cache helps neither more
        ids = engine.model.encode_chat(chat_messages(f"overhead #{1000 + i}?", system))
        started = time.perf_counter()
        engine.submit(GenerationRequest(ids, 1, deadline=time.monotonic() + 60)).result(60)
        direct.append(time.perf_counter() - started)
    engine.stop(10)
    asked = itertools.count(2000)  # every one computed: a cached answer would cost no engine
    body = lambda: json.dumps({"question": f"overhead #{next(asked)}?", "max_new_tokens": 1,  # noqa: E731
                               "temperature": 0})
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def timed(method, path, **kwargs):
        started = time.perf_counter()
        connection.request(method, path, **kwargs)
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"{method} {path}: {response.status}")
        return time.perf_counter() - started

    full, floor = [], []
    for _ in range(samples):
        full.append(timed("POST", "/predict", body=body(), headers={**headers, "Content-Type": "application/json"}))
        floor.append(timed("GET", "/healthz"))
    connection.close()
    path = _median_ms(full) - _median_ms(direct) - _median_ms(floor)
    return {"direct_engine_ms": _median_ms(direct), "full_stack_ms": _median_ms(full),
            "overhead_ms": round(_median_ms(full) - _median_ms(direct), 2), "healthz_ms": _median_ms(floor),
            "request_path_ms": round(path, 2), "path_over_healthz": round(path / _median_ms(floor), 2)}


def goal(value, target, at_most=False):
    """Whether a figure meets its goal, and by how much it misses when it does not."""
    met = value <= target if at_most else value >= target
    return {"target": target, "met": met, **({} if met else {"short_by": round(abs(value - target), 2)})}


def _median_ms(seconds):
    return round(statistics.median(seconds) * 1000, 2)


def ttft(url, headers, clients=16, tokens=64):
    """p50 and p99 seconds from sending a stream request to its first content chunk."""
    firsts = []

    def client(i):
        body = {"model": "VibeThinker-1.5B", "messages": [{"role": "user", "content": f"stream {i}"}],
                "max_tokens": tokens, "temperature": 0, "stream": True}
        started = time.monotonic()
        with requests.post(url, json=body, headers=headers, stream=True, timeout=600) as response:
            for line in response.iter_lines():
                if line.startswith(b"data: {") and b'"content":"' in line and b'"content":""' not in line:
                    firsts.append(time.monotonic() - started)
                    break
            for _ in response.iter_lines():
                pass

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    firsts.sort()
    return round(statistics.median(firsts), 3), round(firsts[min(len(firsts) - 1, int(len(firsts) * 0.99))], 3)


def real_size(tokens=8):
    """Aggregate tokens/s at batch 1 and 4 on the full-size preset, in process."""
    from service.inference import model
    from service.inference.engine import Engine
    from service.inference.generation import GenerationRequest
    from service.inference.model import chat_messages

    model_dir = cached_demo_model("vibethinker-1.5b")
    figures = {}
    for name, dtype, quantization in (("bfloat16", "bfloat16", "none"), ("float32", "float32", "none"),
                                      ("int8", "float32", "int8")):
        engine = Engine(lambda d=dtype, q=quantization: model.load(str(model_dir), d, q), 8,
                        len(os.sched_getaffinity(0))).start()
        while not engine.ready:
            time.sleep(0.1)
        for batch in (1, 4):
            ids = [engine.model.encode_chat(chat_messages(f"q{i}", "s")) for i in range(batch)]
            started = time.monotonic()
            handles = [engine.submit(GenerationRequest(x, tokens, deadline=time.monotonic() + 3600)) for x in ids]
            done = sum(h.result(3600).completion_tokens for h in handles)
            figures[f"{name}_batch{batch}_tok_s"] = round(done / (time.monotonic() - started), 2)
        engine.stop(30)
    return figures


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=3, help="requests per client")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="turns each server takes per client count")
    parser.add_argument("--real", action="store_true", help="also measure at VibeThinker-1.5B's size (slow)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vibethinker-bench-"))
    procs = []
    try:
        model_dir = build_demo_model(work / "model")
        service_port, seed_port, peer_port = free_port(), free_port(), free_port()
        redis, storage = start_redis(work)  # as production runs it: limits, budgets and the token cache
        # the service's defaults (threads, queue, batch): only where its counters live (Redis, as production
        # has them) and the bench user's own quotas are set
        proc, headers = start_service(work, model_dir, service_port,
                                      ["--rate-limit", "1000000/minute", "--daily-tokens", str(10**12),
                                       "--max-concurrent", "100"], VIBE_RATELIMIT_STORAGE_URI=storage)
        procs += [proc, start_seed(model_dir, seed_port), start_transformers_serve(model_dir, peer_port)]
        figures = compare({
            "service": (f"http://127.0.0.1:{service_port}/v1/chat/completions", headers,
                        chat_question("VibeThinker-1.5B")),
            "seed": (f"http://127.0.0.1:{seed_port}/predict", {}, question),
            "transformers_serve": (f"http://127.0.0.1:{peer_port}/v1/chat/completions", {},
                                   chat_question(str(model_dir))),
        }, args.tokens, args.requests, args.rounds)
        for other in procs[1:]:  # the service alone from here on
            other.terminate()
            other.wait(30)
        procs.append(redis)
        p50, p99 = ttft(f"http://127.0.0.1:{service_port}/v1/chat/completions", headers)
        costs = overhead(model_dir, service_port, headers)
        ours, seed, peer = figures["service"], figures["seed"], figures["transformers_serve"]
        for at in ours:
            n, kept = at
            line = {"bench": "throughput", "model": "tiny", "clients": n, "tokens": args.tokens,
                    "connections": "kept-alive" if kept else "new per request", "rounds": args.rounds,
                    "settings": "defaults", "service_tok_s": ours[at], "seed_tok_s": seed[at],
                    "transformers_serve_tok_s": peer[at], "ratio": round(ours[at] / seed[at], 2),
                    "ratio_to_transformers_serve": round(ours[at] / peer[at], 2)}
            if n == max(CLIENTS):
                line["goals"] = {"ratio": goal(line["ratio"], GOAL_OVER_SEED),
                                 "ratio_to_transformers_serve": goal(line["ratio_to_transformers_serve"],
                                                                     GOAL_OVER_PEER)}
            print(json.dumps(line))
        print(json.dumps({"bench": "overhead", **costs,
                          "goals": {"path_over_healthz": goal(costs["path_over_healthz"], 1.0, at_most=True)}}))
        print(json.dumps({"bench": "ttft", "clients": 16, "p50_s": p50, "p99_s": p99}))
        if args.real:
            print(json.dumps({"bench": "real_size", "preset": "vibethinker-1.5b", **real_size()}))
    finally:
        stop_all(procs, work)


if __name__ == "__main__":
    main()
