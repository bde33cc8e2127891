"""timm-layout multi-head self-attention, eager reference, with the two changes Table-1 baselines make to it:
IVPT's per-block logit temperature and E2VPT's key-value prompts (:mod:`.ivpt`, :mod:`.e2vpt`)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def vit_attention_ref(
    x: torch.Tensor,
    qkv_weight: torch.Tensor,
    qkv_bias: Optional[torch.Tensor],
    proj_weight: torch.Tensor,
    proj_bias: Optional[torch.Tensor],
    num_heads: int,
    temperature: Optional[torch.Tensor] = None,
    key_prompts: Optional[torch.Tensor] = None,
    value_prompts: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Self-attention (``qkv (3D, D)``, ``proj (D, D)``) of ``x (B, N, D)`` → ``(B, N, D)``:
    ``softmax(q [k; K_p]ᵀ · head_dim^-1/2 / τ) [v; V_p]``. ``temperature`` τ: a 0-d tensor (None: 1);
    ``key_prompts`` / ``value_prompts``: ``(heads, n, head_dim)`` appended to every sample's keys / values
    after the projections (None: none; the output keeps its length)."""
    B, N, D = x.shape
    hd = D // num_heads
    q, k, v = F.linear(x, qkv_weight, qkv_bias).reshape(B, N, 3, num_heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
    if key_prompts is not None:
        k = torch.cat([k, key_prompts.expand(B, -1, -1, -1)], dim=2)
        v = torch.cat([v, value_prompts.expand(B, -1, -1, -1)], dim=2)
    attn = (q @ k.transpose(-2, -1)) * hd**-0.5
    if temperature is not None:
        attn = attn / temperature
    out = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, D)
    return F.linear(out, proj_weight, proj_bias)
