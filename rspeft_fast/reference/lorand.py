"""LoRand (Yin et al., CVPR 2023), eager reference (SPEC §1, "The rest of MuFA's Table 1").

A serial bottleneck adapter ``y + up(GELU(down(y)))`` whose two projections are synthesised from low-rank factors,
``W = Σ_{i=1..α} P_i K_i Q_i`` (``P_i (out, β)``, ``K_i (β, β)``, ``Q_i (β, in)``) plus a bias. The reference code
(``DongshuoYin/CoLin``, ``swin_lorand.py``, ``Lorand_Multi``) stores ``A_i = Q_iᵀ``, ``g_i = K_iᵀ``, ``B_i = P_iᵀ`` and
computes ``Σ (A_i g_i B_i)ᵀ``: the same ``W``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def lorand_weight_ref(P: torch.Tensor, K: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """``Σ_i P[i] @ K[i] @ Q[i]``: ``P (α, out, β)``, ``K (α, β, β)``, ``Q (α, β, in)`` → ``(out, in)``, branch by
    branch as eager code writes it."""
    W = None
    for i in range(P.shape[0]):
        term = P[i] @ K[i] @ Q[i]
        W = term if W is None else W + term
    return W


def lorand_ref(
    y: torch.Tensor,
    down_P: torch.Tensor,
    down_K: torch.Tensor,
    down_Q: torch.Tensor,
    down_bias: torch.Tensor,
    up_P: torch.Tensor,
    up_K: torch.Tensor,
    up_Q: torch.Tensor,
    up_bias: torch.Tensor,
) -> torch.Tensor:
    """``y + up(GELU(down(y)))`` with ``down = lorand_weight_ref(down_P, down_K, down_Q)`` (``(h, d)``) and
    ``up = lorand_weight_ref(up_P, up_K, up_Q)`` (``(d, h)``); ``y (..., d)`` → ``(..., d)``; exact (erf) GELU."""
    wd = lorand_weight_ref(down_P, down_K, down_Q)
    wu = lorand_weight_ref(up_P, up_K, up_Q)
    return y + F.linear(F.gelu(F.linear(y, wd, down_bias)), wu, up_bias)
