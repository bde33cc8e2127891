"""MuFA (and AdaptFormer / Houlsby) through the fused bottleneck kernels of ``rspeft_fast.kernels.mufa``.

The op pattern of every fused op in this package (as ``ops/qlinear.py``, ``ops/mga.py``, ``ops/triplet.py``):

* ``torch.ops.rspeft_fast.bottleneck_fwd``: a ``torch.library`` custom op around the launcher
  (``y = scale * ((GELU(x Wdᵀ + bd) * col_scale) Wuᵀ + bu) (+ base)``, ``x (..., d)`` of any leading shape),
  with a fake (meta) implementation and its backward registered with ``register_autograd``: the op
  ``torch.ops.rspeft_fast.bottleneck_bwd`` (with its own fake). ``torch.compile`` sees one opaque op each
  way (no graph break).
* :func:`mufa`: the functional. It validates the inputs (one contract for every implementation), resolves
  ``impl`` (:func:`rspeft_fast._impl.resolve_impl`, the kernels' limits included) and runs either the eager
  reference or the fused kernels.

Two ways to the same kernels (issue #27: the host must cost less than the kernels):

* **eager** (the hot path): everything that depends only on (shapes, contiguity, dtypes, devices, sizes, scale,
  ``impl``, autocast, the fp32 matmul precision, the implementation switches in the environment) is checked
  and planned ONCE and kept in ``_PLANS`` (:class:`_Plan`: the resolved implementation, the kernels' launch
  plans with every non-tensor argument, the gate's column index). A call builds that key and runs
  :class:`_MuFAFunction` (a plain ``autograd.Function``: no ``torch.library`` dispatch layers) whose forward
  allocates and launches one kernel and whose backward allocates and launches five, the weight gradients
  written by the kernels in their final dtypes and the gate's gradient reduced per branch in the last launch:
  no torch ops besides allocations (and the casts when autocast changes the dtype). Nothing derived from a
  parameter's values is cached (the kernels read the gate through the column index), so an in-place update
  of a parameter needs no invalidation;
* **under torch.compile** (and for FakeTensor inputs): the custom ops above, so the graph holds one opaque op
  each way; ``gate`` expanded to ``col_scale`` by differentiable torch ops in the graph.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch._subclasses.fake_tensor import FakeTensor

import os

from .._impl import (ENV_FORCE, ImplUnavailableError, autocast_state, kernel_limits, register_plan_cache, resolve_impl,
                     triton_available)
from .._validate import (check_float, check_kernel_dtype, check_last_dim, check_matching_dtypes, check_same_device,
                         compute_dtype)
from ..reference.mufa import mufa_ref
from ._common import cast_for_compute

__all__ = ["mufa", "bottleneck_fwd_op", "bottleneck_bwd_op"]


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
    """``x (..., d)``, ``base`` None or ``(..., d)``: returns ``(y (..., d) in out_dtype, pre (N, R))``, ``N`` the
    number of rows of ``x``; ``pre`` is an empty tensor when ``save_pre`` is False."""
    _require_triton(x.device)
    d = x.shape[-1]
    rows = x.reshape(-1, d)
    base_rows = base.reshape(-1, d) if base is not None else None
    y, pre = _kernels().bottleneck_fwd(rows, wd, bd, wu, bu, col_scale, scale, base_rows, save_pre, out_dtype)[:2]
    if pre is None:
        pre = x.new_empty((0,))
    return y.view(x.shape), pre


@bottleneck_fwd_op.register_fake
def _(x, wd, bd, wu, bu, col_scale, scale, base, save_pre, out_dtype):
    y = x.new_empty(x.shape, dtype=out_dtype)
    pre = x.new_empty((x.numel() // x.shape[-1], wd.shape[0])) if save_pre else x.new_empty((0,))
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
    """``dy``, ``x`` ``(..., d)``, ``pre (N, R)`` or None: returns ``(dx (..., d), dwd, dbd, dwu, dbu, dcol_scale)``;
    weight gradients in float32."""
    _require_triton(x.device)
    d = x.shape[-1]
    dx, dwd, dbd, dwu, dbu, dcs = _kernels().bottleneck_bwd(dy.reshape(-1, d), x.reshape(-1, d), pre, wd, bd, wu,
                                                            col_scale, scale)[:6]
    return dx.view(x.shape), dwd, dbd, dwu, dbu, dcs


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
    ctx.dtypes = (bu.dtype, base.dtype if base is not None else None)
    ctx.mark_non_differentiable(pre)


def _fwd_backward(ctx, dy, _dpre):
    x, pre, wd, bd, wu, col_scale = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dwd, dbd, dwu, dbu, dcs = bottleneck_bwd_op(dy.contiguous(), x, pre, wd, bd, wu, col_scale, ctx.scale)
    bu_dtype, base_dtype = ctx.dtypes
    # d base is dy itself (as eager's AddBackward), never a fresh view of it: autograd may steal a view with
    # a use count of 1 as base.grad, which would then share storage with the caller's dy
    dbase = dy.to(base_dtype) if base_dtype is not None and need[7] else None
    return (dx if need[0] else None, dwd.to(wd.dtype), dbd.to(bd.dtype), dwu.to(wu.dtype), dbu.to(bu_dtype), dcs,
            None, dbase, None, None)


bottleneck_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


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
    check_matching_dtypes("mufa", x, ("down_weight", down_weight), ("down_bias", down_bias), ("up_weight", up_weight))
    return sizes


# ----------------------------------------------------------------------------------------------
# the eager hot path: checked, resolved and planned once per key
# ----------------------------------------------------------------------------------------------
class _Plan:
    """What a call of one key needs: the implementation, the compute/output dtypes, the launch plans."""

    __slots__ = ("impl", "sizes", "cdtype", "out_dtype", "cast", "fwd", "fwd_nograd", "ci", "bwd", "scale", "n", "d",
                 "r", "grad_dtypes", "gate_len", "base_dtype")

    def bwd_plan(self, dy_dtype: torch.dtype, gate_grad: bool, recompute: bool):
        key = (dy_dtype, gate_grad, recompute)
        p = self.bwd.get(key)
        if p is None:
            p = self.bwd[key] = _kernels().plan_bwd_launch(
                self.n, self.d, self.r, self.cdtype, dy_dtype=dy_dtype, recompute=recompute, scale=self.scale,
                n_gate=self.gate_len, gate_grad=gate_grad, grad_dtypes=self.grad_dtypes, device=self.ci.device)
        return p


_PLANS: dict = register_plan_cache({})
_MAX_PLANS = 512


def _plan_key(x, wd, bd, wu, bu, gate, sizes, scale, base, save_pre, impl):
    dev = x.device
    env = os.environ.get
    return (impl, x.shape, x.dtype, dev, x.is_contiguous(),
            wd.shape, wd.dtype, wd.device, bd.shape, bd.dtype, bd.device,
            wu.shape, wu.dtype, wu.device, bu.shape, bu.dtype, bu.device,
            gate.shape, gate.dtype, gate.device, sizes, scale,
            None if base is None else (base.shape, base.dtype, base.device), save_pre,
            autocast_state(dev.type), torch.get_float32_matmul_precision(),
            env("TRITON_INTERPRET"), env(ENV_FORCE))


def _make_plan(x, wd, bd, wu, bu, gate, sizes, scale, base, save_pre, impl) -> _Plan:
    """The full checks and resolution of :func:`mufa` (raising as they always did), then the launch plans."""
    sizes = _check_inputs(x, wd, bd, wu, bu, gate, sizes, base)
    cdtype = compute_dtype(x)
    check_kernel_dtype("mufa", impl, cdtype)
    limits = kernel_limits(_kernels, x.device, cdtype, n=x.numel() // x.shape[-1], d=x.shape[-1], r=wd.shape[0])
    p = _Plan()
    p.impl = resolve_impl("mufa", impl, x.device, limits=limits)
    p.sizes = sizes
    if p.impl == "reference":
        return p
    _require_triton(x.device)  # what the op checks at run time, once per plan
    k = _kernels()
    p.cdtype = cdtype
    p.cast = any(t.dtype != cdtype for t in (x, wd, bd, wu))
    p.out_dtype = torch.promote_types(cdtype, bu.dtype)
    p.scale = float(scale)
    p.n, p.d, p.r = x.numel() // x.shape[-1], x.shape[-1], wd.shape[0]
    p.gate_len = len(sizes)
    p.base_dtype = None if base is None else base.dtype
    p.grad_dtypes = (cdtype, cdtype, cdtype, bu.dtype, gate.dtype)
    p.ci = k.column_index(sizes, x.device)
    common = dict(out_dtype=p.out_dtype, base_dtype=p.base_dtype, bu_dtype=bu.dtype, cs_dtype=gate.dtype, scale=p.scale)
    p.fwd = k.plan_fwd_launch(p.n, p.d, p.r, cdtype, save_pre=bool(save_pre), **common)
    p.fwd_nograd = k.plan_fwd_launch(p.n, p.d, p.r, cdtype, save_pre=False, **common)
    p.bwd = {}
    return p


def _plan_for(x, wd, bd, wu, bu, gate, sizes, scale, base, save_pre, impl) -> _Plan:
    key = _plan_key(x, wd, bd, wu, bu, gate, sizes, scale, base, save_pre, impl)
    p = _PLANS.get(key)
    if p is None:
        p = _make_plan(x, wd, bd, wu, bu, gate, sizes, scale, base, save_pre, impl)
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = p
    return p


class _MuFAFunction(torch.autograd.Function):
    """The fused MuFA with autograd, for eager calls (the kernels of the custom ops, planned once)."""

    @staticmethod
    def forward(ctx, x, wd, bd, wu, bu, gate, base, plan):
        y, pre = _kernels().run_fwd(plan.fwd, x, wd, bd, wu, bu, gate, plan.ci, base, x.shape)
        ctx.save_for_backward(x, pre, wd, bd, wu, gate)
        ctx.plan = plan
        return y

    @staticmethod
    def backward(ctx, dy):
        x, pre, wd, bd, wu, gate = ctx.saved_tensors
        plan = ctx.plan
        need = ctx.needs_input_grad
        dy = dy.contiguous()
        bplan = plan.bwd_plan(dy.dtype, need[5], pre is None)
        dx, dwd, dbd, dwu, dbu, dg = _kernels().run_bwd(bplan, dy, x, pre, wd, bd, wu, gate, plan.ci, x.shape)
        # d base is dy itself (as eager's AddBackward), never a fresh view of it (see _fwd_backward)
        dbase = dy.to(plan.base_dtype) if need[6] else None
        return (dx if need[0] else None, dwd if need[1] else None, dbd if need[2] else None,
                dwu if need[3] else None, dbu if need[4] else None, dg, dbase, None)


def _mufa_fused(x, wd, bd, wu, bu, gate, base, plan: _Plan) -> torch.Tensor:
    if plan.cast:
        x, wd, bd, wu = cast_for_compute(plan.cdtype, x, wd, bd, wu)
    if not x.is_contiguous():
        x = x.contiguous()
    if base is not None and not base.is_contiguous():
        base = base.contiguous()
    if not (wd.is_contiguous() and wu.is_contiguous()):
        wd, wu, bd = wd.contiguous(), wu.contiguous(), bd.contiguous()
    if torch.is_grad_enabled() and (x.requires_grad or wd.requires_grad or bd.requires_grad or wu.requires_grad
                                    or bu.requires_grad or gate.requires_grad
                                    or (base is not None and base.requires_grad)):
        return _MuFAFunction.apply(x, wd, bd, wu, bu, gate, base, plan)
    return _kernels().run_fwd(plan.fwd_nograd, x, wd, bd, wu, bu, gate, plan.ci, base, x.shape)[0]


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
    *,
    impl: str = "triton",
) -> torch.Tensor:
    """MuFA adapter (SPEC §1), same maths, shapes and dtypes as ``reference.mufa_ref``.

    ``x (..., d)`` → ``(..., d)``; any leading shape (zero rows included); non-contiguous inputs are copied
    once. ``down_weight (R, d)``, ``down_bias (R,)``, ``up_weight (d, R)``, ``up_bias (d,)``, ``gate (n,)``,
    ``sizes`` the n branch widths summing to R; ``base`` None or of x's shape (returns ``base + delta``).
    Dtypes as eager PyTorch: outside autocast ``x``, ``down_*`` and ``up_weight`` share one dtype (else a
    TypeError naming them, for every implementation); under autocast they are cast to the autocast dtype.
    The output has the dtype eager returns (``up_bias`` of higher precision promotes it, e.g. float32
    under bf16 autocast). ``save_pre=False`` saves memory (the (N, R) pre-activation) by recomputing it
    in the backward.

    ``impl``: ``"triton"`` (default: the fused kernels; :class:`ImplUnavailableError` where they cannot run,
    before any launch), ``"reference"``, or ``"auto"`` (the kernels on CUDA inside their limits, else the
    reference, with one warning per limit).
    """
    if not (torch.compiler.is_compiling() or isinstance(x, FakeTensor)):
        plan = _plan_for(x, down_weight, down_bias, up_weight, up_bias, gate,
                         sizes if type(sizes) is tuple else tuple(int(s) for s in sizes), scale, base, save_pre, impl)
        if plan.impl == "reference":
            return mufa_ref(x, down_weight, down_bias, up_weight, up_bias, gate, plan.sizes, scale, base)
        return _mufa_fused(x, down_weight, down_bias, up_weight, up_bias, gate, base, plan)
    sizes = _check_inputs(x, down_weight, down_bias, up_weight, up_bias, gate, sizes, base)
    cdtype = compute_dtype(x)
    check_kernel_dtype("mufa", impl, cdtype)
    impl = resolve_impl("mufa", impl, x.device, limits=None)  # under compile the op itself checks at run time
    if impl == "reference":
        return mufa_ref(x, down_weight, down_bias, up_weight, up_bias, gate, sizes, scale, base)
    x_c, wd, bd, wu = cast_for_compute(cdtype, x, down_weight, down_bias, up_weight)
    out_dtype = torch.promote_types(cdtype, up_bias.dtype)
    col_scale = torch.cat([g.expand(r) for g, r in zip(gate.float().unbind(0), sizes)])
    y, _ = bottleneck_fwd_op(x_c.contiguous(), wd.contiguous(), bd, wu.contiguous(), up_bias, col_scale,
                             float(scale), base, bool(save_pre), out_dtype)
    return y
