"""llama.cpp as the anchor on the same weights: built from source once, the model converted to GGUF.

    python -m bench.llamacpp [--model-dir var/bench-model]   # build, convert, quantise; print the paths

llama.cpp is the copy vendored in llama-cpp-python's source package (pinned
below; `pip download` fetches it from PyPI). Two builds are cached under
var/llama: `build-amx` (native flags, AMX on: its fast batch-1 path, which
crashes on any multi-token matmul on this CPU, llama.cpp issue 20824) and
`build-noamx` (AVX-512 with VNNI and BF16, no AMX: prefill and batches).
The model is converted with llama.cpp's own convert_hf_to_gguf.py; the
random-weight demo model's tokenizer is locally trained, so its pre-tokenizer
hash is not one llama.cpp knows: the conversion is told it is Qwen2's.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.servers import ROOT

VERSION = "0.3.36"
HOME = ROOT / "var" / "llama"
SOURCE = HOME / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
BUILDS = {
    "amx": (["-DGGML_NATIVE=ON"], ["llama-bench", "llama-quantize"]),
    "noamx": (["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
               "-DGGML_AVX512=ON", "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_BF16=ON"],
              ["llama-bench", "llama-batched-bench"]),
}


def source():
    """The vendored llama.cpp, downloaded and unpacked on first use."""
    if not (SOURCE / "CMakeLists.txt").is_file():
        HOME.mkdir(parents=True, exist_ok=True)
        archive = HOME / f"llama_cpp_python-{VERSION}.tar.gz"
        if not archive.is_file():
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                            f"llama-cpp-python=={VERSION}", "-d", str(HOME)], check=True)
        shutil.unpack_archive(archive, HOME)
    return SOURCE


def binary(build, name):
    """Path of a llama.cpp program of `build` (amx or noamx), built on first use (minutes)."""
    out = HOME / f"build-{build}"
    path = out / "bin" / name
    if not path.is_file():
        flags, targets = BUILDS[build]
        _run(["cmake", "-S", str(source()), "-B", str(out), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
              "-DBUILD_SHARED_LIBS=OFF", *flags])
        _run(["cmake", "--build", str(out), f"-j{len(os.sched_getaffinity(0))}", "--target", *targets])
    return path


CONVERT = """
import sys
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[1:]]
from conversion import base, qwen
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"  # a locally trained tokenizer
qwen.Qwen2Model.set_vocab = lambda self: self._set_vocab_gpt2()  # byte-level BPE, no sentencepiece
import convert_hf_to_gguf
convert_hf_to_gguf.main()
"""


def gguf(model_dir, kind):
    """The model as GGUF: kind bf16 (converted) or a quantisation such as q8_0 (from the bf16 file)."""
    out = HOME / f"{Path(model_dir).name}-{kind}.gguf"
    if out.is_file():
        return out
    if kind == "bf16":
        env = {**os.environ, "PYTHONPATH": f"{SOURCE}:{SOURCE / 'gguf-py'}"}
        partial = out.with_suffix(".partial")
        _run([sys.executable, "-c", CONVERT, str(model_dir), "--outtype", "bf16", "--outfile", str(partial)],
             env=env, cwd=SOURCE)
    else:
        partial = out.with_suffix(".partial")
        _run([str(binary("amx", "llama-quantize")), str(gguf(model_dir, "bf16")), str(partial), kind.upper()])
    partial.rename(out)
    return out


def _run(argv, **kwargs):
    """Run a step quietly; on a failure, its output's tail is the error."""
    done = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    if done.returncode:
        raise RuntimeError(f"{Path(argv[0]).name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done


def decode_batch1(model, build, threads, tokens=64):
    """llama-bench's batch-1 decode tokens/s (no prompt), as it reports it."""
    out = _run([str(binary(build, "llama-bench")), "-m", str(model), "-p", "0", "-n", str(tokens),
                "-t", str(threads), "-r", "2", "-o", "json"])
    return round(json.loads(out.stdout)[0]["avg_ts"], 2)


def decode_at_depth(model, build, threads, depth, tokens=32):
    """llama-bench's batch-1 decode tokens/s with `depth` tokens already in its context (-d)."""
    out = _run([str(binary(build, "llama-bench")), "-m", str(model), "-p", "0", "-n", str(tokens),
                "-d", str(depth), "-t", str(threads), "-r", "1", "-o", "json"])
    return round(json.loads(out.stdout)[0]["avg_ts"], 2)


def batched(model, threads, sequences=16, prompt=128, tokens=32):
    """llama-batched-bench (no-AMX build) with `sequences` sequences: aggregate decode and prefill tokens/s."""
    out = _run([str(binary("noamx", "llama-batched-bench")), "-m", str(model), "-c",
                str(sequences * (prompt + tokens) + 64), "-b", "2048", "-ub", "512", "-npp", str(prompt),
                "-ntg", str(tokens), "-npl", str(sequences), "-t", str(threads), "--output-format", "jsonl"])
    row = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
    return {"decode_tok_s": round(row["speed_tg"], 2), "prefill_tok_s": round(row["speed_pp"], 2)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=ROOT / "var" / "bench-model")
    args = parser.parse_args()
    paths = {name: str(binary(build, name)) for build, (_, targets) in BUILDS.items() for name in targets}
    paths.update({kind: str(gguf(args.model_dir, kind)) for kind in ("bf16", "q8_0")})
    print(json.dumps(paths))


if __name__ == "__main__":
    main()
