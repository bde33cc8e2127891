"""MuFA (and AdaptFormer / Houlsby) through the fused bottleneck kernels of ``rspeft_fast.kernels.mufa``.

Layers, bottom-up:

* ``torch.ops.rspeft_fast.bottleneck_fwd`` / ``bottleneck_bwd``: ``torch.library`` custom ops around the
  generic launchers (``y = scale * ((GELU(x Wdᵀ + bd) * col_scale) Wuᵀ + bu) (+ base)``), with fake
  (meta) implementations, and ``register_autograd`` on the forward, so that ``torch.compile`` sees one
  opaque op each way (no graph break) and the forward op is differentiable on its own (EQAM can reuse it
  with ``col_scale = ones``).
* :class:`MuFAFunction`: the autograd Function the module uses: flattens ``x`` to rows, casts to the
  compute dtype (autocast), expands ``gate`` to ``col_scale``, calls the two ops, and reduces
  ``d col_scale`` to ``d gate`` per branch.
* :func:`mufa`: the functional entry point called by ``MuFAAdapter(impl="triton")``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .._impl import ImplUnavailableError, triton_available
from .._validate import check_float, check_last_dim, check_same_device, compute_dtype
from ._common import as_rows, cast_for_compute

__all__ = ["mufa", "MuFAFunction", "bottleneck_fwd_op", "bottleneck_bwd_op"]


def _kernels():
    from ..kernels import mufa as k

    return k


def _require_triton(device: torch.device) -> None:
    """Checked in the ops' real implementations (at run time, also under torch.compile), never a fallback."""
    ok, why = triton_available(device)
    if not ok:
        raise ImplUnavailableError(f"rspeft_fast bottleneck op: the Triton kernels cannot run here: {why}")


# ----------------------------------------------------------------------------------------------
# torch.library custom ops
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("rspeft_fast::bottleneck_fwd", mutates_args=())
def bottleneck_fwd_op(
    x: torch.Tensor,
    wd: torch.Tensor,
    bd: torch.Tensor,
    wu: torch.Tensor,
    bu: torch.Tensor,
    col_scale: torch.Tensor,
    scale: float,
    base: Optional[torch.Tensor],
    save_pre: bool,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(y, pre)``; ``pre`` is an empty tensor when ``save_pre`` is False."""
    _require_triton(x.device)
    y, pre = _kernels().bottleneck_fwd(x, wd, bd, wu, bu, col_scale, scale, base, save_pre, out_dtype)
    if pre is None:
        pre = x.new_empty((0,))
    return y, pre


@bottleneck_fwd_op.register_fake
def _(x, wd, bd, wu, bu, col_scale, scale, base, save_pre, out_dtype):
    y = x.new_empty(x.shape, dtype=out_dtype)
    pre = x.new_empty((x.shape[0], wd.shape[0])) if save_pre else x.new_empty((0,))
    return y, pre


@torch.library.custom_op("rspeft_fast::bottleneck_bwd", mutates_args=())
def bottleneck_bwd_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    pre: Optional[torch.Tensor],
    wd: torch.Tensor,
    bd: torch.Tensor,
    wu: torch.Tensor,
    col_scale: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(dx, dwd, dbd, dwu, dbu, dcol_scale)``; weight gradients in float32."""
    _require_triton(x.device)
    return _kernels().bottleneck_bwd(dy, x, pre, wd, bd, wu, col_scale, scale)


@bottleneck_bwd_op.register_fake
def _(dy, x, pre, wd, bd, wu, col_scale, scale):
    r, d = wd.shape
    f32 = dict(dtype=torch.float32)
    return (
        x.new_empty(x.shape),
        x.new_empty((r, d), **f32),
        x.new_empty((r,), **f32),
        x.new_empty((d, r), **f32),
        x.new_empty((d,), **f32),
        x.new_empty((r,), **f32),
    )


def _fwd_setup_context(ctx, inputs, output):
    x, wd, bd, wu, bu, col_scale, scale, base, save_pre, out_dtype = inputs
    _, pre = output
    ctx.save_for_backward(x, pre if save_pre else None, wd, bd, wu, col_scale)
    ctx.scale = scale
    ctx.has_base = base is not None
    ctx.dtypes = (bu.dtype, base.dtype if base is not None else None)
    ctx.mark_non_differentiable(pre)


def _fwd_backward(ctx, dy, _dpre):
    x, pre, wd, bd, wu, col_scale = ctx.saved_tensors
    dx, dwd, dbd, dwu, dbu, dcs = bottleneck_bwd_op(dy.contiguous(), x, pre, wd, bd, wu, col_scale, ctx.scale)
    bu_dtype, base_dtype = ctx.dtypes
    dbase = dy.to(base_dtype) if ctx.has_base else None
    return (dx, dwd.to(wd.dtype), dbd.to(bd.dtype), dwu.to(wu.dtype), dbu.to(bu_dtype), dcs,
            None, dbase, None, None)


bottleneck_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


# ----------------------------------------------------------------------------------------------
# autograd Function and functional entry point
# ----------------------------------------------------------------------------------------------
class MuFAFunction(torch.autograd.Function):
    """``delta = scale * (Σ_i gate[i] GELU(x Wd_iᵀ + bd_i) Wu_iᵀ + bu)`` (+ ``base``) over all branches at once.

    ``forward(x, down_weight, down_bias, up_weight, up_bias, gate, sizes, scale, base, save_pre,
    cdtype, out_dtype)``: ``cdtype`` is the compute dtype (autocast dtype or x's), ``out_dtype`` the
    dtype eager would return. Use :func:`mufa`, which validates inputs and picks both dtypes.
    """

    @staticmethod
    def forward(ctx, x, down_weight, down_bias, up_weight, up_bias, gate, sizes, scale, base, save_pre, cdtype, out_dtype):
        x2, _ = as_rows(x)
        x2, wd, bd, wu = cast_for_compute(cdtype, x2, down_weight, down_bias, up_weight)
        base2 = as_rows(base)[0] if base is not None else None
        col_scale = torch.cat([g.expand(r) for g, r in zip(gate.detach().float().unbind(0), sizes)])
        y, pre = bottleneck_fwd_op(x2, wd, bd, wu, up_bias, col_scale, scale, base2, save_pre, out_dtype)
        ctx.save_for_backward(x2, pre if save_pre else None, wd, bd, wu, col_scale)
        ctx.sizes = tuple(sizes)
        ctx.scale = scale
        ctx.x_meta = (x.shape, x.dtype)
        ctx.dtypes = (down_weight.dtype, down_bias.dtype, up_weight.dtype, up_bias.dtype, gate.dtype)
        ctx.base_meta = (base.shape, base.dtype) if base is not None else None
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, pre, wd, bd, wu, col_scale = ctx.saved_tensors
        x_shape, x_dtype = ctx.x_meta
        dy2 = dy.reshape(-1, dy.shape[-1]).contiguous()
        dx, dwd, dbd, dwu, dbu, dcs = bottleneck_bwd_op(dy2, x2, pre, wd, bd, wu, col_scale, ctx.scale)
        wd_t, bd_t, wu_t, bu_t, g_t = ctx.dtypes
        dgate = torch.stack([c.sum() for c in dcs.split(ctx.sizes)])
        dbase = None
        if ctx.base_meta is not None:
            # dy itself (as eager's AddBackward), never a fresh view of it: autograd may steal a view with a
            # use count of 1 as base.grad, which would then share storage with the caller's dy
            shape, dtype = ctx.base_meta
            dbase = (dy if dy.shape == shape else dy.reshape(shape)).to(dtype)
        return (
            dx.view(x_shape).to(x_dtype),
            dwd.to(wd_t),
            dbd.to(bd_t),
            dwu.to(wu_t),
            dbu.to(bu_t),
            dgate.to(g_t),
            None,
            None,
            dbase,
            None,
            None,
            None,
        )


def _check_inputs(x, down_weight, down_bias, up_weight, up_bias, gate, sizes, base):
    check_float(x, "x")
    for name, t in (("down_weight", down_weight), ("down_bias", down_bias), ("up_weight", up_weight),
                    ("up_bias", up_bias), ("gate", gate)):
        check_float(t, name)
    if down_weight.dim() != 2:
        raise ValueError(f"down_weight must be 2-D (R, d), got shape {tuple(down_weight.shape)}")
    r, d = down_weight.shape
    check_last_dim(x, d, "x")
    sizes = tuple(int(s) for s in sizes)
    if len(sizes) == 0 or any(s <= 0 for s in sizes) or sum(sizes) != r:
        raise ValueError(f"sizes {sizes} must be positive branch widths summing to R = down_weight.shape[0] = {r}")
    expected = {"down_bias": (down_bias, (r,)), "up_weight": (up_weight, (d, r)), "up_bias": (up_bias, (d,)),
                "gate": (gate, (len(sizes),))}
    for name, (t, shape) in expected.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if base is not None:
        check_float(base, "base")
        if base.shape != x.shape:
            raise ValueError(f"base must have the shape of x {tuple(x.shape)}, got {tuple(base.shape)}")
    check_same_device(("x", x), ("down_weight", down_weight), ("down_bias", down_bias), ("up_weight", up_weight),
                      ("up_bias", up_bias), ("gate", gate), ("base", base))
    return sizes


def mufa(
    x: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor,
    gate: torch.Tensor,
    sizes: Sequence[int],
    scale: float = 1.0,
    base: torch.Tensor | None = None,
    save_pre: bool = True,
) -> torch.Tensor:
    """Fused MuFA adapter (SPEC §1), same maths, shapes and dtypes as ``reference.mufa_ref``.

    ``x (..., d)`` → ``(..., d)``; any leading shape, non-contiguous inputs are copied once.
    Computes in the autocast dtype when autocast is on (else ``x.dtype``: float32/float16/bfloat16,
    with ``down``/``up`` weights in that dtype, as eager ``F.linear`` requires); returns the dtype eager
    would (``up_bias`` of higher precision promotes the output, e.g. float32 under bf16 autocast).
    ``save_pre=False`` saves memory (the (N, R) pre-activation) by recomputing it in the backward.
    Raises :class:`ImplUnavailableError` when the Triton kernels cannot run on x's device.
    """
    sizes = _check_inputs(x, down_weight, down_bias, up_weight, up_bias, gate, sizes, base)
    if not torch.compiler.is_compiling():  # fail before any work; under compile the op itself checks
        _require_triton(x.device)
    cdtype = compute_dtype(x)
    k = _kernels()
    if cdtype not in k.SUPPORTED_DTYPES:
        raise TypeError(f"mufa: the Triton kernels compute in float32/float16/bfloat16, got {cdtype}; "
                        "use impl='reference' for float64")
    if not torch.is_autocast_enabled(x.device.type):
        for name, t in (("down_weight", down_weight), ("down_bias", down_bias), ("up_weight", up_weight)):
            if t.dtype != x.dtype:
                raise TypeError(f"mufa: {name} has dtype {t.dtype} but x has {x.dtype}; they must match "
                                "outside autocast (as for F.linear)")
    out_dtype = torch.promote_types(cdtype, up_bias.dtype)
    return MuFAFunction.apply(x, down_weight, down_bias, up_weight, up_bias, gate, sizes, float(scale), base,
                              bool(save_pre), cdtype, out_dtype)
