"""Convpass (Jie & Deng 2022): a convolutional bypass beside a ViT / Swin sub-layer.

Eager by design (benchmarks/NOTES.md, "Convpass"): the fused bottleneck kernel computes ``up(GELU(down(x)))`` in one
launch, but Convpass puts a 3×3 conv over the patch grid between ``down`` and ``up`` and uses QuickGELU, so the
kernel's one-launch body does not apply; its two linears are plain GEMMs.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..reference.convpass import quick_gelu


class Convpass(nn.Module):
    """``s · up(QuickGELU(conv3x3(QuickGELU(down(x)))))`` over the patch grid (SPEC §1), returning the delta.

    Args:
        dim: feature size ``D``.
        width: bottleneck channels ``w`` (the reference's ``dim``; the paper uses 8).
        scale: ``s``.
        dropout: dropout before ``up`` in training (the reference's 0.1).

    Parameters: ``down (w, D)`` (Xavier-uniform, bias 0), ``conv (w, w, 3, 3)`` (zero with the identity at the
    centre tap, bias 0), ``up (D, w)`` (zero: the bypass starts at 0).

    Forward: ``x (B, P + H·W, D)`` with ``grid=(H, W)`` and ``num_prefix=P`` (class / register tokens first; each
    goes through the same conv as its own 1×1 map: only the centre tap touches it), or ``x (B, H, W, D)`` (Swin)
    → the same shape.
    """

    def __init__(self, dim: int, width: int = 8, scale: float = 1.0, dropout: float = 0.1):
        super().__init__()
        if int(width) <= 0:
            raise ValueError(f"width must be positive, got {width}")
        self.dim, self.width, self.scale = int(dim), int(width), float(scale)
        self.down = nn.Linear(self.dim, self.width)
        self.conv = nn.Conv2d(self.width, self.width, 3, 1, 1)
        self.up = nn.Linear(self.width, self.dim)
        self.dropout = nn.Dropout(float(dropout))
        with torch.no_grad():
            nn.init.xavier_uniform_(self.down.weight)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.conv.weight)
            self.conv.weight[:, :, 1, 1] += torch.eye(self.width)
            nn.init.zeros_(self.conv.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, width={self.width}, scale={self.scale}"

    def forward(self, x: torch.Tensor, grid: Optional[Sequence[int]] = None, num_prefix: int = 0) -> torch.Tensor:
        h = quick_gelu(self.down(x))
        if x.dim() == 4:  # (B, H, W, D): a Swin stage's feature map
            h = self.conv(h.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        else:
            if grid is None:
                raise ValueError("Convpass on (B, N, D) tokens needs grid=(H, W) (and num_prefix)")
            B, N, w = h.shape
            H, W = (int(g) for g in grid)
            if N != num_prefix + H * W:
                raise ValueError(f"Convpass: {N} tokens, expected {num_prefix} prefix + {H}x{W} patches")
            patches = self.conv(h[:, num_prefix:].reshape(B, H, W, w).permute(0, 3, 1, 2))
            patches = patches.permute(0, 2, 3, 1).reshape(B, H * W, w)
            if num_prefix:  # a 1x1 map through a padded 3x3 conv: the centre tap and the bias
                prefix = F.linear(h[:, :num_prefix], self.conv.weight[:, :, 1, 1], self.conv.bias)
                patches = torch.cat([prefix, patches], dim=1)
            h = patches
        out = self.up(self.dropout(quick_gelu(h)))
        return out if self.scale == 1.0 else out * self.scale
