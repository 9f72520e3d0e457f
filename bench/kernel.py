"""The own int8 kernel against fbgemm's, layer by layer, at VibeThinker-1.5B's shapes (random weights).

    python -m bench.kernel [--threads N] [--repeats 25]

Both kernels run the same int8 weights (service.inference.int8kernel.OwnInt8Linear and numerics.Int8Linear
as the int8 mode uses them, 8-bit activations), side by side in one process and taking turns call by call,
so a busy machine slows both alike. Each shape gets enough copies of its weights (256 MB and more) that
every call reads them from memory, as a decode step does, not from the cache. Prints one JSON line:
- per shape and row count (M = 1, 2, 4, 8 as decode batches; 64, 256, 2048 as prefill chunks): the median
  milliseconds of each kernel and fbgemm's over own's (above 1: the own kernel is faster), and at M = 1 the
  GB/s each reads;
- `step`: one decode step's linears (28 layers of q, k, v, o, gate, up, down and the head) summed from those
  medians, per kernel and M;
- `call_us`: the cost of one call on a 64 x 4 layer (the Python side and the kernel's entry), per kernel;
- the CPU's model name and the threads used.
"""

import argparse
import json
import os
import sys
import statistics
import time
import warnings

HIDDEN, INTERMEDIATE, KV, VOCAB, LAYERS = 1536, 8960, 256, 151936, 28
# (name, in, out, bias, how many per step)
SHAPES = [("q", HIDDEN, HIDDEN, True, LAYERS), ("kv", HIDDEN, KV, True, 2 * LAYERS), ("o", HIDDEN, HIDDEN, False, LAYERS),
          ("gate_up", HIDDEN, INTERMEDIATE, False, 2 * LAYERS), ("down", INTERMEDIATE, HIDDEN, False, LAYERS),
          ("head", HIDDEN, VOCAB, False, 1)]
DECODE, PREFILL = (1, 2, 4, 8), (64, 256, 2048)
COPIES_BYTES = 256 << 20


def cpu_model():
    """The CPU's model name, as lscpu shows it."""
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return None


def layers(k, n, bias, copies):
    """`copies` pairs (fbgemm's layer, own layer) of one random int8 weight each."""
    import torch

    from service.inference import numerics
    from service.inference.int8kernel import OwnInt8Linear

    pairs = []
    for _ in range(copies):
        dense = torch.nn.Linear(k, n, bias=bias)
        torch.nn.init.normal_(dense.weight, std=0.02)
        dense.qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fbgemm = numerics.Int8Linear.from_float(dense)
        fbgemm.full_range = numerics.cpu_has_vnni()
        weight, b = fbgemm._weight_bias()
        pairs.append((fbgemm, OwnInt8Linear.from_quantized(weight, b)))
    return pairs


def timed(pairs, m, k, repeats):
    """Median seconds per call of each kernel, turn by turn over the copies: (fbgemm, own)."""
    import torch

    x = torch.randn(m, k)
    times = ([], [])
    with torch.inference_mode():
        for pair in pairs[:2]:  # first touch
            for layer in pair:
                layer(x)
        for i in range(repeats):
            pair = pairs[i % len(pairs)]
            for kernel, layer in enumerate(pair if i % 2 else reversed(pair)):
                started = time.perf_counter()
                layer(x)
                times[kernel if i % 2 else 1 - kernel].append(time.perf_counter() - started)
    return statistics.median(times[0]), statistics.median(times[1])


def call_cost(repeats=2000):
    """Microseconds per call of each kernel on a 64 x 4 layer: what a call costs beyond its arithmetic."""
    import torch

    (pair,) = layers(64, 4, True, 1)
    x = torch.randn(1, 64)
    costs = {}
    with torch.inference_mode():
        for name, layer in zip(("fbgemm", "own"), pair):
            for _ in range(100):
                layer(x)
            started = time.perf_counter()
            for _ in range(repeats):
                layer(x)
            costs[name] = round((time.perf_counter() - started) / repeats * 1e6, 2)
    return costs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeats", type=int, default=25, help="calls per kernel, shape and M (decode)")
    args = parser.parse_args(argv)
    import torch

    from service.inference import int8kernel

    torch.set_num_threads(args.threads)
    line = {"bench": "kernel", "cpu": cpu_model(), "threads": args.threads, "vnni": int8kernel.unavailable() is None}
    if not line["vnni"]:
        print(json.dumps({**line, "own": None, "why": int8kernel.unavailable()}))
        return
    shapes, step = {}, {m: {"fbgemm": 0.0, "own": 0.0} for m in DECODE}
    for name, k, n, bias, per_step in SHAPES:
        pairs = layers(k, n, bias, max(1, COPIES_BYTES // (k * n)))
        rows = DECODE + (PREFILL if name != "head" else ())
        for m in rows:
            repeats = args.repeats if m <= 8 else max(3, args.repeats * 8 // m)
            fbgemm, own = timed(pairs, m, k, repeats)
            figures = {"fbgemm_ms": round(fbgemm * 1e3, 3), "own_ms": round(own * 1e3, 3),
                       "speedup": round(fbgemm / own, 2)}
            if m == 1:
                figures.update(fbgemm_gbps=round(k * n / fbgemm / 1e9, 1), own_gbps=round(k * n / own / 1e9, 1))
            if m in step:
                step[m]["fbgemm"] += per_step * fbgemm
                step[m]["own"] += per_step * own
            shapes[f"{name} {k}x{n} M={m}"] = figures
            print(f"{name} {k}x{n} M={m}: {figures}", flush=True, file=sys.stderr)
        del pairs
    line["step"] = {str(m): {"fbgemm_ms": round(t["fbgemm"] * 1e3, 1), "own_ms": round(t["own"] * 1e3, 1),
                             "speedup": round(t["fbgemm"] / t["own"], 2)} for m, t in step.items()}
    line["call_us"] = call_cost()
    line["shapes"] = shapes
    print(json.dumps(line))


if __name__ == "__main__":
    main()
