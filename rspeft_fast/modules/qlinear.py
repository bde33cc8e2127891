"""QLinear and EQAM (UPetu): linear layers with a fake-quantised weight, and the adapter built of them."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._impl import resolve_impl
from .._validate import check_float, check_last_dim
from ..reference.qlinear import check_bits, eqam_ref, qlinear_ref


class QLinear(nn.Module):
    """Linear layer whose forward uses the per-row symmetric ``bits``-bit quantisation of its weight.

    Keeps a float master ``weight (out, in)`` and ``bias (out,)``; the forward computes
    ``y = x Wqᵀ + bias`` (SPEC §1), the backward is the straight-through estimator.
    ``x (..., in)`` → ``(..., out)``. ``impl``: ``"auto" | "reference" | "triton"``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 8, impl: str = "auto"):
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.bits = check_bits(bits)
        self.impl = impl
        self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features))
        self.bias = nn.Parameter(torch.empty(self.out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            self.weight.copy_(lin.weight)
            if self.bias is not None:
                self.bias.copy_(lin.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, bits={self.bits}, impl={self.impl!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_float(x, "x")
        check_last_dim(x, self.in_features, "x")
        impl = resolve_impl("QLinear", self.impl, x.device, ("triton",))
        if impl == "reference":
            return qlinear_ref(x, self.weight, self.bias, self.bits)
        from ..ops.qlinear import qlinear

        return qlinear(x, self.weight, self.bias, self.bits)


class EQAM(nn.Module):
    """UPetu's efficient quantisation adapter: ``delta = QLinear_up(GELU(QLinear_down(x)))``.

    ``down: dim → dim // reduction``, ``up: dim // reduction → dim`` (zero-initialised, so the adapter
    starts as the identity of the backbone). ``x (..., dim)`` (channels-last) → delta ``(..., dim)``.
    """

    def __init__(self, dim: int, reduction: int = 4, bits: int = 8, impl: str = "auto"):
        super().__init__()
        if reduction <= 0 or dim % reduction:
            raise ValueError(f"dim={dim} is not divisible by reduction={reduction}")
        self.dim = int(dim)
        self.reduction = int(reduction)
        self.bits = check_bits(bits)
        self.impl = impl
        hidden = self.dim // self.reduction
        self.down = QLinear(self.dim, hidden, bits=bits, impl=impl)
        self.up = QLinear(hidden, self.dim, bits=bits, impl=impl)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, reduction={self.reduction}, bits={self.bits}, impl={self.impl!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_float(x, "x")
        check_last_dim(x, self.dim, "x")
        impl = resolve_impl("EQAM", self.impl, x.device, ("triton",))
        if impl == "reference":
            return eqam_ref(x, self.down.weight, self.down.bias, self.up.weight, self.up.bias, self.bits)
        from ..ops.qlinear import eqam

        return eqam(x, self.down.weight, self.down.bias, self.up.weight, self.up.bias, self.bits)
