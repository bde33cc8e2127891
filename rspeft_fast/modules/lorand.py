"""LoRand (Yin et al., CVPR 2023): a serial bottleneck adapter whose projections are synthesised from low-rank
factors, run through the fused bottleneck kernel (one branch, serial: the Houlsby path of ``ops/mufa.py``).

Each forward materialises ``W = Σ_i P_i K_i Q_i`` once per projection (one batched ``P K`` and one GEMM against the
stacked ``Q``: ``[P_1K_1 | … | P_αK_α] @ [Q_1; …; Q_α]``), then runs ``y + up(GELU(down(y)))`` as one kernel launch
(three in the backward); autograd carries ``dW`` back to the factors. The adapter then costs what a Houlsby adapter
costs, plus two small GEMMs per step independent of the number of tokens.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .._impl import impl_property
from ..ops.mufa import mufa


def _factors(n: int, out: int, inp: int, rank: int) -> tuple:
    """``P (n, out, rank)``, ``K (n, rank, rank)``, ``Q (n, rank, inp)`` initialised as the reference code's
    ``kaiming_uniform_(a=sqrt(5))`` on its layout (``A = Qᵀ (inp, rank)``, ``g = Kᵀ``, ``B = Pᵀ (rank, out)``):
    bounds ``1/sqrt(rank)`` for ``Q`` and ``K``, ``1/sqrt(out)`` for ``P``."""
    P = nn.Parameter(torch.empty(n, out, rank).uniform_(-1 / math.sqrt(out), 1 / math.sqrt(out)))
    K = nn.Parameter(torch.empty(n, rank, rank).uniform_(-1 / math.sqrt(rank), 1 / math.sqrt(rank)))
    Q = nn.Parameter(torch.empty(n, rank, inp).uniform_(-1 / math.sqrt(rank), 1 / math.sqrt(rank)))
    return P, K, Q


def synthesise(P: torch.Tensor, K: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """``Σ_i P[i] K[i] Q[i]`` as one batched matmul and one GEMM: ``(out, in)``."""
    n, out, r = P.shape
    PK = torch.bmm(P, K)  # (n, out, r)
    return PK.permute(1, 0, 2).reshape(out, n * r) @ Q.reshape(n * r, Q.shape[-1])


class LoRand(nn.Module):
    """``y + up(GELU(down(y)))`` with ``down (hidden, dim)`` and ``up (dim, hidden)`` synthesised from ``branches``
    low-rank products of kernel size ``kernel`` (SPEC §1).

    Args:
        dim: feature size ``d``.
        hidden: bottleneck width (default ``dim // 4``, the reference's ``factor=4``).
        branches: ``α`` (default 4), kernel: ``β`` (default 8) — the reference's ``num_branch`` / ``kernel_dim``.
        zero_init_up: ``up``'s ``P`` factors and bias start at zero, so the adapter starts as the identity (as the
            package's other adapters; LoRA's ``B = 0`` rule). ``False``: the reference's init (every factor
            Kaiming-uniform, the bias uniform): the adapter then perturbs the backbone from the first step.
        impl: the bottleneck kernel's ``impl`` (``"auto" | "reference" | "triton"``).

    Parameters: ``down_P (α, hidden, β)``, ``down_K (α, β, β)``, ``down_Q (α, β, d)``, ``down_bias (hidden,)``,
    ``up_P (α, d, β)``, ``up_K (α, β, β)``, ``up_Q (α, β, hidden)``, ``up_bias (d,)``.
    Forward: ``y (..., d)`` → ``(..., d)``.
    """

    impl = impl_property("mufa")

    def __init__(self, dim: int, hidden: Optional[int] = None, branches: int = 4, kernel: int = 8,
                 zero_init_up: bool = True, impl: str = "auto"):
        super().__init__()
        self.dim = int(dim)
        self.hidden = int(hidden) if hidden is not None else self.dim // 4
        self.branches, self.kernel = int(branches), int(kernel)
        if min(self.hidden, self.branches, self.kernel) <= 0:
            raise ValueError(f"LoRand: hidden, branches and kernel must be positive, got {self.hidden}, "
                             f"{self.branches}, {self.kernel}")
        self.impl = impl
        self.down_P, self.down_K, self.down_Q = _factors(self.branches, self.hidden, self.dim, self.kernel)
        self.up_P, self.up_K, self.up_Q = _factors(self.branches, self.dim, self.hidden, self.kernel)
        # the reference's bias init: uniform(±1/sqrt(fan_in)) of the synthesised weight (fan_in = its input size)
        self.down_bias = nn.Parameter(torch.empty(self.hidden).uniform_(-self.dim**-0.5, self.dim**-0.5))
        self.up_bias = nn.Parameter(torch.empty(self.dim).uniform_(-self.hidden**-0.5, self.hidden**-0.5))
        if zero_init_up:
            with torch.no_grad():
                self.up_P.zero_()
                self.up_bias.zero_()
        self.register_buffer("_gate", torch.ones(1), persistent=False)  # one branch of the MuFA op, gate 1

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, hidden={self.hidden}, branches={self.branches}, kernel={self.kernel}, "
                f"impl={self.impl!r}")

    def weights(self) -> tuple:
        """The synthesised ``(down (hidden, d), up (d, hidden))``."""
        return synthesise(self.down_P, self.down_K, self.down_Q), synthesise(self.up_P, self.up_K, self.up_Q)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        wd, wu = self.weights()
        # base: a view of y, not y itself (Dynamo: an op given the same tensor twice graph-breaks; _blocks' serial)
        return mufa(y, wd, self.down_bias, wu, self.up_bias, self._gate, (self.hidden,), 1.0, y.view_as(y),
                    impl=self.impl)
