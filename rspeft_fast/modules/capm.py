"""CAPM (UPetu): context-aware prompts added to a backbone stage's feature map."""
from __future__ import annotations

import torch
from torch import nn

from .._validate import check_float
from ..reference.capm import capm_ref


class CAPM(nn.Module):
    """``k`` trainable prompts ``prompts (k, dim)`` mixed by attention to the pooled feature.

    Forward: ``f (B, dim, H, W)``, or channels-last ``(B, H, W, dim)`` when ``channels_last=True``
    (constructor default, overridable per call) → same shape:
    ``f + softmax(mean_{H,W}(f) Pᵀ / sqrt(dim)) P`` broadcast over H, W. Eager only: it is cheap.
    """

    def __init__(self, dim: int, num_prompts: int = 8, channels_last: bool = False, init_std: float = 0.02):
        super().__init__()
        if num_prompts <= 0:
            raise ValueError(f"num_prompts must be positive, got {num_prompts}")
        self.dim = int(dim)
        self.num_prompts = int(num_prompts)
        self.channels_last = bool(channels_last)
        self.prompts = nn.Parameter(torch.randn(self.num_prompts, self.dim) * init_std)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_prompts={self.num_prompts}, channels_last={self.channels_last}"

    def forward(self, f: torch.Tensor, channels_last: bool | None = None) -> torch.Tensor:
        check_float(f, "f")
        cl = self.channels_last if channels_last is None else channels_last
        if f.dim() != 4:
            raise ValueError(f"CAPM expects a 4-D feature map, got shape {tuple(f.shape)}")
        c_axis = 3 if cl else 1
        if f.shape[c_axis] != self.dim:
            layout = "(B, H, W, C)" if cl else "(B, C, H, W)"
            raise ValueError(f"CAPM(dim={self.dim}) expects {layout} with C={self.dim}, got shape {tuple(f.shape)}")
        return capm_ref(f, self.prompts, channels_last=cl)
