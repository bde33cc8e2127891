"""Convpass (Jie & Deng 2022), eager reference (SPEC §1, "The rest of MuFA's Table 1").

``CP(t) = up(QuickGELU(conv3x3(QuickGELU(down(t)))))`` over the patch grid; each prefix token (class, registers)
passes through the same conv as its own 1×1 map, so only the centre tap (and the bias) touches it. The block places
two of these beside its sub-layers: ``x += attn(n1(x)) + s·CP_attn(n1(x))``, ``x += mlp(n2(x)) + s·CP_mlp(n2(x))``.
Written as the reference code (``JieShibo/PETL-ViT``, ``convpass/vtab/convpass.py``) computes it, minus its dropout.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's QuickGELU, ``x · sigmoid(1.702 x)`` (Convpass's activation)."""
    return x * torch.sigmoid(1.702 * x)


def convpass_ref(
    x: torch.Tensor,
    grid: Sequence[int],
    num_prefix: int,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor,
    scale: float = 1.0,
) -> torch.Tensor:
    """``s · CP(x)``: ``x (B, P + H·W, D)`` (``P = num_prefix`` tokens, then the ``H × W`` patch grid, row-major)
    → ``(B, P + H·W, D)``. ``down_weight (w, D)``, ``down_bias (w,)``, ``conv_weight (w, w, 3, 3)``,
    ``conv_bias (w,)``, ``up_weight (D, w)``, ``up_bias (D,)``; the conv has padding 1."""
    B, N, _ = x.shape
    H, W = (int(g) for g in grid)
    if N != num_prefix + H * W:
        raise ValueError(f"x has {N} tokens, expected {num_prefix} prefix + {H}x{W} patches")
    w = down_weight.shape[0]
    h = quick_gelu(F.linear(x, down_weight, down_bias))
    patches = h[:, num_prefix:].reshape(B, H, W, w).permute(0, 3, 1, 2)
    patches = F.conv2d(patches, conv_weight, conv_bias, padding=1)
    patches = patches.permute(0, 2, 3, 1).reshape(B, H * W, w)
    parts = []
    for j in range(num_prefix):  # each prefix token: its own 1x1 map through the same conv
        t = h[:, j : j + 1].reshape(B, 1, 1, w).permute(0, 3, 1, 2)
        parts.append(F.conv2d(t, conv_weight, conv_bias, padding=1).permute(0, 2, 3, 1).reshape(B, 1, w))
    h = torch.cat(parts + [patches], dim=1)
    return scale * F.linear(quick_gelu(h), up_weight, up_bias)
