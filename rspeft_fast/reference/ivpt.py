"""IVPT — "Improving Visual Prompt Tuning for Self-supervised Vision Transformers" (Yoo et al., ICML 2023), eager
reference of what it changes in a ViT block (SPEC §1, "The rest of MuFA's Table 1").

Shallow prompts (inserted once, after the prefix tokens) whose per-block update is gated, and a learnable attention
temperature per block (``ryongithub/GatedPromptTuning``: ``vit_backbones/vit_mae.py`` ``Attention.forward(x, temp)``;
``vit_prompt/vit_mae.py`` ``forward_features``):

    logits_i = q kᵀ · head_dim^-1/2 / τ_i          τ_i clamped to [0.01, 10]
    p_{i+1}  = g_i · blk_i(x)[prompts] + (1 − g_i) · p_i,   g_i = sigmoid(γ_i)
"""
from __future__ import annotations

from typing import Optional

import torch

from .vit_attention import vit_attention_ref


def tempered_attention_ref(x, qkv_weight, qkv_bias, proj_weight, proj_bias, num_heads: int,
                           temperature: Optional[torch.Tensor] = None) -> torch.Tensor:
    """timm-layout self-attention of ``x (B, N, D)`` with the logits divided by ``temperature`` (a 0-d tensor;
    None: 1), as the reference's ``Attention(temp=)`` (:func:`~.vit_attention.vit_attention_ref`)."""
    return vit_attention_ref(x, qkv_weight, qkv_bias, proj_weight, proj_bias, num_heads, temperature=temperature)


def gated_prompts_ref(prompt_in: torch.Tensor, prompt_out: torch.Tensor, gate_logit: torch.Tensor) -> torch.Tensor:
    """IVPT's gate: ``g · prompt_out + (1 − g) · prompt_in``, ``g = sigmoid(gate_logit)``."""
    g = torch.sigmoid(gate_logit)
    return g * prompt_out + (1 - g) * prompt_in
