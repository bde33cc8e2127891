"""MuFAAdapter: MuFA's multi-scale fusion adapter (one branch: AdaptFormer; serial placement: Houlsby)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .._impl import impl_property
from .._validate import check_positive_int
from ..ops.mufa import mufa
from ..reference.mufa import branch_sizes


class MuFAAdapter(nn.Module):
    """Multi-scale bottleneck adapter, returning the delta (or ``base + delta``).

    Args:
        dim: feature size ``d``.
        rates: down-sampling rate of each branch; branch ``i`` has width ``dim // rates[i]``.
        scale: output scale.
        impl: ``"auto" | "reference" | "triton"`` (validated here; see :func:`rspeft_fast.ops.mufa.mufa`).

    Parameters: ``down.weight (R, d)``, ``down.bias (R,)``, ``up.weight (d, R)`` (zero-initialised),
    ``up.bias (d,)`` (zero), ``gate (n,)`` (init ``1/n``), ``R = Σ dim // rate``.

    Forward: ``x (..., d)`` → ``(..., d)``. With ``base`` (same shape as ``x``) returns ``base + delta``
    (the fused path adds it in the kernel's epilogue, saving one pass over memory).
    """

    impl = impl_property("mufa")

    def __init__(self, dim: int, rates: Sequence[int] = (8, 16, 32), scale: float = 1.0, impl: str = "auto"):
        super().__init__()
        self.dim = check_positive_int("MuFAAdapter", "dim", dim)
        if isinstance(rates, (str, bytes)) or not isinstance(rates, Sequence) or not rates:
            raise ValueError(f"MuFAAdapter: rates must be a non-empty sequence of positive ints, e.g. (8, 16, 32), got {rates!r}")
        self.rates = tuple(check_positive_int("MuFAAdapter", f"rates[{i}]", r) for i, r in enumerate(rates))
        try:
            self.sizes = branch_sizes(self.dim, self.rates)
        except ValueError as e:
            raise ValueError(f"MuFAAdapter: {e}") from None
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise ValueError(f"MuFAAdapter: scale must be a number, got {scale!r}")
        self.scale = float(scale)
        self.impl = impl
        R = sum(self.sizes)
        self.down = nn.Linear(self.dim, R)
        self.up = nn.Linear(R, self.dim)
        self.gate = nn.Parameter(torch.full((len(self.sizes),), 1.0 / len(self.sizes)))
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    @property
    def bottleneck(self) -> int:
        return sum(self.sizes)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, rates={self.rates}, sizes={self.sizes}, scale={self.scale}, impl={self.impl!r}"

    def forward(self, x: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        return mufa(x, self.down.weight, self.down.bias, self.up.weight, self.up.bias, self.gate, self.sizes,
                    self.scale, base, impl=self.impl)
