"""The pure-torch pieces of the GPT's forward that nanopipe/gpt.py and the exported model share.

nanopipe/hf_export.py copies this file beside modeling_nanopipe.py (nanopipe/hf_modeling.py) in every export, so
it imports torch only: whoever loads an exported folder has no nanopipe.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class _LowPrecisionRMSNorm(torch.autograd.Function):
    """RMSNorm of a bf16/fp16 x, computed in fp32, returned in x's dtype, saving x itself (not an fp32 copy of it,
    which is what F.rms_norm's decomposition keeps for its backward) and the fp32 1/rms per row."""

    @staticmethod
    def forward(ctx, x):
        xf = x.float()
        rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True) + torch.finfo(torch.float32).eps)
        ctx.save_for_backward(x, rstd)
        return (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, rstd = ctx.saved_tensors
        y, g = x.float() * rstd, grad.float()
        return (rstd * (g - y * (g * y).mean(-1, keepdim=True))).to(x.dtype)


def norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm (no weight) in x's dtype. Under autocast F.rms_norm would upcast a bf16 x and return fp32, and in
    any case keeps an fp32 copy of x for its backward; bf16 activations take the function above instead."""
    if x.dtype in (torch.bfloat16, torch.float16):
        return _LowPrecisionRMSNorm.apply(x)
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + d/2) of x (B, T, H, D) by the per-position angle (half-split layout)."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def add_attention_projections(attn: nn.Module, n_embd: int, n_head: int, n_kv_head: int, ve_gate_channels: int,
                               value_embedding: bool):
    """The attention's linear maps on `attn`, named as nanopipe's state_dict names them: c_q, c_k, c_v, c_proj,
    and ve_gate (reading the first ve_gate_channels of the input) where the layer has a value embedding."""
    attn.n_head, attn.n_kv_head, attn.head_dim = n_head, n_kv_head, n_embd // n_head
    kv_dim = n_kv_head * attn.head_dim
    attn.c_q = nn.Linear(n_embd, n_embd, bias=False)
    attn.c_k = nn.Linear(n_embd, kv_dim, bias=False)
    attn.c_v = nn.Linear(n_embd, kv_dim, bias=False)
    attn.c_proj = nn.Linear(n_embd, n_embd, bias=False)
    attn.ve_gate_channels = min(ve_gate_channels, n_embd)
    attn.ve_gate = nn.Linear(attn.ve_gate_channels, n_kv_head, bias=False) if value_embedding else None


def project_qkv(attn, x, ve, cos, sin, ve_gate_scale: float):
    """q, k, v (B, H, T, D) of the attention module `attn` for x (B, T, C): its value embedding `ve` (or None)
    added into v through the gate (ve_gate_scale * sigmoid of the first channels), RoPE, then QK-norm."""
    B, T, _ = x.shape
    q = attn.c_q(x).view(B, T, attn.n_head, attn.head_dim)
    k = attn.c_k(x).view(B, T, attn.n_kv_head, attn.head_dim)
    v = attn.c_v(x).view(B, T, attn.n_kv_head, attn.head_dim)
    if ve is not None:
        gate = ve_gate_scale * torch.sigmoid(attn.ve_gate(x[..., :attn.ve_gate_channels]))
        v = v + gate.unsqueeze(-1) * ve.view(B, T, attn.n_kv_head, attn.head_dim).to(v.dtype)
    q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
    q, k = norm(q), norm(k)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def causal_attention(q, k, v, past: int, scale: float, gqa: bool):
    """SDPA of T new queries that follow `past` cached positions (k, v hold past + T): plain causal attention
    from an empty cache, everything for one new token, and for a chunk after a prefix query i sees keys up to
    past + i."""
    T = q.size(2)
    if past == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if T == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    mask = torch.ones(T, past + T, dtype=torch.bool, device=q.device).tril(diagonal=past)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def shift_right(x, previous):
    """x (B, T, C) one position later, for smear: row t holds x_{t-1}, and row 0 the chunk's previous token
    (`previous`, (B, 1, C), kept by the cache) or zeros at the start of a sequence (previous None)."""
    first = torch.zeros_like(x[:, :1]) if previous is None else previous.to(x.dtype)
    return torch.cat([first, x[:, :-1]], dim=1)
