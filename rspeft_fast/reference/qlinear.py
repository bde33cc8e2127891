"""Q-Linear (UPetu's EQAM building block), eager reference (SPEC §1).

Per output row ``o``: ``s_o = max_k |W[o,k]| / (2^(b-1) - 1)`` clamped below by 1e-8,
``Wq = clamp(round_half_to_even(W / s), -2^(b-1), 2^(b-1) - 1) * s``, ``y = x Wqᵀ + bias``.
The quantizer runs in float32 whatever the weight dtype. Backward is the straight-through
estimator: ``dX = dY Wq``, ``dW = dYᵀ X``, ``dbias = Σ dY``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SCALE_EPS = 1e-8


def check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 2..8, got {bits!r}")
    return bits


def round_half_even_ref(v: torch.Tensor) -> torch.Tensor:
    """Round half to even written out by hand (an independent check of ``torch.round``)."""
    f = torch.floor(v)
    diff = v - f
    up = (diff > 0.5) | ((diff == 0.5) & (torch.remainder(f, 2) == 1))
    return f + up.to(v.dtype)


def quantize_weight(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes ``q (out, in)`` (float32 holding integers) and per-row scales ``s (out,)`` (float32)."""
    check_bits(bits)
    qmax = 2 ** (bits - 1) - 1
    w32 = w.detach().float()
    s = (w32.abs().amax(dim=1) / qmax).clamp_min(SCALE_EPS)
    q = torch.clamp(torch.round(w32 / s[:, None]), -qmax - 1, qmax)
    return q, s


class _FakeQuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor, bits: int) -> torch.Tensor:
        q, s = quantize_weight(w, bits)
        return (q * s[:, None]).to(w.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g, None


def fake_quant_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """``Wq`` in ``w``'s dtype, with the identity (straight-through) gradient to ``w``."""
    return _FakeQuantSTE.apply(w, bits)


def qlinear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, bits: int) -> torch.Tensor:
    """``x (..., in)``, ``weight (out, in)``, ``bias (out,)`` or None → ``(..., out)``."""
    return F.linear(x, fake_quant_weight(weight, bits), bias)


def eqam_ref(
    x: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    bits: int,
) -> torch.Tensor:
    """EQAM delta ``QLinear_up(GELU(QLinear_down(x)))``: ``x (..., d)`` → ``(..., d)``."""
    return qlinear_ref(F.gelu(qlinear_ref(x, down_weight, down_bias, bits)), up_weight, up_bias, bits)
