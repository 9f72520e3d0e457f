"""Numeric modes side by side: speed against the memory-bandwidth floor, load cost, and quality.

    python -m bench.modes [--preset tiny|vibethinker-1.5b | --model-dir PATH] [--steps 8] [--prefill 256]

Each mode (float32, bfloat16, bfloat16 with float32 prefill, int8 converted at
load, and int8 from a folder `vibethinker-admin model convert` wrote) loads in
its own process, so its peak RSS is its own. Prints one JSON line per mode:
- decode tokens/s at batch 1 and 4 through the engine's step loop, and the
  floor for batch 1: this run's measured memory read bandwidth over the bytes
  of weights one step reads, with the percentage reached;
- prefill tokens/s for one prompt of --prefill tokens;
- load seconds, peak RSS, and peak anonymous RSS (without the pages of the
  memory-mapped checkpoint, which the kernel can take back);
- quality against float32: top-1 next-token agreement over fixed prompts and
  positions (all, and where float32's top two logits are not near-tied), and
  how many greedy tokens match float32's before they first differ;
- and one line for the kernels alone: a batch-1 pass over 24 linear layers
  of the model's MLP shape in float32, bfloat16 and int8, the ceiling of
  what int8 can gain over float32 on this CPU.
The full-size preset (a random-weight model with VibeThinker-1.5B's shape,
built into var/bench-model on first use) takes several minutes.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.harness import cached_demo_model
from tests.support.servers import BIN, ROOT

MODES = {"float32": ("float32", "none", "off"), "bfloat16": ("bfloat16", "none", "off"),
         "bfloat16+float32-prefill": ("bfloat16", "none", "on"), "int8": ("float32", "int8", "off"),
         "int8-converted": ("float32", "int8", "off")}
CONVERTED = "int8-converted"  # loads the folder cached_int8_model wrote
PROMPTS = ["What is 17 * 23?", "Write a Python function that reverses a list.",
           "Prove that the square root of 2 is irrational.", "List three prime numbers above 100."]
NEAR_TIE = 0.05  # float32 logit gap between the top two below which either token is a fair answer


def bandwidth_gb_s(threads, gib=2):
    """Memory read bandwidth: the best of five sums over a buffer far larger than any cache."""
    import torch

    torch.set_num_threads(threads)
    data = torch.ones(gib * 2**28)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - started)
    return data.numel() * 4 / best / 1e9


def measure(model_dir, mode, steps, prefill, reference_file, threads):
    """Everything about one mode, in this process: a dict."""
    import torch

    from service.inference import model
    from service.inference.batching import Batch
    from service.inference.engine import Engine
    from service.inference.generation import Generation, GenerationRequest

    torch.set_num_threads(threads)
    dtype, quantization, prefill_float32 = MODES[mode]
    if mode == CONVERTED:
        model_dir = cached_int8_model(model_dir)
    anon = AnonymousPeak().start()
    started = time.monotonic()
    loaded = model.load(str(model_dir), dtype, quantization, prefill_float32)
    figures = {"mode": mode, "load_s": round(time.monotonic() - started, 2),
               "bytes_per_step": weight_bytes(loaded.model)}

    def requests_for(prompts, max_new_tokens):
        return [GenerationRequest(loaded.encode_chat([{"role": "user", "content": p}]), max_new_tokens,
                                  deadline=time.monotonic() + 36000) for p in prompts]

    def handles(prompts, max_new_tokens):
        return [Generation(request) for request in requests_for(prompts, max_new_tokens)]

    for batch in (1, 4):
        running = Batch(loaded)
        running.join(handles(PROMPTS[:batch], 10**6))
        running.step()
        started = time.perf_counter()
        for _ in range(steps):
            running.step()
        figures[f"decode_batch{batch}_tok_s"] = round(batch * steps / (time.perf_counter() - started), 2)
    long_prompt = handles([" ".join(["seven"] * prefill)], 1)
    started = time.perf_counter()
    Batch(loaded).join(long_prompt)
    figures["prefill_tokens"] = len(long_prompt[0].request.prompt_ids)
    figures["prefill_tok_s"] = round(figures["prefill_tokens"] / (time.perf_counter() - started), 1)

    engine = Engine(lambda: loaded, len(PROMPTS), threads, max_batch=len(PROMPTS)).start()
    while not engine.ready:
        time.sleep(0.01)
    greedy = [h.result().token_ids for h in [engine.submit(r) for r in requests_for(PROMPTS, steps * 2)]]
    engine.stop()
    figures.update(quality(loaded, greedy, reference_file))
    figures["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    figures["peak_anon_gib"] = round(anon.stop() / 2**30, 2)
    return figures


def int8_dir(model_dir):
    """Where this bench keeps the int8 conversion of `model_dir`: under var/, never beside the weights."""
    return ROOT / "var" / (model_dir.name + "-int8")


class AnonymousPeak:
    """The highest RssAnon of this process, sampled every 20 ms.

    Peak RSS also counts the pages of memory-mapped weight files, which are
    clean and which the kernel takes back under pressure; RssAnon is the
    memory a load really needs.
    """

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join()
        return self.peak

    def _sample(self):
        while True:
            status = Path("/proc/self/status").read_text()
            kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("RssAnon:"))
            self.peak = max(self.peak, kib * 1024)
            if self._stop.wait(0.02):
                return


def kernels(model_dir, threads, layers=24):
    """ms per batch-1 pass over `layers` linear layers of the model's MLP shape, per numeric type.

    The ceiling of int8's speed-up over float32 that the kernels alone allow,
    apart from everything else a decode step does.
    """
    import torch

    from service.inference import numerics

    torch.set_num_threads(threads)
    config = json.loads((model_dir / "config.json").read_text())
    shape = (config["hidden_size"], config["intermediate_size"])
    dense = [torch.nn.Linear(*shape, bias=False) for _ in range(layers)]
    int8 = []
    for layer in dense:
        layer.qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
        int8.append(numerics.Int8Linear.from_float(layer))
        int8[-1].full_range = numerics.cpu_has_vnni()  # as the service runs it
    bf16 = [torch.nn.Linear(*shape, bias=False, dtype=torch.bfloat16) for _ in range(layers)]
    kinds = {"float32": dense, "bfloat16": bf16, "int8": int8}
    figures = {}
    for name, stack in kinds.items():
        x = torch.randn(1, shape[0], dtype=torch.bfloat16 if name == "bfloat16" else torch.float32)
        with torch.inference_mode():
            for layer in stack:
                layer(x)
            started = time.perf_counter()
            for _ in range(10):
                for layer in stack:
                    layer(x)
        figures[f"{name}_ms"] = round((time.perf_counter() - started) / 10 * 1000, 2)
    return {"bench": "kernels", "shape": list(shape), "layers": layers, **figures,
            "int8_vs_float32": round(figures["float32_ms"] / figures["int8_ms"], 2)}


def cached_int8_model(model_dir):
    """The int8 folder of `model_dir`, converted by the real CLI on first use."""
    out = int8_dir(model_dir)
    if not out.is_dir():
        subprocess.run([str(BIN / "vibethinker-admin"), "model", "convert", str(model_dir), str(out),
                        "--quantization", "int8"], cwd=ROOT, check=True, capture_output=True)
    return out


def quality(loaded, greedy, reference_file):
    """Agreement with float32 (the reference file); the float32 run writes that file instead."""
    prompts = [loaded.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    if not reference_file.exists():  # this is the float32 run: record its greedy answers, top-1s and margins
        tops, margins = [], []
        for prompt, answer in zip(prompts, greedy):
            logits = next_token_logits(loaded, prompt + answer)[len(prompt) - 1:-1]
            best = logits.topk(2, dim=-1)
            tops.append(best.indices[:, 0].tolist())
            margins.append((best.values[:, 0] - best.values[:, 1]).tolist())
        reference_file.write_text(json.dumps({"greedy": greedy, "top1": tops, "margins": margins}))
        return {}
    reference = json.loads(reference_file.read_text())
    agree = clear = clear_agree = 0
    positions = 0
    for prompt, answer, tops, margins in zip(prompts, reference["greedy"], reference["top1"], reference["margins"]):
        ours = next_token_logits(loaded, prompt + answer)[len(prompt) - 1:-1].argmax(dim=-1).tolist()
        for mine, theirs, margin in zip(ours, tops, margins):
            positions += 1
            agree += mine == theirs
            if margin >= NEAR_TIE:
                clear += 1
                clear_agree += mine == theirs
    matched, tie_explains = [], []
    for mine, theirs, margins in zip(greedy, reference["greedy"], reference["margins"]):
        same = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
        matched.append(same)
        tie_explains.append(same >= min(len(mine), len(theirs)) or margins[same] < NEAR_TIE)
    return {"top1_agreement": round(agree / positions, 4),
            "top1_agreement_not_near_tied": round(clear_agree / max(clear, 1), 4),
            "positions": positions, "greedy_tokens": len(greedy[0]), "greedy_tokens_matching": matched,
            "greedy_differs_only_at_near_ties": all(tie_explains)}


def next_token_logits(loaded, ids):
    """Float32 logits at every position of `ids` (one forward, no cache)."""
    import torch

    with torch.inference_mode(), loaded.prefill_mode():
        return loaded.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny", choices=["tiny", "vibethinker-1.5b"])
    parser.add_argument("--steps", type=int, default=8, help="decode steps timed per batch size")
    parser.add_argument("--prefill", type=int, default=256, help="words in the prefill prompt")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--model-dir", type=Path, help="a model folder to measure instead of the preset "
                        "(the real weights: their quality check decides whether int8 may be the default)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure this mode, print its JSON
    parser.add_argument("--reference", help=argparse.SUPPRESS)
    args = parser.parse_args()
    threads = len(os.sched_getaffinity(0))
    model_dir = args.model_dir.resolve() if args.model_dir else cached_demo_model(args.preset)
    if args.one:
        print(json.dumps(measure(model_dir, args.one, args.steps, args.prefill, Path(args.reference), threads)))
        return
    results = []
    modes = ["float32"] + [m for m in args.modes.split(",") if m != "float32"]  # float32 first: the reference
    convert_s = None
    if CONVERTED in modes and not int8_dir(model_dir).is_dir():  # timed when this run converts
        started = time.monotonic()
        cached_int8_model(model_dir)
        convert_s = round(time.monotonic() - started, 1)
    with tempfile.TemporaryDirectory() as work:
        reference = Path(work) / "float32.json"
        for mode in modes:
            out = subprocess.run([sys.executable, "-m", "bench.modes", "--one", mode, "--reference", str(reference),
                                  "--steps", str(args.steps), "--prefill", str(args.prefill),
                                  "--model-dir", str(model_dir)], cwd=ROOT, check=True, capture_output=True,
                                 text=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    read_gb_s = bandwidth_gb_s(threads)  # after the modes: exec keeps a parent's peak RSS in the child's figure
    name = str(model_dir) if args.model_dir else args.preset
    print(json.dumps({"model": name, "threads": threads, **kernels(model_dir, threads)}))
    if convert_s is not None:
        next(r for r in results if r["mode"] == CONVERTED)["convert_s"] = convert_s
    base = results[0]
    for figures in results:
        floor = read_gb_s * 1e9 / figures["bytes_per_step"]
        print(json.dumps({"bench": "modes", "model": name, "threads": threads, **figures,
                          "read_gb_s": round(read_gb_s, 1), "floor_batch1_tok_s": round(floor, 2),
                          "batch1_pct_of_floor": round(100 * figures["decode_batch1_tok_s"] / floor, 1),
                          **{f"batch{b}_vs_float32": round(figures[f"decode_batch{b}_tok_s"]
                                                           / base[f"decode_batch{b}_tok_s"], 2) for b in (1, 4)}}))


def weight_bytes(model):
    """Bytes of weights one decode step reads: every weight once, except the embedding (one row), unless tied."""
    import torch

    from service.inference.int8kernel import OwnInt8Linear

    embedding = model.get_input_embeddings()
    head = getattr(model.get_output_embeddings(), "weight", None)
    total, seen = 0, set()
    for module in model.modules():
        if module is embedding and head is not embedding.weight:
            continue
        if isinstance(module, torch.ao.nn.quantized.dynamic.Linear):  # int8: the packed weight and its scales
            weight, bias = module._weight_bias()
            total += weight.numel() * weight.element_size() + weight.q_per_channel_scales().numel() * 8
            total += bias.numel() * bias.element_size() if bias is not None else 0
        if isinstance(module, OwnInt8Linear):  # the own kernel's int8 layer keeps its weight as buffers
            total += sum(buffer.numel() * buffer.element_size() for buffer in module.buffers(recurse=False))
        for param in module.parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                total += param.numel() * param.element_size()
    return total


if __name__ == "__main__":
    main()
