"""CAPM context-aware prompt module, eager reference (SPEC §1). Cheap; eager is the product path."""
from __future__ import annotations

import math

import torch


def capm_ref(f: torch.Tensor, prompts: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """``f (B, C, H, W)`` (or ``(B, H, W, C)`` with ``channels_last``), ``prompts (k, C)`` → same shape as ``f``.

    ``c = mean_{H,W} f``; ``a = softmax(c Pᵀ / sqrt(C))``; ``p = a P``; ``f + p`` broadcast over H, W.
    """
    C = prompts.shape[1]
    c = f.mean(dim=(1, 2) if channels_last else (2, 3))  # (B, C)
    a = torch.softmax((c @ prompts.to(c.dtype).t()) / math.sqrt(C), dim=-1)  # (B, k)
    p = a @ prompts.to(a.dtype)  # (B, C)
    return f + (p[:, None, None, :] if channels_last else p[:, :, None, None])
