"""Test helpers shipped with the package: per-dtype tolerances and a verbose allclose.

Rule (after flash-attention): a fused result is compared with a float32/float64 reference, and may be
off by at most ``factor`` times what the eager reference in the same dtype gets wrong, plus a floor.
"""
from __future__ import annotations

import torch

# (atol, rtol) per dtype, for comparing a kernel with the eager reference in that dtype.
TOLERANCES = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (2e-5, 2e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def tolerances(dtype: torch.dtype) -> tuple[float, float]:
    return TOLERANCES[dtype]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float | None = None, rtol: float | None = None, name: str = "") -> None:
    """``|actual - expected| <= atol + rtol * |expected|`` elementwise, with a report of where and how much.

    Shapes must match exactly; NaN must appear in the same places in both.
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    d_atol, d_rtol = TOLERANCES.get(actual.dtype, TOLERANCES[torch.float32])
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    if not torch.equal(nan_a, nan_e):
        raise AssertionError(f"{name}: NaN pattern differs ({int(nan_a.sum())} NaN in actual, {int(nan_e.sum())} expected)")
    a = a.masked_fill(nan_a, 0)
    e = e.masked_fill(nan_e, 0)
    err = (a - e).abs()
    bound = atol + rtol * e.abs()
    bad = err > bound
    if bad.any():
        idx = int(torch.argmax((err - bound).flatten()))
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), a.shape)) if a.dim() else ()
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{a.numel()} elements off (atol={atol:g}, rtol={rtol:g}); "
            f"max abs err {float(err.max()):.3e}, max rel err {float((err / e.abs().clamp_min(1e-12)).max()):.3e}; "
            f"worst at {where}: actual {float(a.flatten()[idx]):.6g} vs expected {float(e.flatten()[idx]):.6g}"
        )


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64."""
    a, e = actual.detach().double(), expected.detach().double()
    return float((a - e).norm() / e.norm().clamp_min(1e-30))
