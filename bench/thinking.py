"""Thinking that ends in time, at real size: n choices from one prefill, the quick start's example with the
Ansible defaults, and a batch line asking 40,960 tokens with a thinking budget.

    python -m bench.thinking [--threads 2] [--rounds 3] [--prompt 512] [--budget 256]

On the `vibethinker-1.5b` preset (random weights of VibeThinker-1.5B's shape, int8, its chat template
opening the thinking, so the model thinks from the first token and never closes it on its own):
- in process, the time to first token of one request for n=8 against n=1 (the prompt prefilled once, the
  choices forked from it), the two taking turns, each the median of the rounds;
- through real gunicorn (and Redis) with the settings the Ansible defaults render (max_new_tokens_limit,
  stream_deadline_s: ansible/roles/app/defaults/main.yml): the quick start's /predict example as printed in
  the README, and its question as a chat, within the whole answer's deadline; then a batch line asking
  40,960 tokens with a thinking budget, to its end.
Prints one JSON line of figures and the goals.
"""

import argparse
import json
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import jinja2
import requests
import yaml

from bench.harness import cached_demo_model, start_service, stop_all
from bench.realsize import int8_folder
from tests.support.databases import start_redis
from tests.support.servers import ROOT, free_port

QUESTION = "What is 12 * 34?"
LONG = 40960


def ansible_defaults():
    """The settings the Ansible role's defaults render for long answers: {VIBE_NAME: value}."""
    defaults = yaml.safe_load((ROOT / "ansible/roles/app/defaults/main.yml").read_text())
    env = jinja2.Environment()
    env.filters["int"] = lambda value: int(float(value))
    env.filters["float"] = float

    def value(name):
        text = str(defaults[name])
        for _ in range(3):  # a default made of other defaults
            text = env.from_string(text).render(**defaults)
        return text

    return {"VIBE_MAX_NEW_TOKENS_LIMIT": value("app_max_new_tokens_limit"),
            "VIBE_STREAM_DEADLINE_S": value("app_stream_deadline_s")}


def quick_start_body():
    """The README quick start's /predict body, as printed."""
    readme = (ROOT / "README.md").read_text()
    return json.loads(re.search(r"-d '(\{\"question\": \"What is 12 \* 34\?\".*?)'", readme).group(1))


def first_token_seconds(engine, ids, n):
    from service.inference.generation import GenerationRequest

    """Seconds from submitting a request for one token per choice to its answer: its time to first token."""
    started = time.monotonic()
    handle = engine.submit(GenerationRequest(ids, 1, temperature=0.6, top_p=0.95, n=n,
                                             deadline=time.monotonic() + 600))
    result = handle.result(timeout=600)
    assert len(result.choices) == n and result.completion_tokens == n
    return time.monotonic() - started


def choices_from_one_prefill(folder, threads, rounds, prompt_tokens):
    """(median seconds to the first token for n=1, for n=8)."""
    from service.inference import model
    from service.inference.engine import Engine

    engine = Engine(lambda: model.load(str(folder), quantization="int8"), queue_size=4,
                    torch_threads=threads).start()
    while not engine.ready:
        assert engine.state != "failed", "the model failed to load"
        time.sleep(0.2)
    try:
        words = " ".join(f"w{i}" for i in range(prompt_tokens))
        ids = engine.model.encode_chat([{"role": "user", "content": words}])[:prompt_tokens]
        first_token_seconds(engine, ids, 1)  # warm-up: the weights paged in, the speeds measured
        times = {1: [], 8: []}
        for _ in range(rounds):
            for n in (1, 8):
                times[n].append(first_token_seconds(engine, ids, n))
        return statistics.median(times[1]), statistics.median(times[8]), len(ids)
    finally:
        engine.stop(timeout=60)


def batch_line(base, headers, budget):
    """A batch of one chat line asking LONG tokens with a thinking budget, run to its end: (its choice and
    usage, seconds)."""
    line = {"custom_id": "long-0", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "VibeThinker-1.5B", "messages": [{"role": "user", "content": QUESTION}],
                     "max_tokens": LONG, "thinking_token_budget": budget}}
    started = time.monotonic()
    uploaded = requests.post(f"{base}/v1/files", headers=headers, data={"purpose": "batch"},
                             files={"file": ("long.jsonl", json.dumps(line) + "\n")}, timeout=60).json()
    batch = requests.post(f"{base}/v1/batches", headers=headers, timeout=60, json={
        "input_file_id": uploaded["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}).json()
    while batch["status"] not in ("completed", "failed", "expired", "cancelled"):
        time.sleep(2)
        batch = requests.get(f"{base}/v1/batches/{batch['id']}", headers=headers, timeout=60).json()
    seconds = time.monotonic() - started
    assert batch["status"] == "completed" and batch["output_file_id"], batch
    output = requests.get(f"{base}/v1/files/{batch['output_file_id']}/content", headers=headers, timeout=60)
    body = json.loads(output.text.splitlines()[0])["response"]["body"]
    return body["choices"][0], body["usage"], seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens of the n=8 against n=1 figure")
    parser.add_argument("--budget", type=int, default=256, help="the long batch line's thinking_token_budget")
    args = parser.parse_args()
    model_dir = cached_demo_model("vibethinker-1.5b")
    folder = model_dir.with_name(model_dir.name + "-int8")
    if not (folder / "config.json").is_file():
        folder = int8_folder(model_dir)
    one, eight, prompt = choices_from_one_prefill(folder, args.threads, args.rounds, args.prompt)
    figures = {"prompt_tokens": prompt, "ttft_n1_s": round(one, 3), "ttft_n8_s": round(eight, 3),
               "ttft_n8_over_n1": round(eight / one, 3)}
    work = Path(tempfile.mkdtemp(prefix="vibethinker-thinking-"))
    procs = []
    try:
        redis, storage = start_redis(work)
        procs.append(redis)
        port = free_port()
        settings = ansible_defaults()
        proc, headers = start_service(work, folder, port, [], VIBE_QUANTIZATION="int8",
                                      VIBE_RATELIMIT_STORAGE_URI=storage, VIBE_TORCH_THREADS=str(args.threads),
                                      **settings)
        procs.append(proc)
        base = f"http://127.0.0.1:{port}"
        figures["settings"] = settings
        started = time.monotonic()
        example = requests.post(f"{base}/predict", headers=headers, json=quick_start_body(), timeout=120)
        body = example.json()
        figures["quick_start"] = {
            "status": example.status_code, "seconds": round(time.monotonic() - started, 1),
            "thinking_ended_early": body.get("thinking_ended_early"), "usage": body.get("usage"),
            "answer_chars": len(body.get("answer") or ""), "finish_reason": body.get("finish_reason")}
        started = time.monotonic()
        chat = requests.post(f"{base}/v1/chat/completions", headers=headers, timeout=120, json={
            "model": "VibeThinker-1.5B", "messages": [{"role": "user", "content": QUESTION}]})
        choice, usage = chat.json()["choices"][0], chat.json()["usage"]
        figures["quick_start_chat_default_length"] = {
            "status": chat.status_code, "seconds": round(time.monotonic() - started, 1),
            "thinking_ended_early": choice["thinking_ended_early"], "usage": usage,
            "answer_chars": len(choice["message"]["content"])}
        choice, usage, seconds = batch_line(base, headers, args.budget)
        figures["long_batch_line"] = {
            "max_tokens": LONG, "thinking_token_budget": args.budget, "seconds": round(seconds, 1),
            "finish_reason": choice["finish_reason"], "thinking_ended_early": choice["thinking_ended_early"],
            "usage": usage, "answer_chars": len(choice["message"]["content"])}
    finally:
        stop_all(procs, work)
    quick, chat_figures, line = figures["quick_start"], figures["quick_start_chat_default_length"], \
        figures["long_batch_line"]
    figures["goals"] = {
        "ttft_n8_within_1.3x_n1": figures["ttft_n8_over_n1"] <= 1.3,
        "quick_start_200_thinking_ended_with_an_answer": quick["status"] == 200 and quick["seconds"] < 60
        and quick["thinking_ended_early"] is not None and quick["answer_chars"] > 0,
        "chat_reasoning_tokens_and_an_answer": chat_figures["status"] == 200
        and chat_figures["usage"]["completion_tokens_details"]["reasoning_tokens"] > 0
        and chat_figures["answer_chars"] > 0,
        "long_batch_line_ends_with_its_answer": line["thinking_ended_early"] == "budget" and line["answer_chars"] > 0,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
