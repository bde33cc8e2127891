"""LoRA from its formulas: ``y = x Wᵀ + b + scaling (x Aᵀ) Bᵀ``, and on self-attention with packed projections."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def lora_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], a: torch.Tensor,
                    b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``x Wᵀ + bias + scaling (x Aᵀ) Bᵀ`` (no dropout)."""
    return F.linear(x, weight, bias) + scaling * ((x @ a.t()) @ b.t())


def lora_mha_ref(x: torch.Tensor, num_heads: int, in_weight: torch.Tensor, in_bias: Optional[torch.Tensor],
                 out_weight: torch.Tensor, out_bias: Optional[torch.Tensor], scaling: float,
                 in_ab=None, out_ab=None, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Self-attention of ``x (batch, seq, dim)`` with LoRA on the packed q/k/v projection (``in_ab = (A, B)``,
    ``B`` of shape ``(3 dim, rank)``) and / or the output projection (``out_ab``), written from the formulas:
    ``[q k v] = x Wᵀ + b + scaling (x Aᵀ) Bᵀ``, ``o = softmax(q kᵀ / sqrt(d) + mask) v`` per head, then the output
    projection the same way. ``attn_mask``: an additive float mask ``(seq, seq)``."""
    n, s, dim = x.shape
    hd = dim // num_heads
    qkv = lora_linear_ref(x, in_weight, in_bias, *in_ab, scaling) if in_ab else F.linear(x, in_weight, in_bias)
    q, k, v = (t.reshape(n, s, num_heads, hd).transpose(1, 2) for t in qkv.split(dim, dim=-1))
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    if attn_mask is not None:
        scores = scores + attn_mask
    o = (scores.softmax(-1) @ v).transpose(1, 2).reshape(n, s, dim)
    return lora_linear_ref(o, out_weight, out_bias, *out_ab, scaling) if out_ab else F.linear(o, out_weight, out_bias)
