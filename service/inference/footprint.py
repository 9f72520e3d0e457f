"""Whether the served models' weights fit the memory the service may use, decided before any is loaded,
and how much of the rest each model's KV cache may take.

Weights are counted from the safetensors headers (shapes and dtypes, no
tensor read), at the width each model will hold them in: 4 bytes a
parameter in float32, 2 in bfloat16, 1 for each linear weight in int8 (the
rest as stored). The ceiling is the `memory_limit_bytes` setting, else the
service's cgroup limit (systemd's MemoryMax), else the machine's memory.
This module imports no torch: gunicorn's master runs it.
"""

import json
import struct
from pathlib import Path

from service.settings import CACHE_SHARE, WEIGHTS_SHARE, SettingsError

WIDTHS = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
          "F8_E4M3": 1, "F8_E5M2": 1}
TARGET = {"float32": 4, "bfloat16": 2}
INT8_LINEAR = ("proj.weight", "lm_head.weight")  # the layers numerics.quantize_int8 turns into int8
CONVERTED = "vibethinker-quantized.json"  # service.inference.artifact.MARKER (that module imports torch)
MAX_HEADER = 100 * 1024 * 1024


def tensors(path):
    """(name, dtype, element count) of every tensor in the safetensors files of a model folder."""
    for file in sorted(Path(path).glob("*.safetensors")):
        with open(file, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            if size > MAX_HEADER:
                raise SettingsError(f"{file}: not a safetensors file (header of {size} bytes)")
            header = json.loads(handle.read(size))
        for name, info in header.items():
            if name != "__metadata__":
                count = 1
                for dim in info["shape"]:
                    count *= dim
                yield name, info["dtype"], count


def weight_bytes(spec):
    """Bytes the weights of `spec` (a settings.ModelSpec, dtype and quantization filled in) take loaded."""
    folder = Path(spec.path)
    converted = (folder / CONVERTED).is_file()
    total, embedding, head = 0, 0, False
    for name, dtype, count in tensors(folder):
        stored = WIDTHS.get(dtype, 4)
        if converted:
            total += count * stored
        elif spec.quantization == "int8":
            total += count * (1 if name.endswith(INT8_LINEAR) else stored)
        else:
            total += count * TARGET[spec.dtype]
        embedding = count if name.endswith("embed_tokens.weight") else embedding
        head = head or name.endswith("lm_head.weight")
    if spec.quantization == "int8" and not converted and not head:
        total += embedding  # tied embeddings: the int8 output head is a copy of its own
    return total


def ceiling(setting=None, proc=Path("/proc"), cgroup_root=Path("/sys/fs/cgroup")):
    """(bytes the service may use, where that figure comes from)."""
    if setting:
        return setting, "memory_limit_bytes"
    limit = _cgroup_limit(proc, cgroup_root)
    if limit is not None:
        return limit, "the service's cgroup memory.max"
    for line in (proc / "meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024, "the machine's memory (MemTotal)"
    raise SettingsError("cannot tell the machine's memory; set memory_limit_bytes")


def _cgroup_limit(proc, cgroup_root):
    """The smallest memory.max on the path from this process's cgroup (v2) to the root, or None."""
    try:
        line = next(entry for entry in (proc / "self/cgroup").read_text().splitlines() if entry.startswith("0::"))
    except (OSError, StopIteration):
        return None
    limits, group = [], cgroup_root / line[3:].strip().lstrip("/")
    while True:
        try:
            value = (group / "memory.max").read_text().strip()
            if value != "max":
                limits.append(int(value))
        except (OSError, ValueError):
            pass
        if group == cgroup_root or cgroup_root not in group.parents:
            break
        group = group.parent
    return min(limits) if limits else None


def check(specs, setting=None):
    """{model name: weight bytes}; SettingsError, saying what each model takes, if they do not fit."""
    sizes = {spec.name: weight_bytes(spec) for spec in specs}
    limit, source = ceiling(setting)
    allowed = int(limit * WEIGHTS_SHARE)
    if sum(sizes.values()) > allowed:
        each = ", ".join(f"{name} {size / 2**30:.2f} GiB" for name, size in sizes.items())
        raise SettingsError(f"the models' weights ({each}; {sum(sizes.values()) / 2**30:.2f} GiB in all) do not "
                            f"fit in {WEIGHTS_SHARE:.0%} of {limit / 2**30:.2f} GiB ({source}): serve fewer or "
                            "smaller models (int8 takes half of bfloat16), or give the service more memory "
                            "(memory_limit_bytes, MemoryMax)")
    return sizes


def cache_bounds(sizes, setting=None, limit_setting=None):
    """{model name: bytes its KV cache may reserve}: the `kv_cache_bytes` setting, else CACHE_SHARE of the
    memory ceiling less the weights (`sizes`, from `check`), shared equally."""
    if setting:
        return dict.fromkeys(sizes, setting)
    limit, _ = ceiling(limit_setting)
    room = max(0, int(limit * CACHE_SHARE) - sum(sizes.values()))
    return dict.fromkeys(sizes, room // max(1, len(sizes)))
