"""HarMA's gated multimodal adapter (MGA) and BiShare adapter, eager reference (SPEC §1).

``msa_ref`` has the parameter layout and maths of ``nn.MultiheadAttention`` (batch-first, no dropout,
no attention mask, optional key padding mask where True marks a padded key to ignore).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def msa_ref(
    x: torch.Tensor,
    in_proj_weight: torch.Tensor,
    in_proj_bias: torch.Tensor | None,
    out_proj_weight: torch.Tensor,
    out_proj_bias: torch.Tensor | None,
    heads: int,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Self-attention over the sequence axis: ``x (B, L, h)`` → ``(B, L, h)``.

    ``in_proj_weight (3h, h)``, ``in_proj_bias (3h,)``, ``out_proj_weight (h, h)``, ``out_proj_bias (h,)``,
    ``key_padding_mask (B, L)`` bool, True = ignore that key.
    """
    B, L, h = x.shape
    if h % heads:
        raise ValueError(f"hidden size {h} is not divisible by heads={heads}")
    dh = h // heads
    qkv = F.linear(x, in_proj_weight, in_proj_bias)  # (B, L, 3h)
    q, k, v = qkv.split(h, dim=-1)
    q = q.reshape(B, L, heads, dh).transpose(1, 2)
    k = k.reshape(B, L, heads, dh).transpose(1, 2)
    v = v.reshape(B, L, heads, dh).transpose(1, 2)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(dh)  # (B, H, L, L)
    if key_padding_mask is not None:
        s = s.masked_fill(key_padding_mask[:, None, None, :].to(torch.bool), float("-inf"))
    p = torch.softmax(s, dim=-1, dtype=torch.promote_types(s.dtype, torch.float32)).to(s.dtype)
    o = (p @ v).transpose(1, 2).reshape(B, L, h)
    return F.linear(o, out_proj_weight, out_proj_bias)


def _msa(x, attn: dict, heads, mask):
    return msa_ref(x, attn["in_proj_weight"], attn["in_proj_bias"], attn["out_proj_weight"], attn["out_proj_bias"], heads, mask)


def bishare_ref(
    x: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor,
    attn: dict,
    gate: torch.Tensor,
    heads: int,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """BiShare: ``a = sigmoid(gate); z = down(x); x + up(a * MSA(z) + (1 - a) * z)``; ``x (B, L, h)``.

    ``attn`` maps ``in_proj_weight``, ``in_proj_bias``, ``out_proj_weight``, ``out_proj_bias`` to tensors.
    """
    a = torch.sigmoid(gate)
    z = F.linear(x, down_weight, down_bias)
    return x + F.linear(a * _msa(z, attn, heads, key_padding_mask) + (1 - a) * z, up_weight, up_bias)


def mga_ref(
    x: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor,
    attn: dict,
    gate: torch.Tensor,
    heads: int,
    share: dict | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """MGAdapter: ``x (B, L, d)`` → ``(B, L, d)``.

    ``z = GELU(down(x)); m = z; z = MSA(z); if share: z = share(z); z = MSA(z)``;
    ``a = sigmoid(gate); x + up(a * m + (1 - a) * z)``. ``share`` is a dict of the BiShare tensors
    (keys ``down_weight, down_bias, up_weight, up_bias, attn, gate, heads``) or None.
    """
    z = F.gelu(F.linear(x, down_weight, down_bias))
    m = z
    z = _msa(z, attn, heads, key_padding_mask)
    if share is not None:
        z = bishare_ref(z, key_padding_mask=key_padding_mask, **share)
    z = _msa(z, attn, heads, key_padding_mask)
    a = torch.sigmoid(gate)
    return x + F.linear(a * m + (1 - a) * z, up_weight, up_bias)
