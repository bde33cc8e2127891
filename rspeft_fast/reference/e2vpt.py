"""E2VPT (Han et al., ICCV 2023), eager reference of its key-value prompts (SPEC §1, "The rest of MuFA's Table 1").

Per block, ``n`` learnable key tokens and ``n`` value tokens per head are concatenated to K and V *after* the
projections: the queries attend to them, the output keeps its length (``ChengHan111/E2VPT``, ``vit_changeVK.py``
``Attention.forward`` with ``QUERY_PROMPT_MODE 0``, ``SHARE_PARAM_KV False``, ``LAYER_BEHIND False``). The visual
prompts beside them are deep VPT's (one set per block, re-set before each block).
"""
from __future__ import annotations

import torch

from .vit_attention import vit_attention_ref


def kv_prompt_attention_ref(x, qkv_weight, qkv_bias, proj_weight, proj_bias, num_heads: int,
                            key_prompts: torch.Tensor, value_prompts: torch.Tensor) -> torch.Tensor:
    """timm-layout self-attention of ``x (B, N, D)`` whose keys / values are extended by ``key_prompts`` /
    ``value_prompts`` ``(heads, n, head_dim)`` (the same for every sample): ``softmax(q [k; K_p]ᵀ · head_dim^-1/2)
    [v; V_p]`` (:func:`~.vit_attention.vit_attention_ref`)."""
    return vit_attention_ref(x, qkv_weight, qkv_bias, proj_weight, proj_bias, num_heads,
                             key_prompts=key_prompts, value_prompts=value_prompts)
