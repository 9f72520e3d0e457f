"""Prompt-lookup speculation at batch 1: how often drafts hold on real reasoning, and the speed that gives.

    python -m bench.speculation [--preset vibethinker-1.5b] [--window 256] [--rounds 2] [--no-llama]

Random weights cannot show what real text gives: their output seldom repeats
itself. So the figures that count come from bench/transcript.md, a worked
competition-math solution written for the purpose (a question, then a
thinking of a few thousand tokens and an answer, in VibeThinker's manner),
read in the demo tokenizer:
- `transcript_*`: the drafts (service.inference.speculate.Drafts) replayed
  over the whole transcript, the question as the prompt: drafted tokens
  accepted, and tokens a step gives.
- `timed_*`: the engine at batch 1, int8 (a pre-converted folder), decoding a
  window of the transcript as the model's own output (the forced_output
  mechanism: every step's forward pass is the model's, only the chosen token is
  the transcript's), with the question and the transcript before the window
  as its prompt, so its drafts see what they would at that depth. Speculation
  off and on take turns, round after round; tokens/s are medians.
- `own_output_*`: the acceptance on the random model's own greedy output,
  NOT representative of a real model (labelled so).
- llama.cpp Q8_0's batch-1 decode on the same weights, its best build here
  (bench/llamacpp.py), with as many tokens in its context as the timed window
  has (llama-bench -d; the goals compare with this one) and with none.
One JSON line of figures, then one with the goals.
"""

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

import torch
from prometheus_client import REGISTRY

from bench import llamacpp
from bench.harness import cached_demo_model
from bench.realsize import int8_folder
from bench.throughput import goal
from service.inference import model, speculate
from service.inference.batching import Batch
from service.inference.generation import Generation, GenerationRequest

TRANSCRIPT = Path(__file__).with_name("transcript.md")


def transcript(loaded):
    """(prompt ids of the transcript's question, its output's token ids) in the model's tokenizer."""
    text = TRANSCRIPT.read_text()
    first, output = text.split("\n", 1)
    question = first.removeprefix("Question:").strip()
    prompt = loaded.encode_chat([{"role": "user", "content": question}])
    return prompt, loaded.tokenizer(output.strip(), add_special_tokens=False)["input_ids"]


def replay(prompt, output, count=speculate.DRAFT_TOKENS):
    """The drafts over `output` as the engine takes them at batch 1: (drafted, accepted, decode steps). The
    first token comes with the prompt; each step then gives the next one and the drafts after it that hold."""
    drafts, done, drafted, accepted, steps = speculate.Drafts(prompt), 1, 0, 0, 0
    while done < len(output):
        guess = drafts.propose(output[:done], min(count, len(output) - done - 1))
        hit = next((i for i, token in enumerate(guess) if output[done + i] != token), len(guess))
        drafted, accepted, steps, done = drafted + len(guess), accepted + hit, steps + 1, done + 1 + hit
    return drafted, accepted, steps


def timed(loaded, prompt, window, speculation):
    """Decode tokens/s of one row producing `window` (forced) after `prompt`, with `speculation`."""
    forced = dataclasses.replace(loaded, forced=(*window, loaded.tokenizer.eos_token_id))
    batch = Batch(forced, speculation=speculation)
    handle = Generation(GenerationRequest(prompt, len(window), deadline=time.monotonic() + 3600))
    batch.admit([handle])
    while batch.filling:
        batch.fill(2048)
    [row] = batch.rows
    first, started = len(row.ids), time.perf_counter()
    while batch.rows:
        batch.step()
        batch.evict()
    assert row.ids == list(window), "the forced window came out otherwise"
    return (len(row.ids) - first) / (time.perf_counter() - started)


def own_output(loaded, prompt, tokens):
    """(drafted, accepted) on the random model's own greedy answer to `prompt`, speculating."""
    def counted():
        return [REGISTRY.get_sample_value(name, {"model": "model"}) or 0.0 for name in
                ("vibethinker_speculation_drafted_tokens_total", "vibethinker_speculation_accepted_tokens_sum")]

    before = counted()
    batch = Batch(loaded, speculation="ngram")
    batch.admit([Generation(GenerationRequest(prompt, tokens, deadline=time.monotonic() + 3600))])
    while batch.filling:
        batch.fill(2048)
    while batch.rows:
        batch.step()
        batch.evict()
    after = counted()
    return after[0] - before[0], after[1] - before[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="vibethinker-1.5b")
    parser.add_argument("--window", type=int, default=256, help="transcript tokens decoded in each timed run")
    parser.add_argument("--depth", type=int, default=2048, help="transcript tokens before the window")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--no-llama", action="store_true", help="leave llama.cpp out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = cached_demo_model(args.preset)
    folder = int8_folder(base)
    loaded = model.load(str(folder), quantization="int8")
    prompt, output = transcript(loaded)
    drafted, accepted, steps = replay(prompt, output)
    figures = {"transcript_tokens": len(output), "transcript_drafted": drafted, "transcript_accepted": accepted,
               "transcript_acceptance": round(accepted / max(drafted, 1), 3),
               "transcript_tokens_per_step": round((len(output) - 1) / steps, 3)}
    depth = min(args.depth, len(output) - args.window)
    deep_prompt, window = prompt + output[:depth], output[depth:depth + args.window]
    timed(loaded, deep_prompt[:256], output[:16], "off")  # warm: weights paged in, kernels chosen
    runs = {}
    for _ in range(args.rounds):
        for mode in ("off", "ngram"):
            runs.setdefault(f"timed_{mode}_tok_s", []).append(timed(loaded, deep_prompt, window, mode))
        if not args.no_llama:  # its best build, at the depth of the timed window and with nothing before it
            q8 = llamacpp.gguf(base, "q8_0")
            runs.setdefault("llama_q8_0_batch1_at_depth_tok_s", []).append(max(
                llamacpp.decode_at_depth(q8, build, args.threads, len(deep_prompt), 64) for build in ("amx", "noamx")))
            runs.setdefault("llama_q8_0_batch1_tok_s", []).append(max(
                llamacpp.decode_batch1(q8, build, args.threads) for build in ("amx", "noamx")))
    figures.update({key: round(statistics.median(values), 2) for key, values in runs.items()})
    figures["timed_depth"], figures["timed_window"] = depth, len(window)
    figures["speculation_speedup"] = round(figures["timed_ngram_tok_s"] / figures["timed_off_tok_s"], 3)
    own_drafted, own_accepted = own_output(loaded, prompt, args.window)
    figures["own_output_drafted_not_representative"] = own_drafted
    figures["own_output_acceptance_not_representative"] = round(own_accepted / max(own_drafted, 1), 3)
    print(json.dumps({"bench": "speculation", "preset": args.preset, "threads": args.threads,
                      "rounds": args.rounds, **figures}))
    if not args.no_llama:
        llama = figures["llama_q8_0_batch1_at_depth_tok_s"]  # as deep into its context as the timed window
        plain = round(figures["timed_off_tok_s"] / llama, 2)
        sped = round(figures["timed_ngram_tok_s"] / llama, 2)
        print(json.dumps({"bench": "speculation_goals", "goals": {
            "batch1_int8_over_llama_q8_0": {"value": plain, **goal(plain, 1.0)},
            "batch1_int8_speculating_over_llama_q8_0": {"value": sped, **goal(sped, 1.3)}}}))


if __name__ == "__main__":
    main()
