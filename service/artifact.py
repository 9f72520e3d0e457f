"""A pre-converted int8 model folder: `vibethinker-admin model convert IN OUT --quantization int8`.

Converting at every start costs the int8 mode about 35 s at full size. The
folder `convert` writes holds every file of the source but its weights
(config, tokenizer, chat template), a marker, and `model.int8.safetensors`:
each int8 linear layer as its int8 weight, per-channel scales and zero points
and its bias; every other parameter as it was. `load` builds the model's
skeleton on the meta device (no memory, no random init) and fills it from
that file, so the load holds nothing but the final weights.

The marker makes the folder self-describing: `service.model.load` sees it and
refuses a setting that asks for another mode, rather than guess. It also
records the source's files (names, sizes and modification times), so
converting again does nothing until the source changes: Ansible runs it on
every deploy.
"""

import gc
import json
import os
import shutil
import stat
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from service import numerics

MARKER = "vibethinker-quantized.json"
WEIGHTS = "model.int8.safetensors"
FORMAT = 1
# The source's weight files: every other file of its folder is copied as it is.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


class ConvertError(Exception):
    """The conversion cannot start or the folder cannot be loaded; the message says why."""


def quantization_of(path):
    """The quantisation a model folder was converted to ("int8"), or None for a plain checkpoint."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        return None
    return json.loads(marker.read_text())["quantization"]


def convert(source, out, quantization="int8"):
    """Make `out` hold `source` converted to `quantization`; return True if it wrote it, False if up to date.

    `out` is written beside itself and renamed into place, so it appears whole
    or not at all. A folder converted from the source's current files is left
    as it is; a stale one is replaced; any other existing folder is refused.
    """
    from service import model

    source, out = Path(source), Path(out)
    if quantization != "int8":
        raise ConvertError(f"unknown quantization {quantization!r}; the one offered is int8")
    if not (source / "config.json").is_file():
        raise ConvertError(f"{source} is not a model folder (no config.json)")
    already = quantization_of(source)
    if already:
        raise ConvertError(f"{source} is already converted ({already})")
    meta = {"format": FORMAT, "quantization": quantization, "source": str(source.resolve()),
            "source_files": _fingerprint(source)}
    if out.exists():
        if not (out / MARKER).is_file():
            raise ConvertError(f"{out} exists and is not a converted model folder; choose a new folder")
        if json.loads((out / MARKER).read_text()) == meta:
            return False
    loaded = model.load(str(source), quantization=quantization)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        save_file(_tensors(loaded.model), partial / WEIGHTS, metadata={"format": str(FORMAT)})
        for path in source.iterdir():
            if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES):
                shutil.copy2(path, partial / path.name)
        (partial / MARKER).write_text(json.dumps(meta) + "\n")
        _readable_as(source, partial)
        if out.exists():  # stale: moved aside, then removed once the new one is in place
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
            os.rename(partial, out)
            shutil.rmtree(old)
        else:
            os.rename(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return True


def _readable_as(source, folder):
    """Give `folder` its source's permissions: safetensors writes 0600, and the service may be another user."""
    file_mode = stat.S_IMODE((source / "config.json").stat().st_mode)
    for path in folder.iterdir():
        os.chmod(path, file_mode)
    os.chmod(folder, stat.S_IMODE(source.stat().st_mode))


def _fingerprint(source):
    """Name -> [size, mtime in ns] of every file of the source folder (a copy of new files changes them)."""
    files = sorted(path for path in source.iterdir() if path.is_file())
    return {path.name: [path.stat().st_size, path.stat().st_mtime_ns] for path in files}


def _tensors(model):
    """Name -> tensor of everything the int8 model holds."""
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, numerics.Int8Linear):
            weight, bias = module._weight_bias()
            tensors[f"{name}.weight"] = weight.int_repr().contiguous()
            tensors[f"{name}.weight_scales"] = weight.q_per_channel_scales().contiguous()
            tensors[f"{name}.weight_zero_points"] = weight.q_per_channel_zero_points().contiguous()
            if bias is not None:
                tensors[f"{name}.bias"] = bias.detach().contiguous()
    for name, param in model.named_parameters():
        tensors[name] = param.detach().contiguous()
    return tensors


def load(path):
    """The int8 model of a converted folder, ready for inference (as numerics.quantize_int8 leaves it)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    path = Path(path)
    meta = json.loads((path / MARKER).read_text())
    if meta.get("format") != FORMAT:
        raise ConvertError(f"{path} has int8 format {meta.get('format')}; this service reads {FORMAT}: "
                           "convert the model again")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with safe_open(path / WEIGHTS, framework="pt") as weights:
        names = set(weights.keys())
        for name in sorted(n[:-len(".weight_scales")] for n in names if n.endswith(".weight_scales")):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, _int8_linear(weights, name, names))
        for name, _ in list(model.named_parameters()):
            if name not in names:
                raise ConvertError(f"{path / WEIGHTS} lacks {name}; convert the model again")
            parent, _, leaf = name.rpartition(".")
            model.get_submodule(parent)._parameters[leaf] = torch.nn.Parameter(weights.get_tensor(name),
                                                                               requires_grad=False)
    rotary = model.model.rotary_emb  # its buffers are computed from the config, not stored
    model.model.rotary_emb = type(rotary)(config=model.config)
    left = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if left:
        raise ConvertError(f"{path / WEIGHTS} does not fill {left[0]}; convert the model again")
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path, local_files_only=True)
    model.eval()
    gc.collect()
    return numerics.finish_int8(model)


def _int8_linear(weights, name, names):
    """The Int8Linear stored under `name`; packing its weight for fbgemm is most of a load's time."""
    int8 = weights.get_tensor(f"{name}.weight")
    qweight = torch._make_per_channel_quantized_tensor(
        int8, weights.get_tensor(f"{name}.weight_scales"), weights.get_tensor(f"{name}.weight_zero_points"), 0)
    bias = weights.get_tensor(f"{name}.bias") if f"{name}.bias" in names else None
    module = numerics.Int8Linear(int8.shape[1], int8.shape[0], bias_=bias is not None)
    module.set_weight_bias(qweight, bias)
    return module
