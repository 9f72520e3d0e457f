"""Reading a pre-converted int8 model folder (service.inference.convert writes it).

Converting at every start costs the int8 mode about 35 s at full size. The
folder `convert` writes holds every file of the source but its weights
(config, tokenizer, chat template), a marker, and `model.int8.safetensors`:
each int8 linear layer as its int8 weight, per-channel scales and zero points
and its bias; every other parameter as it was. `load` builds the model's
skeleton on the meta device (no memory, no random init) and fills it from
that file, so the load holds nothing but the final weights.

The marker makes the folder self-describing: `service.inference.model.load` sees it and
refuses a setting that asks for another mode, rather than guess.
"""

import gc
import json
from pathlib import Path

import torch
from safetensors import safe_open

from service.inference import numerics

MARKER = "vibethinker-quantized.json"
WEIGHTS = "model.int8.safetensors"
FORMAT = 1


class ConvertError(Exception):
    """The conversion cannot start or the folder cannot be loaded; the message says why."""


def quantization_of(path):
    """The quantisation a model folder was converted to ("int8"), or None for a plain checkpoint."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        return None
    return json.loads(marker.read_text())["quantization"]


def load(path, kernel="fbgemm"):
    """The int8 model of a converted folder, ready for inference on `kernel` (fbgemm or own), as
    numerics.quantize_int8 leaves it."""
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
            setattr(model.get_submodule(parent), leaf, _int8_linear(weights, name, names, kernel))
        for name, _ in list(model.named_parameters()):
            if name not in names:
                raise ConvertError(f"{path / WEIGHTS} lacks {name}; convert the model again")
            parent, _, leaf = name.rpartition(".")
            # a copy: a view would keep the whole file mapped, and its pages resident, for the process's life
            model.get_submodule(parent)._parameters[leaf] = torch.nn.Parameter(weights.get_tensor(name).clone(),
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


def _int8_linear(weights, name, names, kernel):
    """The int8 layer stored under `name`; packing its weight for fbgemm is most of a load's time (the own
    kernel's packing is a copy)."""
    int8 = weights.get_tensor(f"{name}.weight")
    scales, zero_points = weights.get_tensor(f"{name}.weight_scales"), weights.get_tensor(f"{name}.weight_zero_points")
    bias = weights.get_tensor(f"{name}.bias").clone() if f"{name}.bias" in names else None  # no view kept
    if kernel == "own":
        from service.inference.int8kernel import OwnInt8Linear

        if zero_points.any():
            raise ConvertError(f"{name} has non-zero zero points: convert the model again")
        return OwnInt8Linear(int8, scales, bias)
    qweight = torch._make_per_channel_quantized_tensor(int8, scales, zero_points, 0)
    module = numerics.Int8Linear(int8.shape[1], int8.shape[0], bias_=bias is not None)
    module.set_weight_bias(qweight, bias)
    return module
