"""Decode speed deep into a long answer: the KV cache at depth, against the same rows near the start.

    python -m bench.depth [--preset vibethinker-1.5b] [--steps 16] [--threads 2] [--no-llama]

On the preset's random-weight model (int8, a pre-converted folder), the
engine's batch (service.inference.batching) decodes: 1 row at 512 and at
8,192 tokens of context; 8 rows at 256 and at 4,096 each; each with the
bfloat16 cache and with the float32 one, measured side by side. A row's
context is laid into its cache directly (random keys and values, then its
last prompt token prefilled for real): decode reads the cache's bytes
whatever they hold, and prefilling 32,768 tokens at real size would take
minutes for nothing this bench measures. Rows of fewer than 512 tokens
attend together in one float32 batch, the engine's own path near the start
of an answer (service.inference.kvcache.SHORT), so the 8-row ratio sets
that path against the in-place one. The bound of each ratio is the
bytes a step reads (weights plus every row's cache) near the start over
at depth. llama.cpp Q8_0 (`llama-bench -d`, its no-AMX build) decodes at
the same depths, in the same run. Last, 4 rows of 16,384 tokens run a few
steps and the process's resident memory is compared with the weights plus
the cache's estimate (what those rows reserve) plus 1 GiB.
Each speed is the median of `--rounds` rounds, the two caches and llama.cpp
taking turns. One JSON line of figures, then one with the issue's goals.
"""

import argparse
import json
import os
import statistics
import time
from types import SimpleNamespace

import torch

from bench import llamacpp
from bench.harness import cached_demo_model
from bench.modes import weight_bytes
from bench.realsize import int8_folder
from bench.throughput import goal
from service.inference import footprint, model
from service.inference.batching import Batch
from service.inference.generation import Generation, GenerationRequest

GIB = 2 ** 30


def rows_at(loaded, rows, depth, steps):
    """A batch of `rows` rows, each with `depth` tokens of context, ready to decode `steps` steps."""
    batch = Batch(loaded)
    generator = torch.Generator().manual_seed(depth)
    vocab = loaded.model.config.vocab_size
    handles = [Generation(GenerationRequest(torch.randint(vocab, (depth,), generator=generator).tolist(),
                                            steps + 8, deadline=time.monotonic() + 3600)) for _ in range(rows)]
    batch.admit(handles)
    for row in batch.filling:  # the context but its last token, laid in directly
        row.cache.keys[:, :, :depth - 1].uniform_(-1, 1)
        row.cache.values[:, :, :depth - 1].uniform_(-1, 1)
        row.cache.length = row.filled = depth - 1
    while batch.filling:
        batch.fill(4096)
    return batch


def decode_rate(loaded, rows, depth, steps):
    """Aggregate decode tokens/s of `rows` rows at `depth` tokens of context each (after two warm steps)."""
    batch = rows_at(loaded, rows, depth, steps + 2)
    batch.step()
    batch.step()
    started = time.perf_counter()
    for _ in range(steps):
        batch.step()
    rate = rows * steps / (time.perf_counter() - started)
    batch.empty()
    return rate


def resident():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="vibethinker-1.5b")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--no-llama", action="store_true", help="leave llama.cpp out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = cached_demo_model(args.preset)
    folder = int8_folder(base)
    figures, runs = {}, {}
    # Memory first, with one model loaded: 4 rows of 16,384 tokens against the weights and the cache's estimate.
    half = model.load(str(folder), quantization="int8", kv_dtype="bfloat16")
    held = footprint.weight_bytes(SimpleNamespace(path=folder, quantization="int8", dtype="float32"))
    loaded_rss = resident()
    batch = rows_at(half, 4, 16384, 4)
    for _ in range(4):
        batch.step()
    estimate = held + batch.memory.reserved
    figures.update(weights_gib=round(held / GIB, 2), rss_loaded_gib=round(loaded_rss / GIB, 2),
                   rss_4x16384_gib=round(resident() / GIB, 2), cache_reserved_4x16384_gib=round(
                       batch.memory.reserved / GIB, 2), rss_budget_4x16384_gib=round((estimate + GIB) / GIB, 2))
    figures["rss_within_budget"] = resident() <= estimate + GIB
    batch.empty()
    del batch
    # Speed: both caches loaded side by side, taking turns at every point, round after round.
    models = {"bfloat16": half, "float32": model.load(str(folder), quantization="int8", kv_dtype="float32")}
    points = {"1row": (1, 512, 8192), "8rows": (8, 256, 4096)}
    for loaded in models.values():
        decode_rate(loaded, 1, 64, 4)  # warm: weights paged in, kernels chosen
    for _ in range(args.rounds):
        for name, (rows, near, deep) in points.items():
            for depth in (near, deep):
                for kv, loaded in models.items():
                    runs.setdefault(f"{kv}_{name}_at_{depth}_tok_s", []).append(
                        decode_rate(loaded, rows, depth, args.steps))
        if not args.no_llama:
            q8 = llamacpp.gguf(base, "q8_0")
            for depth in (512, 8192):
                runs.setdefault(f"llama_q8_0_1row_at_{depth}_tok_s", []).append(
                    llamacpp.decode_at_depth(q8, "noamx", args.threads, depth))
    figures.update({key: round(statistics.median(values), 2) for key, values in runs.items()})
    weights, per_token = weight_bytes(half.model), half.layout.bytes_per_token
    figures["cache_bytes_per_token"] = per_token
    for name, (rows, near, deep) in points.items():
        for kv, width in (("bfloat16", per_token), ("float32", 2 * per_token)):
            figures[f"{kv}_{name}_deep_over_near"] = round(figures[f"{kv}_{name}_at_{deep}_tok_s"]
                                                           / figures[f"{kv}_{name}_at_{near}_tok_s"], 3)
            # the bound: bytes a step reads near the start over at depth (weights, and every row's cache)
            figures[f"{kv}_{name}_bound"] = round((weights + rows * near * width) / (weights + rows * deep * width), 3)
    print(json.dumps({"bench": "depth", "preset": args.preset, "threads": args.threads, "steps": args.steps,
                      "rounds": args.rounds, **figures}))
    goals = {"1row_8192_over_512": goal(figures["bfloat16_1row_deep_over_near"], 0.85),
             "8rows_4096_over_256_bf16": goal(figures["bfloat16_8rows_deep_over_near"], 0.6),
             "rss_4x16384_within_weights_cache_1gib": {"met": figures["rss_within_budget"]}}
    if not args.no_llama:
        ratio = round(figures["bfloat16_1row_at_8192_tok_s"] / figures["llama_q8_0_1row_at_8192_tok_s"], 2)
        goals["1row_8192_over_llama_q8_0"] = {"value": ratio, **goal(ratio, 1.5)}
    print(json.dumps({"bench": "depth_goals", "goals": goals}))


if __name__ == "__main__":
    main()
