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


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_matching_dtypes(op: str, x: torch.Tensor, *named: tuple[str, torch.Tensor | None]) -> None:
    """The input contract every implementation shares (eager ``F.linear``'s rule): outside autocast, the
    named tensors (weights multiplied with ``x``) must have ``x``'s dtype; under autocast for x's device any
    float dtypes are accepted (they are cast to the autocast dtype, as eager does). Raises a TypeError naming
    the tensors and dtypes before any kernel runs (after checking they share x's device)."""
    check_same_device(("x", x), *named)
    if torch.is_autocast_enabled(x.device.type):
        return
    bad = [(n, t.dtype) for n, t in named if t is not None and t.dtype != x.dtype]
    if bad:
        desc = ", ".join(f"{n} has dtype {dt}" for n, dt in bad)
        raise TypeError(f"{op}: x has dtype {x.dtype} but {desc}; they must match outside autocast (as for F.linear): "
                        f"cast the input or the module (e.g. module.to({x.dtype})), or run under torch.autocast")


def check_kernel_dtype(op: str, impl: str, dtype: torch.dtype) -> None:
    """An explicit ``impl="triton"`` with a compute dtype the kernels do not take raises a TypeError
    (``"auto"`` runs the reference instead, see ``_impl.resolve_impl``)."""
    if impl == "triton" and dtype not in KERNEL_DTYPES:
        raise TypeError(f"{op}: the Triton kernels compute in float32/float16/bfloat16, got {dtype}; "
                        "use impl='reference' (or 'auto') for float64")


def check_positive_int(owner: str, name: str, value) -> int:
    """``value`` as an int when it is one (a Python / numpy integer, not a bool) and > 0; else a one-line
    ValueError naming ``owner`` and the argument (no silent truncation of 8.7 to 8)."""
    from numbers import Integral

    if isinstance(value, bool) or not isinstance(value, Integral) or value <= 0:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
    return int(value)
