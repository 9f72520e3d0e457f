"""The model's numeric mode: dtype, int8 quantisation, and float32 prefill for bfloat16 weights.

Decode on a CPU streams every weight from memory once per step, so bytes per
weight set the speed. `int8` keeps the decoder's and the output head's linear
layers as int8 with one scale per output channel (torch's fbgemm dynamic
quantisation: activations are quantised on the fly with one scale per call,
so a row's output can shift slightly with the other rows in its batch; the
README has the measured trade-off). Conversion goes layer by layer from the
memory-mapped checkpoint, so the load never holds a float32 copy of the model.
On an AVX512-VNNI CPU the layers then move to the service's own kernel
(service.inference.int8kernel, setting int8_kernel), one layer at a time, so
fbgemm's packed copy of only one layer exists beside it.

fbgemm quantises activations to 7 bits by default, because its AVX2 kernel
sums pairs of 8-bit products in 16 bits and would saturate. On a CPU with
AVX512-VNNI the products are summed in 32 bits, so `Int8Linear` uses all 8
bits there: measured on the random-weight presets, top-1 agreement with
float32 rises from 77% to 94% (tiny) and from 52% to 70% (full size).

In bfloat16 mode on a CPU without bfloat16 units, prefill matmuls are much
faster in float32 (1000 tokens: 142 s against 21 s measured on AVX2), so
`float32_prefill` runs them that way: each weight is upcast for the call.
"""

import contextlib
import functools
import gc
import warnings
from pathlib import Path

import torch

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
VNNI_FLAGS = ("avx512_vnni",)  # fbgemm's 32-bit int8 accumulation (AVX-VNNI alone does not select it)
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo=CPUINFO):
    """The first CPU's feature flags, or an empty set when /proc/cpuinfo cannot be read."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    return frozenset(next((line.split(":", 1)[1].split() for line in text.splitlines()
                           if line.startswith("flags")), []))


def cpu_has_bf16(cpuinfo=CPUINFO):
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 or AMX)."""
    return any(flag in cpu_flags(cpuinfo) for flag in BF16_FLAGS)


def cpu_has_vnni(cpuinfo=CPUINFO):
    """Whether fbgemm can take 8-bit activations without saturating (AVX512-VNNI)."""
    return any(flag in cpu_flags(cpuinfo) for flag in VNNI_FLAGS)


class Int8Linear(torch.ao.nn.quantized.dynamic.Linear):
    """fbgemm's dynamic int8 linear layer, with 8-bit activations when `full_range` (a VNNI CPU)."""

    full_range = False

    def __init__(self, in_features, out_features, bias_=True, dtype=torch.qint8):
        # Packed with a 1x1 placeholder: from_float and artifact.load pack the real weight next, and packing a
        # full-size zero weight first cost as much (a converted folder loaded in 20 s with it, 14 s without).
        super().__init__(1, 1, bias_, dtype)
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x):
        y = torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params,
                                               reduce_range=not self.full_range)
        return y.to(x.dtype)


def wants_float32_prefill(setting, dtype):
    """Resolve the `prefill_float32` setting (auto, on, off) for a model loaded in `dtype`."""
    if dtype != "bfloat16" or setting == "off":
        return False
    return setting == "on" or not cpu_has_bf16()


def quantize_int8(model, kernel="fbgemm"):
    """Make the decoder layers' and the output head's linear layers int8, one layer at a time, for `kernel`
    (fbgemm, or own: service.inference.int8kernel).

    The embedding stays in the dtype it was loaded in (a lookup reads one row
    per token) and hands float32 to the layers.
    """
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    spec, mapping = {torch.nn.Linear: per_channel_dynamic_qconfig}, {torch.nn.Linear: Int8Linear}
    with warnings.catch_warnings():  # torch.ao's dynamic quantisation is marked deprecated; see the module doc
        warnings.simplefilter("ignore")
        for layer in model.model.layers:
            layer.float()  # only this layer is ever float32
            quantize_dynamic(layer, spec, mapping=mapping, inplace=True)
            if kernel == "own":  # one layer at a time: fbgemm's packed copy never exists for more than one
                own_int8(layer)
            gc.collect()  # the swapped-out float32 modules sit in reference cycles
        model.model.norm.float()
        model.model.rotary_emb.float()
        head = model.lm_head
        if isinstance(head, torch.nn.Linear):  # tied to the embedding: the head gets its own int8 copy
            full = torch.nn.Linear(head.in_features, head.out_features, bias=head.bias is not None)
            full.weight = torch.nn.Parameter(head.weight.detach().float(), requires_grad=False)
            if head.bias is not None:
                full.bias = torch.nn.Parameter(head.bias.detach().float(), requires_grad=False)
            model.lm_head = quantize_dynamic(torch.nn.Sequential(full), spec, mapping=mapping, inplace=True)[0]
            if kernel == "own":
                model.lm_head = own_int8(model.lm_head)
            del full
            gc.collect()
    return finish_int8(model)


def own_int8(module):
    """Replace `module`'s Int8Linear layers (or `module`, one itself) by the own kernel's, from the same int8
    weights; fbgemm's packed copies are dropped. Returns the module."""
    from service.inference.int8kernel import OwnInt8Linear

    if isinstance(module, Int8Linear):
        weight, bias = module._weight_bias()
        return OwnInt8Linear.from_quantized(weight, bias)
    for name, child in list(module.named_children()):
        module._modules[name] = own_int8(child)
    return module


def finish_int8(model):
    """Finish a model whose linears are int8 (Int8Linear or the own kernel's): 8-bit activations on a VNNI
    CPU, float32 embeddings."""
    full_range = cpu_has_vnni()
    for module in model.modules():
        if isinstance(module, Int8Linear):
            module.full_range = full_range
    model.model.embed_tokens.register_forward_hook(lambda module, args, output: output.float())
    model.config.dtype = torch.float32
    return model


@contextlib.contextmanager
def float32_matmuls(model):
    """Within the block, the model's bfloat16 linear layers compute in float32."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight.dtype == torch.bfloat16]
    for module in linears:
        module.forward = functools.partial(_float32_linear, module)
    try:
        yield
    finally:
        for module in linears:
            del module.forward


def _float32_linear(module, x):
    bias = None if module.bias is None else module.bias.float()
    return torch.nn.functional.linear(x.float(), module.weight.float(), bias).to(x.dtype)
