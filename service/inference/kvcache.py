"""The KV cache: a slab of its own for each row, written in place, read by that row's attention alone.

A row's slab holds its keys and values for every layer, with room for its
prompt and its `max_new_tokens` (`RowCache`). It is allocated once, when the
row is admitted, and never copied: each forward pass writes the new tokens'
keys and values at the row's length, and attention reads the row's slab up
to there. Rows join and leave without touching each other's storage, and a
row 30,000 tokens deep costs the others nothing: no padding is shared.

A forward pass carries several rows' tokens packed into one sequence (a
`Pass`: decode rows one token each, a prefill chunk several), so the
model's weights are read once for all of them. The pass is handed to the
model as its cache (transformers calls `update` in every layer) and as its
attention mask (the attention function registered here, `ATTENTION`, reads
it); anything else (a plain `generate`) goes through transformers' own SDPA.

The cache is stored in bfloat16 (`kv_dtype` auto, for the bfloat16 and int8
modes: half of float32's bytes read per step) or float32 (the float32 mode's
auto: that mode is the exact reference). A decode step's attention reads a
long row's slab in place, with two matrix products per key/value head in the
cache's dtype (torch has no bfloat16 product with a float32 result on a CPU, so
the scores are rounded to bfloat16 before a float32 softmax, as a bfloat16
model's own attention rounds them); rows with short caches (`SHORT`) attend
together in float32, their caches copied into one batch (cheap at that
length, and a few operations instead of a dozen per row); a prefill chunk's
attention runs in float32 through SDPA with its causal mask.

Memory is reserved when a row is admitted (service.inference.kvmemory), for
the most the row can ever hold, so a running answer never runs out of it;
the slab's pages are only committed as they are written.
"""

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

ATTENTION = "vibe_rows"
# A decode step's attention reads a row's cache in whole buckets of this many tokens (the part past the row's
# length zeroed, and masked): matrix products of a shape seen before reuse oneDNN's compiled kernel, where a
# new length every step made it compile one per call (measured: 1.86 ms against 0.10 ms a bfloat16 product).
BUCKET = 256
# Decode rows whose cache holds at most this many tokens attend together, their caches copied into one float32
# batch (a handful of operations a layer for all of them): per row, a short cache's attention costs more in
# operations than in bytes (at 8 rows of 256 tokens, 45 ms a step against about 10 together, measured).
SHORT = 512
# A piece of at most this many tokens (a prompt's, or a decode row's token and its drafts) over a deep row's
# bfloat16 cache attends reading the slab in place (`_piece_attention`); a longer one through SDPA in float32. Measured at 3,000 tokens deep (12 heads of 128,
# 2 threads): 16 tokens 1.2 ms a layer against SDPA's 4.3; from about 24 tokens SDPA's kernel is as fast or
# faster (32: 5.8 against 4.2; 64: 12.5 against 8.8).
PIECE = 16
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def cache_dtype(setting, mode):
    """The torch dtype the `kv_dtype` setting means for a model in numeric `mode`."""
    if setting == "auto":
        return torch.float32 if mode == "float32" else torch.bfloat16
    return DTYPES[setting]


@dataclass(frozen=True)
class Layout:
    """The shape of one token's cache: layers, key/value heads, head width, and the dtype it is stored in."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def of(cls, config, dtype):
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.num_hidden_layers, config.num_key_value_heads, head_dim, dtype)

    @property
    def bytes_per_token(self):
        """A key and a value per layer and head."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype.itemsize


class RowCache:
    """One row's keys and values, every layer, with room for `capacity` tokens; the first `length` are written.

    Both are [layer, head, token, width]: appending a token writes contiguous memory, and a head's keys up to
    the row's length are one contiguous matrix for attention to read. A fork (another choice of a request for
    n) reads its first `offset` tokens, the prompt, from its lead's cache (`shared`) and holds only the rest:
    the prompt is neither prefilled nor stored twice."""

    def __init__(self, layout, capacity, device="cpu", shared=None, offset=0):
        self.shared, self.offset = shared, offset if shared is not None else 0
        shape = (layout.layers, layout.kv_heads, capacity - self.offset, layout.head_dim)
        self.keys = torch.empty(shape, dtype=layout.dtype, device=device)  # pages committed only as written
        self.values = torch.empty(shape, dtype=layout.dtype, device=device)
        self.capacity, self.length = capacity, self.offset
        self.zeroed = 0  # of its own part: past the length, positions up to here hold zeros, not uninitialised memory
        self.holders, self.released = 1, False  # its row, and the forks reading its prompt (CacheMemory.release)

    @property
    def own(self):
        """Tokens its own slab has room for."""
        return self.capacity - self.offset

    def padded(self, length):
        """`length` (of its own part) rounded up to a whole bucket (at most its room), zeroing what was never
        written there."""
        end = min(self.own, -(-length // BUCKET) * BUCKET)
        if end > self.zeroed:
            start = max(self.zeroed, self.length - self.offset)  # what is written stays
            self.keys[:, :, start:end].zero_()
            self.values[:, :, start:end].zero_()
            self.zeroed = end
        return end

    def rewind(self, count):
        """Forget its last `count` tokens (drafts the row did not keep): the next pass writes over them. Those
        inside the zeroed bucket are zeroed again, as a decode step's attention expects past the length."""
        self.length -= count
        start = self.length - self.offset
        end = min(start + count, self.zeroed)
        if end > start:
            self.keys[:, :, start:end].zero_()
            self.values[:, :, start:end].zero_()

    def span(self, layer, end):
        """The keys and values of its first `end` tokens in `layer` ([head, token, width]): views of its slab,
        or for a fork its lead's prompt and its own tokens joined."""
        keys, values = self.keys[layer, :, :end - self.offset], self.values[layer, :, :end - self.offset]
        if self.shared is None:
            return keys, values
        shared_keys = self.shared.keys[layer, :, :self.offset]
        shared_values = self.shared.values[layer, :, :self.offset]
        return torch.cat([shared_keys, keys], dim=1), torch.cat([shared_values, values], dim=1)


class CacheFull(Exception):
    """A row's cache would pass its capacity (a bug in admission: a row is sized for its whole answer)."""


class Pass:
    """One forward pass over rows packed into one sequence: `segments` are (row cache, tokens it adds).

    Given to the model both as its cache and as its attention mask. `commit` advances the rows' lengths once
    the pass has run; a pass that failed leaves them as they were (its writes are overwritten next time)."""

    def __init__(self, segments):
        self.segments, self.short, self.deep, self.pieces, start = [], [], [], {}, 0
        for cache, count in segments:
            if cache.length + count > cache.capacity:
                raise CacheFull(f"{cache.length} + {count} tokens do not fit a row of {cache.capacity}")
            base = cache.length
            self.segments.append((cache, start, count, base))
            if count > 1:  # a prompt's piece, or a decode row's token with the closing or drafts after it
                if count <= PIECE and base >= SHORT and cache.keys.dtype != torch.float32:  # read in place, as a
                    # deep decode row's is (its numbers too: a drafted token's are as if decoded), in buckets
                    self.pieces[start] = cache.offset + cache.padded(base + count - cache.offset)
            elif base < SHORT:
                self.short.append((cache, start, base))
            else:  # its bucket, zeroed past what is written, before any layer writes
                self.deep.append((cache, start, base, cache.padded(base + 1 - cache.offset)))
            start += count
        self.tokens = start
        self._batch = None  # the short rows' float32 keys and values, made by the first layer, reused by the rest

    def _short_batch(self, query):
        """The short decode rows' zeroed float32 key and value buffers, their mask, and their query positions."""
        if self._batch is None:
            cache = self.short[0][0]
            kv_heads, width = cache.keys.shape[1], cache.keys.shape[3]
            longest = max(base + 1 for _, _, base in self.short)
            shape = (len(self.short), kv_heads, longest, width)
            lengths = torch.tensor([base + 1 for _, _, base in self.short], device=query.device)
            mask = torch.arange(longest, device=query.device) < lengths[:, None]
            where = torch.tensor([start for _, start, _ in self.short], device=query.device)
            self._batch = (query.new_zeros(shape, dtype=torch.float32), query.new_zeros(shape, dtype=torch.float32),
                           mask[:, None, None, :], where)
        return self._batch

    def update(self, keys, values, layer, kwargs=None):
        """Write this pass's new keys and values ([1, head, token, width]) into each row's slab."""
        for cache, start, count, base in self.segments:
            at = base - cache.offset
            cache.keys[layer, :, at:at + count] = keys[0, :, start:start + count]
            cache.values[layer, :, at:at + count] = values[0, :, start:start + count]
        return keys, values

    def attend(self, layer, query, scaling):
        """Each row's queries ([1, head, token, width]) against its own slab: [1, token, head, width]."""
        out = query.new_empty((1, query.shape[2], query.shape[1], query.shape[3]))
        if self.short:
            keys, values, mask, where = self._short_batch(query)
            for i, (cache, _, base) in enumerate(self.short):  # the rest of each row's part stays zero
                keys[i, :, :base + 1], values[i, :, :base + 1] = cache.span(layer, base + 1)
            rows = query[0, :, where].transpose(0, 1)[:, :, None].float()  # [row, head, 1, width]
            attended = F.scaled_dot_product_attention(rows, keys, values, attn_mask=mask, scale=scaling,
                                                      enable_gqa=True)
            out[0, where] = attended[:, :, 0].to(out.dtype)
        for cache, start, base, end in self.deep:
            keys, values = cache.keys[layer, :, :end], cache.values[layer, :, :end]
            shared = None if cache.shared is None else (cache.shared.keys[layer, :, :cache.offset],
                                                        cache.shared.values[layer, :, :cache.offset])
            out[0, start] = _decode_attention(query[0, :, start:start + 1], keys, values, scaling,
                                              base + 1 - cache.offset, shared)[:, 0]
        for cache, start, count, base in self.segments:
            if count > 1:
                piece = query[0, :, start:start + count]
                if start in self.pieces:
                    keys, values = cache.span(layer, self.pieces[start])
                    attended = _piece_attention(piece, keys, values, scaling, base, base + count)
                else:
                    keys, values = cache.span(layer, base + count)
                    attended = _prefill_attention(piece, keys, values, scaling, base)
                out[0, start:start + count] = attended.transpose(0, 1)
        return out

    def commit(self):
        for cache, _, count, _ in self.segments:
            cache.length += count


def _decode_attention(query, keys, values, scaling, length, shared=None):
    """One token's attention: query [head, 1, width] against the first `length` of keys and values [kv head,
    padded length, width] (past `length`: zeros, masked out), after all of `shared` (a fork's lead's prompt:
    its keys and values, [kv head, tokens, width]) when given.

    Two matrix products per key/value head and part in the cache's dtype (each reads the slab once, no copy)
    and one float32 softmax over both parts. Query heads are grouped by the key/value head they share (GQA)."""
    kv_heads, width = keys.shape[0], keys.shape[-1]
    grouped = query.reshape(kv_heads, -1, width).to(keys.dtype)
    scores = torch.stack([F.linear(grouped[h], keys[h]) for h in range(kv_heads)]).float()
    if length < keys.shape[1]:
        scores[..., length:] = float("-inf")
    if shared is not None:
        before = torch.stack([F.linear(grouped[h], shared[0][h]) for h in range(kv_heads)]).float()
        scores = torch.cat([before, scores], dim=-1)
    weights = torch.softmax(scores * scaling, dim=-1).to(values.dtype)
    if shared is None:
        out = torch.bmm(weights, values)
    else:
        split = shared[0].shape[1]
        out = torch.bmm(weights[..., :split], shared[1]) + torch.bmm(weights[..., split:], values)
    return out.reshape(query.shape).to(query.dtype)


def _prefill_attention(query, keys, values, scaling, base):
    """A chunk's attention: token i of the chunk sees the row's first base + i + 1 tokens. In float32 through
    SDPA (a bfloat16 cache copied to float32 first); a short piece over a bfloat16 cache reads the slab in
    place instead (`_piece_attention`, PIECE: the pass chooses)."""
    count, length = query.shape[1], keys.shape[1]
    mask = None
    if base:  # a later chunk: causal from the bottom right
        mask = torch.ones((count, length), dtype=torch.bool, device=query.device).tril(diagonal=base)
    out = F.scaled_dot_product_attention(query[None].float(), keys[None].float(), values[None].float(),
                                         attn_mask=mask, is_causal=not base, scale=scaling, enable_gqa=True)
    return out[0].to(query.dtype)


def _piece_attention(query, keys, values, scaling, base, length):
    """A short piece's attention over a deep row, reading the slab in place, with a decode row's numbers
    (`_decode_attention`: scores in the cache's dtype, then a float32 softmax), so a token checked in a piece
    comes out as it would decoded alone: for each key/value head at once, the piece's grouped queries against
    the keys, the causal mask on the piece's own columns only (the ones before it are all seen) and none past
    `length` (keys and values are read in whole buckets, zeros past what is written: a product of a shape seen
    before reuses oneDNN's kernel), and the values."""
    heads, count, width = query.shape
    kv_heads, end = keys.shape[0], keys.shape[1]
    group = heads // kv_heads
    grouped = query.reshape(kv_heads, group * count, width).to(keys.dtype)
    scores = torch.bmm(grouped, keys.transpose(1, 2)).float().view(kv_heads, group, count, end)
    hidden = torch.ones((count, count), dtype=torch.bool, device=query.device).triu(diagonal=1)
    scores[..., base:base + count].masked_fill_(hidden, float("-inf"))
    if length < end:
        scores[..., length:] = float("-inf")
    weights = torch.softmax(scores.view(kv_heads, group * count, end) * scaling, dim=-1).to(values.dtype)
    return torch.bmm(weights, values).view(heads, count, width).to(query.dtype)


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The model's attention function: a `Pass` attends row by row; anything else through SDPA."""
    if isinstance(attention_mask, Pass):
        return attention_mask.attend(module.layer_idx, query, scaling), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def install(model):
    """Make `model` (a transformers model) attend through `attention`."""
    if ATTENTION not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionInterface.register(ATTENTION, attention)
        AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    model.set_attn_implementation(ATTENTION)


def attention_cost(layout, heads, tokens=2048, device="cpu"):
    """Seconds a decode step's attention takes per cached token of a row, every layer: timed on a scratch
    row at load, the starting point of the engine's speed model (service.inference.speed)."""
    cache = RowCache(layout, tokens, device)
    cache.keys.normal_()
    cache.values.normal_()
    query = torch.randn((heads, 1, layout.head_dim), device=device)

    def run(length):
        started = time.perf_counter()
        with torch.inference_mode():
            for layer in range(layout.layers):
                _decode_attention(query, cache.keys[layer, :, :length], cache.values[layer, :, :length], 1.0,
                                  length)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    run(tokens)  # warm: the kernels' first call
    short, long = min(run(16) for _ in range(3)), min(run(tokens) for _ in range(3))
    return max(0.0, long - short) / (tokens - 16)
