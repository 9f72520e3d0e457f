"""Load time, memory and batch-1 decode speed at VibeThinker-1.5B's real size.

    python bench/load_and_decode.py [--model DIR] [--dtypes bfloat16,float32] [--tokens 16]

Builds the random-weight `vibethinker-1.5b` preset once (cached in
var/bench-model), then, for each dtype, loads it in a fresh process through
the service's own loader and prints one JSON line with: load seconds, peak and
steady RSS next to the weights' size on disk, the first request's time (which
pays the page-in of memory-mapped weights) and steady decode tokens/s.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def measure(model_dir, dtype, tokens, threads):
    """Run in a child process: load, decode, report figures as a dict."""
    import resource

    import psutil
    import torch

    from service import model

    torch.set_num_threads(threads)
    started = time.monotonic()
    loaded = model.load(model_dir, dtype)
    load_s = time.monotonic() - started
    peak_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ids = torch.tensor([loaded.encode_chat(model.chat_messages("What is 12 * 34? Explain.", "Be brief."))])

    def decode(n):
        t0 = time.monotonic()
        with torch.inference_mode():
            loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=n, min_new_tokens=n, pad_token_id=loaded.pad_id)
        return time.monotonic() - t0

    first_s = decode(2)
    one = decode(1)  # prefill + one token, to subtract from the timed run
    full = decode(tokens + 1)
    weights = sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))
    return {
        "dtype": dtype, "threads": threads, "weights_bytes": weights,
        "load_s": round(load_s, 2),
        "peak_rss_load_bytes": peak_load,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "steady_rss_bytes": psutil.Process().memory_info().rss,
        "peak_over_weights": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / weights, 2),
        "first_request_s": round(first_s, 2),
        "prompt_tokens": ids.shape[1],
        "decode_tok_s": round(tokens / (full - one), 2),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=str(ROOT / "var" / "bench-model"))
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.model, args.child, args.tokens, args.threads)))
        return
    model_dir = Path(args.model)
    build_s = None
    if not (model_dir / "config.json").is_file():
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "service.demo_model", str(model_dir), "--preset", "vibethinker-1.5b"],
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        build_s = round(time.monotonic() - started, 1)
    modes = []
    for dtype in args.dtypes.split(","):
        out = subprocess.run([sys.executable, __file__, "--model", str(model_dir), "--child", dtype,
                              "--tokens", str(args.tokens), "--threads", str(args.threads)],
                             cwd=ROOT, check=True, capture_output=True, text=True)
        modes.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(json.dumps({"bench": "load_and_decode", "preset": "vibethinker-1.5b", "build_s": build_s, "modes": modes}))


if __name__ == "__main__":
    main()
