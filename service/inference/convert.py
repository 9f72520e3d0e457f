"""Writing a pre-converted int8 model folder: `vibethinker-admin model convert IN OUT --quantization int8`.

It loads the source through service.inference.model (converting each linear
layer as the int8 mode does at load), then writes what service.inference.artifact
reads back: every file of the source but its weights, a marker, and
`model.int8.safetensors`. The folder is written beside its place and renamed
in, so it appears whole or not at all. The marker records the source's files
(names, sizes, modification times), so converting again does nothing until the
source changes: Ansible runs it on every deploy.
"""

import json
import os
import shutil
import stat
from pathlib import Path

from safetensors.torch import save_file

import torch

from service.inference import artifact, model, numerics
from service.inference.int8kernel import OwnInt8Linear

# The source's weight files: every other file of its folder is copied as it is.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


def convert(source, out, quantization="int8"):
    """Make `out` hold `source` converted to `quantization`; return True if it wrote it, False if up to date.

    `out` is written beside itself and renamed into place, so it appears whole
    or not at all. A folder converted from the source's current files is left
    as it is; a stale one is replaced; any other existing folder is refused.
    """
    source, out = Path(source), Path(out)
    if quantization != "int8":
        raise artifact.ConvertError(f"unknown quantization {quantization!r}; the one offered is int8")
    if not (source / "config.json").is_file():
        raise artifact.ConvertError(f"{source} is not a model folder (no config.json)")
    already = artifact.quantization_of(source)
    if already:
        raise artifact.ConvertError(f"{source} is already converted ({already})")
    meta = {"format": artifact.FORMAT, "quantization": quantization, "source": str(source.resolve()),
            "source_files": _fingerprint(source)}
    if out.exists():
        if not (out / artifact.MARKER).is_file():
            raise artifact.ConvertError(f"{out} exists and is not a converted model folder; choose a new folder")
        if json.loads((out / artifact.MARKER).read_text()) == meta:
            return False
    loaded = model.load(str(source), quantization=quantization)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        save_file(_tensors(loaded.model), partial / artifact.WEIGHTS, metadata={"format": str(artifact.FORMAT)})
        for path in source.iterdir():
            if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES):
                shutil.copy2(path, partial / path.name)
        (partial / artifact.MARKER).write_text(json.dumps(meta) + "\n")
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


def _tensors(network):
    """Name -> tensor of everything the int8 model holds."""
    tensors = {}
    for name, module in network.named_modules():
        if isinstance(module, numerics.Int8Linear):
            weight, bias = module._weight_bias()
            tensors[f"{name}.weight"] = weight.int_repr().contiguous()
            tensors[f"{name}.weight_scales"] = weight.q_per_channel_scales().contiguous()
            tensors[f"{name}.weight_zero_points"] = weight.q_per_channel_zero_points().contiguous()
        elif isinstance(module, OwnInt8Linear):  # the same file, whichever kernel converted it
            int8, scales, bias = module.int8_weight()
            tensors[f"{name}.weight"] = int8
            tensors[f"{name}.weight_scales"] = scales.double()
            tensors[f"{name}.weight_zero_points"] = torch.zeros(len(scales), dtype=torch.int64)
        else:
            continue
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach().contiguous()
    for name, param in network.named_parameters():
        tensors[name] = param.detach().contiguous()
    return tensors
