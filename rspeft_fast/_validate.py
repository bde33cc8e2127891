"""Input checks shared by every op: errors that say what was expected."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {t.dtype}")


def check_last_dim(t: torch.Tensor, dim: int, name: str) -> None:
    if t.dim() < 1 or t.shape[-1] != dim:
        raise ValueError(f"{name} must have last dimension {dim} (shape (..., {dim})), got shape {tuple(t.shape)}")


def check_same_device(*named: tuple[str, torch.Tensor]) -> None:
    devs = {(n, t.device) for n, t in named if t is not None}
    uniq = {d for _, d in devs}
    if len(uniq) > 1:
        desc = ", ".join(f"{n} on {d}" for n, d in sorted(devs, key=lambda p: p[0]))
        raise RuntimeError(f"all tensors must be on one device; got {desc}")


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype active for ``device_type``, or None when autocast is off there."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """dtype the fused ops compute in for input ``x``: the autocast dtype if active, else ``x.dtype``.

    This mirrors what eager ``F.linear`` does under autocast (inputs and weights cast to the autocast
    dtype), so the fused ops return what the eager reference would.
    """
    ac = autocast_dtype(x.device.type)
    return ac if ac is not None else x.dtype
