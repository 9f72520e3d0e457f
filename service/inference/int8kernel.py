"""The int8 mode's own kernel: an AVX512-VNNI linear layer in C (`_int8.c`), fbgemm's as the fallback.

Why: at batch 1 a decode step is almost all int8 linears, and fbgemm's
dynamic linear reads its weights at 21-24 GB/s of the ~29.7 GB/s this
machine kind reads. The kernel reads the weight once, in address order, for
up to four activation rows at a time (`_int8.c` says how).

When: setting `int8_kernel` (VIBE_INT8_KERNEL). `auto` takes the own kernel
where the extension was built and the CPU has AVX512-VNNI (AVX512 F, BW, VL
and VNNI, checked by the extension itself); else fbgemm. `own` where it
cannot run starts on fbgemm with a warning that says why, rather than refuse
to start: the answers are the int8 mode's either way, only the speed differs,
and /readyz (`int8_kernel`) shows which runs. AMX (Sapphire Rapids and later)
is not on the CPUs this was written on and is not used.

One copy of the weights: a layer is either fbgemm's (`numerics.Int8Linear`)
or this kernel's (`OwnInt8Linear`), never both, and the own kernel computes
prefill too (rows in chunks of 64, K in passes of 2 KiB). Keeping fbgemm's
packed copy beside it for prefill would cost the int8 weights again: 1.54 GB
at VibeThinker-1.5B's size.

Numerics: each activation row gets its own symmetric 8-bit scale (fbgemm:
one asymmetric scale per call), so a row's answer no longer depends on the
other rows of its batch; on the tiny model its logits are nearer float32's
than fbgemm's (tests/test_int8kernel.py has the figures). The int8 weights
and scales are the same either way, so a converted folder loads on both.

Threads: OpenMP, `torch.get_num_threads()` of them. The extension links
libgomp.so.1 and is imported after torch, whose wheel ships a libgomp.so.1:
the loader reuses the one already loaded (same soname), so the kernel and
torch share one OpenMP runtime and one team of threads, with no second pool
spinning against torch's on a 2-core machine.
"""

import logging

import torch

log = logging.getLogger("vibethinker.model")
KERNELS = ("auto", "own", "fbgemm")


def _extension():
    """The compiled kernel module, or None with the reason it cannot run here."""
    try:
        from service.inference import _int8  # after torch: its libgomp.so.1 is the one the kernel links
    except ImportError as exc:
        return None, f"the kernel was not built ({exc}); reinstall with a C compiler"
    if not _int8.vnni():
        return None, "this CPU lacks AVX512-VNNI"
    return _int8, None


def unavailable():
    """Why the own kernel cannot run here (a sentence), or None when it can."""
    return _extension()[1]


def choose(setting):
    """The kernel the `int8_kernel` setting means here: "own" or "fbgemm"; a fallback from "own" is logged."""
    if setting == "fbgemm":
        return "fbgemm"
    reason = unavailable()
    if reason is None:
        return "own"
    if setting == "own":
        log.warning("int8_kernel own is set but unavailable (%s): the int8 mode runs on fbgemm", reason)
    else:
        log.info("int8 mode on fbgemm: %s", reason)
    return "fbgemm"


def _pad4(vector, n):
    return torch.nn.functional.pad(vector, (0, n - vector.shape[0]))


class OwnInt8Linear(torch.nn.Module):
    """y = x @ (W * scales)^T + bias through the own kernel; W int8 [out, in], packed once."""

    def __init__(self, weight, scales, bias=None):
        super().__init__()
        self.kernel = _extension()[0]
        if self.kernel is None:
            raise RuntimeError(f"the own int8 kernel cannot run here: {unavailable()}")
        self.out_features, self.in_features = weight.shape
        n, k = -(-self.out_features // 4) * 4, -(-self.in_features // 64) * 64
        self.register_buffer("packed", pack(weight, n, k))
        self.register_buffer("scales", _pad4(scales.float(), n).contiguous())
        self.register_buffer("corr", _pad4(weight.sum(1, dtype=torch.int32) * 128, n).contiguous())
        zeros = torch.zeros(self.out_features)
        self.register_buffer("bias", _pad4(zeros if bias is None else bias.detach().float(), n).contiguous())
        self.has_bias = bias is not None
        self._pointers = (self.packed.data_ptr(), self.corr.data_ptr(), self.scales.data_ptr(),
                          self.bias.data_ptr())

    @classmethod
    def from_quantized(cls, weight, bias=None):
        """The layer of a per-channel symmetric qint8 tensor (fbgemm's, as Int8Linear._weight_bias gives it)."""
        if weight.q_per_channel_zero_points().any():
            raise ValueError("the own int8 kernel takes symmetric weights (zero points 0)")
        return cls(weight.int_repr(), weight.q_per_channel_scales(), bias)

    def forward(self, x):
        # about 3 us of Python and torch per call beside the kernel (bench/kernel.py: call_us); a step makes 197
        rows = x.float().reshape(-1, self.in_features)
        if not rows.is_contiguous():
            rows = rows.contiguous()
        out = torch.empty(x.shape[:-1] + (self.out_features,))
        packed, corr, scales, bias = self._pointers
        self.kernel.linear(rows.data_ptr(), out.data_ptr(), packed, corr, scales, bias, rows.shape[0],
                           self.out_features, self.in_features, torch.get_num_threads())
        return out if x.dtype == torch.float32 else out.to(x.dtype)

    def int8_weight(self):
        """(int8 weight [out, in], float scales [out], bias or None), as the layer was built from."""
        n, k = -(-self.out_features // 4) * 4, -(-self.in_features // 64) * 64
        weight = unpack(self.packed, n, k)[:self.out_features, :self.in_features]
        bias = self.bias[:self.out_features] if self.has_bias else None
        return weight.contiguous(), self.scales[:self.out_features], bias

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.has_bias}"


PASS = 2048  # bytes of K per pass of the kernel (KP in _int8.c)


def pack(weight, n, k):
    """W [out, in] in the order the kernel reads it, zeros padding it to [n, k]: K in passes of PASS bytes;
    within a pass, blocks of four rows, each row's 64-byte slices interleaved."""
    padded = torch.nn.functional.pad(weight, (0, k - weight.shape[1], 0, n - weight.shape[0]))
    blocks = padded.view(n // 4, 4, k // 64, 64).transpose(1, 2)  # [block, slice, row, byte]
    # a new tensor: torch's CPU allocator aligns every one to 64 bytes (the kernel checks)
    return torch.cat([part.reshape(-1) for part in blocks.split(PASS // 64, dim=1)])


def unpack(packed, n, k):
    """The padded [n, k] weight that pack() packed."""
    parts, start = [], 0
    for k0 in range(0, k, PASS):
        width = min(PASS, k - k0)
        parts.append(packed[start:start + n * width].view(n // 4, width // 64, 4, 64))
        start += n * width
    return torch.cat(parts, dim=1).transpose(1, 2).reshape(n, k)
