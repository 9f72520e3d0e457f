"""The engine's forward pass through a Qwen2 model: its own modules, called in a plain loop.

A decode step at batch 1 reads the weights at the kernel's speed (about 58 ms
of linears at VibeThinker-1.5B's size, int8, on the 2-core development
machine), and everything else is overhead: transformers' model forward wraps
every layer, attention and MLP in module calls, keyword plumbing, output
records and mask dispatch, about 0.2 ms a layer on a CPU. This loop calls
the same modules (their weights, norms and rotary embedding; the int8 kernel
and the float32 prefill mode patch them and still apply) in the same order
with the same arithmetic, so its logits are transformers' own, bit for bit
on the tiny model (tests/test_kvcache.py); the pass (service.inference.kvcache.Pass)
writes and reads each row's cache as it does there. Measured at real size,
int8, batch 1, side by side: 74-77 ms a step through transformers' forward
against 66-73 ms through this one (about 7% more tokens a second).

`supported` says which models it knows: Qwen2's decoder (VibeThinker's). Any
other goes through transformers' forward (service.inference.batching.forward).
"""

import torch


def supported(model):
    """Whether `model` (a transformers causal LM) is one this loop computes: Qwen2's decoder."""
    return getattr(model.config, "model_type", None) == "qwen2"


def forward(model, ids, positions, step, keep):
    """Logits at packed positions `keep` of one pass of token `ids` at `positions` (1-D tensors), each row's
    keys and values written to and attended through `step` (a kvcache.Pass)."""
    decoder = model.model
    hidden = decoder.embed_tokens(ids)  # [tokens, hidden]
    cos, sin = decoder.rotary_emb(hidden, positions[None])
    cos, sin = cos[0, :, None], sin[0, :, None]  # [tokens, 1, head width]: one for every head
    count = ids.shape[0]
    for layer in decoder.layers:
        attention, mlp = layer.self_attn, layer.mlp
        width = attention.head_dim
        x = layer.input_layernorm(hidden)
        query = _rotated(attention.q_proj(x).view(count, -1, width), cos, sin)
        keys = _rotated(attention.k_proj(x).view(count, -1, width), cos, sin)
        values = attention.v_proj(x).view(count, -1, width)
        step.update(keys.transpose(0, 1)[None], values.transpose(0, 1)[None], attention.layer_idx)
        attended = step.attend(attention.layer_idx, query.transpose(0, 1)[None], attention.scaling)
        hidden = hidden + attention.o_proj(attended.reshape(count, -1))
        x = layer.post_attention_layernorm(hidden)
        hidden = hidden + mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
    return model.lm_head(decoder.norm(hidden[keep]))


def _rotated(x, cos, sin):
    """Rotary position embedding, as transformers' apply_rotary_pos_emb computes it: x * cos + rotate_half(x)
    * sin, the halves of each head's width swapped with the first negated."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
