"""Packed Q-Linear weights (inference storage), eager reference.

``pack_weight(W, bits)`` → ``(qweight, scale)``: the integer codes of SPEC §1's quantiser
(``reference.qlinear.quantize_weight``) and the per-row float32 scales.

* ``bits > 4``: ``qweight (out, in)`` int8.
* ``bits <= 4``: ``qweight (out, ceil(in / 2))`` uint8, two codes per byte: code ``2j`` in the low nibble,
  code ``2j + 1`` in the high nibble, each in 4-bit two's complement; an odd ``in`` is padded with a 0 code.

The dequantised weight is ``codes * scale[:, None]`` (float32), the same ``Wq`` as the fake-quantised
weight, so a packed layer's output equals the fake-quant output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .qlinear import check_bits, quantize_weight


def storage_dtype(bits: int) -> torch.dtype:
    """uint8 (two int4 per byte) for ``bits <= 4``, int8 otherwise."""
    return torch.uint8 if check_bits(bits) <= 4 else torch.int8


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Integer codes ``(out, in)`` in ``[-8, 7]`` (any int/float dtype) → uint8 ``(out, ceil(in/2))``."""
    c = codes.to(torch.int16)
    if c.numel() and (int(c.min()) < -8 or int(c.max()) > 7):
        raise ValueError("int4 codes must lie in [-8, 7]")
    if c.shape[1] % 2:
        c = F.pad(c, (0, 1))
    nib = c & 0xF
    return (nib[:, 0::2] | (nib[:, 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """uint8 ``(out, ceil(in/2))`` → int8 codes ``(out, in_features)``."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed int4 weights must be uint8, got {packed.dtype}")
    if packed.shape[1] != (in_features + 1) // 2:
        raise ValueError(f"packed shape {tuple(packed.shape)} does not hold in_features={in_features}")
    p = packed.to(torch.int16)
    lo, hi = p & 0xF, (p >> 4) & 0xF
    both = torch.stack((lo, hi), dim=-1).reshape(p.shape[0], -1)[:, :in_features]
    return (both - ((both >> 3) << 4)).to(torch.int8)


def pack_weight(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float weight ``(out, in)`` → ``(qweight, scale)`` as described in the module docstring."""
    q, s = quantize_weight(weight, bits)
    if bits <= 4:
        return pack_int4(q), s
    return q.to(torch.int8), s


def unpack_codes(qweight: torch.Tensor, in_features: int) -> torch.Tensor:
    """Integer codes ``(out, in)`` (int8) of packed storage (int8 or uint8 int4 pairs)."""
    if qweight.dtype == torch.int8:
        if qweight.shape[1] != in_features:
            raise ValueError(f"int8 qweight of shape {tuple(qweight.shape)} does not hold in_features={in_features}")
        return qweight
    return unpack_int4(qweight, in_features)


def dequantize(qweight: torch.Tensor, scale: torch.Tensor, in_features: int) -> torch.Tensor:
    """``Wq = codes * scale[:, None]`` in float32."""
    return unpack_codes(qweight, in_features).float() * scale.float()[:, None]


def qlinear_packed_ref(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, in_features: int) -> torch.Tensor:
    """``y = x Wqᵀ + bias`` from packed storage; computes in the autocast dtype if on, else ``x.dtype``."""
    w = dequantize(qweight, scale, in_features)
    if not torch.is_autocast_enabled(x.device.type):
        w = w.to(x.dtype)
        bias = None if bias is None else bias.to(x.dtype)
    return F.linear(x, w, bias)
