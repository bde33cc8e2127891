"""Helpers shared by the autograd Functions of the fused ops."""
from __future__ import annotations

import torch


def as_rows(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``x (..., d)`` → (contiguous ``(N, d)`` view/copy, leading shape) for row-wise kernels.

    Non-contiguous inputs (transposed views, slices) are copied once; contiguous ones are not.
    """
    lead = tuple(x.shape[:-1])
    return x.reshape(-1, x.shape[-1]).contiguous(), lead


def cast_for_compute(dtype: torch.dtype, *tensors: torch.Tensor | None):
    """Cast the given tensors to ``dtype`` (None passes through); used under autocast so the fused ops
    see what eager ``F.linear`` would (inputs and weights in the autocast dtype)."""
    return tuple(t if t is None or t.dtype == dtype else t.to(dtype) for t in tensors)
