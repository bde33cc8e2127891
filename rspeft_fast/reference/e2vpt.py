"""E2VPT (Han et al., ICCV 2023), eager reference of its key-value prompts (SPEC §1, "The rest of MuFA's Table 1").

Per block, ``n`` learnable key tokens and ``n`` value tokens per head are concatenated to K and V *after* the
projections: the queries attend to them, the output keeps its length (``ChengHan111/E2VPT``, ``vit_changeVK.py``
``Attention.forward`` with ``QUERY_PROMPT_MODE 0``, ``SHARE_PARAM_KV False``, ``LAYER_BEHIND False``). The visual
prompts beside them are deep VPT's (one set per block, re-set before each block).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def kv_prompt_attention_ref(
    x: torch.Tensor,
    qkv_weight: torch.Tensor,
    qkv_bias: Optional[torch.Tensor],
    proj_weight: torch.Tensor,
    proj_bias: Optional[torch.Tensor],
    num_heads: int,
    key_prompts: torch.Tensor,
    value_prompts: torch.Tensor,
) -> torch.Tensor:
    """timm-layout multi-head self-attention (``qkv (3D, D)``, ``proj (D, D)``) of ``x (B, N, D)`` → ``(B, N, D)``
    whose keys / values are extended by ``key_prompts`` / ``value_prompts`` ``(heads, n, head_dim)`` (the same for
    every sample): ``softmax(q [k; K_p]ᵀ · head_dim^-1/2) [v; V_p]``."""
    B, N, D = x.shape
    hd = D // num_heads
    q, k, v = F.linear(x, qkv_weight, qkv_bias).reshape(B, N, 3, num_heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
    k = torch.cat([k, key_prompts.expand(B, -1, -1, -1)], dim=2)
    v = torch.cat([v, value_prompts.expand(B, -1, -1, -1)], dim=2)
    attn = ((q @ k.transpose(-2, -1)) * hd**-0.5).softmax(dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(B, N, D)
    return F.linear(out, proj_weight, proj_bias)
