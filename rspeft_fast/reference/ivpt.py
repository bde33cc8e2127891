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
import torch.nn.functional as F


def tempered_attention_ref(
    x: torch.Tensor,
    qkv_weight: torch.Tensor,
    qkv_bias: Optional[torch.Tensor],
    proj_weight: torch.Tensor,
    proj_bias: Optional[torch.Tensor],
    num_heads: int,
    temperature: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """timm-layout multi-head self-attention (``qkv (3D, D)``, ``proj (D, D)``) of ``x (B, N, D)`` → ``(B, N, D)``
    with the logits divided by ``temperature`` (a 0-d tensor; None: 1), as the reference's ``Attention(temp=)``."""
    B, N, D = x.shape
    hd = D // num_heads
    q, k, v = F.linear(x, qkv_weight, qkv_bias).reshape(B, N, 3, num_heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
    attn = (q @ k.transpose(-2, -1)) * hd**-0.5
    if temperature is not None:
        attn = attn / temperature
    out = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, D)
    return F.linear(out, proj_weight, proj_bias)


def gated_prompts_ref(prompt_in: torch.Tensor, prompt_out: torch.Tensor, gate_logit: torch.Tensor) -> torch.Tensor:
    """IVPT's gate: ``g · prompt_out + (1 − g) · prompt_in``, ``g = sigmoid(gate_logit)``."""
    g = torch.sigmoid(gate_logit)
    return g * prompt_out + (1 - g) * prompt_in
