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
packed copy beside it for prefill would cost the int8 weights again, 1.54 GB
at VibeThinker-1.5B's size, for nothing: the own kernel measured as fast at
prefill sizes (below).

Measured (`python -m bench.kernel`, 2 threads, an idle 2-core "AMD EPYC"
(Zen 4, KVM) that reads 29.7 GB/s; two runs; fbgemm's time over own's):
- one decode step's linears (28 layers and the head, from the medians per
  shape): M = 1: 72 -> 67-69 ms (1.05-1.07x); M = 2: 1.14-1.15x;
  M = 4: 1.04-1.07x; M = 8: 0.86-1.02x.
- per shape at M = 1: q/o 1.08-1.24x (19-25 GB/s against fbgemm's 17-21),
  k/v 1.45-1.5x, gate/up 1.03x, down 1.0-1.1x, head 1.02-1.03x (28-31 GB/s,
  both near the floor). Prefill rows (M = 64, 256, 2048): 0.95-1.36x.
- one call on a 64 x 4 layer: 6.5 us against fbgemm's 22-25 us; a step
  makes 197 calls. (A CPython function with METH_FASTCALL: the call itself is
  under 1 us; ctypes measured 0.3-0.6 us for a 3-pointer call before any
  argument conversion, and would need the library's path found by hand.)
- the whole model from a converted folder (random weights, `generate`):
  batch 1 11.4-12.4 -> 12.1-16.2 tok/s, batch 4 41-50 -> 51-55, prefill of
  512 tokens 141-164 -> 148-181 (noisy: within one another), load 10-11.5 s
  -> 3.4-4.3 s (no fbgemm packing), peak RSS 4.1-4.3 GiB both (one own run
  5.2: the mapped file's pages count while a load reads it).
- software prefetch of W 4 KiB ahead when a block serves several row groups:
  12-22% at M = 8 and 64 (none at M <= 4, where it is off).

Numerics: each activation row gets its own symmetric 8-bit scale (fbgemm:
one asymmetric scale per call), so a row's answer no longer depends on the
other rows of its batch; on the tiny model its logits are nearer float32's
than fbgemm's (tests/test_int8kernel.py has the figures). The int8 weights
and scales are the same either way, so a converted folder loads on both.

Threads: OpenMP, `torch.get_num_threads()` of them (a step's linears at
M = 1: 67-69 ms on two threads, 83 ms on one), one for a layer under
256 KiB of weight (waking the second thread cost more than such a layer:
a 64 x 4 layer took 52-64 us a call on two threads of a busy machine, 7 on
one). The extension links libgomp.so.1 and is imported after torch, whose
wheel ships its own libgomp.so.1: the loader reuses the one already loaded
(same soname; tests/test_int8kernel.py checks that one is mapped), so the
kernel and torch share one OpenMP runtime and the engine thread's one team
of threads, rather than two pools spinning against each other on two cores.
A pool of our own (pthreads) would be that second pool.
"""

import logging

import torch

log = logging.getLogger("vibethinker.model")


def _extension():
    """The compiled kernel module, or None with the reason it cannot run here."""
    try:
        from service.inference import _int8  # after torch: its libgomp.so.1 is the one the kernel links
    except ImportError as exc:
        return None, f"the kernel was not built ({exc}); reinstall with a C compiler"
    if not _int8.vnni():
        return None, "this CPU lacks AVX512-VNNI"
    if _int8.KP != PASS:  # a stale build beside newer Python: it would read the weights in another order
        return None, f"the kernel was built for passes of {_int8.KP} bytes, not {PASS}; reinstall"
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
        out = torch.empty(x.shape[:-1] + (self.out_features,), dtype=torch.float32)  # whatever the default dtype
        if not rows.shape[0]:  # no rows (a prefill pass whose prompts all go on: no logits kept)
            return out if x.dtype == torch.float32 else out.to(x.dtype)
        scales, bias = self.scales, self.bias  # read each call: a module's buffers may be replaced (.to(), ...)
        if scales.dtype != torch.float32 or bias.dtype != torch.float32:
            raise TypeError("the own int8 kernel's scales and bias must stay float32 (the layer was converted)")
        self.kernel.linear(rows.data_ptr(), out.data_ptr(), self.packed.data_ptr(), self.corr.data_ptr(),
                           scales.data_ptr(), bias.data_ptr(), rows.shape[0], self.out_features,
                           self.in_features, torch.get_num_threads())
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
