"""MuFA multi-scale fusion adapter, eager reference (SPEC §1)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def branch_sizes(dim: int, rates: Sequence[int]) -> tuple[int, ...]:
    """Bottleneck width of each branch, ``dim // rate``; raises if ``dim`` is not divisible by a rate."""
    rates = tuple(int(r) for r in rates)
    if not rates:
        raise ValueError("rates must name at least one down-sampling rate")
    for r in rates:
        if r <= 0:
            raise ValueError(f"rates must be positive, got {rates}")
        if dim % r != 0:
            raise ValueError(f"dim={dim} is not divisible by rate {r} (rates={rates})")
        if dim // r == 0:
            raise ValueError(f"rate {r} leaves an empty bottleneck for dim={dim}")
    return tuple(dim // r for r in rates)


def mufa_ref(
    x: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor,
    gate: torch.Tensor,
    sizes: Sequence[int],
    scale: float = 1.0,
    base: torch.Tensor | None = None,
    upcast: bool = False,
) -> torch.Tensor:
    """``delta = scale * (Σ_i gate[i] * GELU(x Wd_iᵀ + bd_i) Wu_iᵀ + bu)`` (+ ``base`` if given).

    Shapes: ``x (..., d)``, ``down_weight (R, d)``, ``down_bias (R,)``, ``up_weight (d, R)``,
    ``up_bias (d,)``, ``gate (n,)``, ``sizes`` the n branch widths summing to R. Returns ``(..., d)``.
    GELU is the exact (erf) GELU. Written branch by branch, as eager PyTorch code is.
    ``upcast=True``: every tensor below float32 is computed in float32 (float64 stays float64) and the
    result is cast back to ``x``'s dtype.
    """
    dt = x.dtype
    if upcast:
        x, down_weight, down_bias, up_weight, up_bias, gate = (
            t.float() if t.dtype != torch.float64 else t
            for t in (x, down_weight, down_bias, up_weight, up_bias, gate)
        )
    h = F.gelu(F.linear(x, down_weight, down_bias))
    out = None
    start = 0
    for i, r in enumerate(sizes):
        term = gate[i] * F.linear(h[..., start : start + r], up_weight[:, start : start + r])
        out = term if out is None else out + term
        start += r
    out = scale * (out + up_bias)
    if base is not None:
        out = base.to(out.dtype) + out
    return out.to(dt) if upcast else out
