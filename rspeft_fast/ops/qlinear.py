"""Q-Linear and EQAM: ``torch.library`` custom ops over the Triton kernels of ``kernels/qlinear.py``,
their autograd (straight-through estimator) and the functional entry points.

Ops (each with a fake impl, so ``torch.compile`` sees one opaque op of known shape, no graph break):

* ``rspeft_fast::qlinear_fwd(x, weight, bias, bits, gelu, save_pre) -> (y, pre, scale)`` and its
  backward ``rspeft_fast::qlinear_bwd``, tied together with ``register_autograd``;
* ``rspeft_fast::eqam_fwd`` / ``rspeft_fast::eqam_bwd``: the fused EQAM adapter (see :func:`eqam`);
* ``rspeft_fast::qlinear_packed(x, qweight, scale, bias, in_features, gelu) -> y``: inference only.

Functionals: :func:`qlinear`, :func:`eqam`, :func:`qlinear_packed`, :func:`eqam_packed`. They take ``x`` of any
leading shape (non-contiguous is fine: copied once to rows), compute in ``compute_dtype(x)`` (the autocast
dtype when autocast is on) with float32 accumulation, and keep the master weight in its own dtype (the
quantiser always runs in float32, as in the reference).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import os

from torch._subclasses.fake_tensor import FakeTensor
from torch.utils.weak import WeakIdKeyDictionary

from .._impl import ENV_FORCE, autocast_state, kernel_limits, register_plan_cache, resolve_impl
from .._validate import (check_float, check_kernel_dtype, check_last_dim, check_matching_dtypes, check_same_device,
                         compute_dtype)
from ..reference.qlinear import check_bits, eqam_ref, qlinear_ref
from ..reference.qlinear_pack import qlinear_packed_ref
from ._common import as_rows, cast_for_compute

__all__ = ["qlinear_rows", "qlinear", "eqam", "qlinear_packed", "eqam_packed", "PackedLinear"]


def _kernels():
    """``rspeft_fast.kernels.qlinear``, imported when a fused path runs (the reference needs no Triton)."""
    from ..kernels import qlinear as k

    return k


def _grad_or_none(grad: Tensor, wanted: bool) -> Optional[Tensor]:
    """The gradient a backward returns for an input: ``grad`` if that input needs one, else None."""
    return grad if wanted else None


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def _limits(x: Tensor, out_features: int, in_features: int, bits: int | None = None):
    """``limits=`` of resolve_impl: the Q-Linear kernels' ``why_unsupported`` for ``x (m, k) -> (m, n)`` rows
    (their naming; None under torch.compile, where the op checks at run time)."""
    if torch.compiler.is_compiling():
        return None
    shapes = dict(m=x.numel() // max(x.shape[-1], 1), n=int(out_features), k=int(in_features))
    if bits is not None:
        shapes["bits"] = int(bits)
    return kernel_limits(_kernels, x.device, compute_dtype(x), **shapes)


# ----------------------------------------------------------------------------- Q-Linear (training)


@torch.library.custom_op("rspeft_fast::qlinear_fwd", mutates_args=())
def _qlinear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], bits: int, gelu: bool, save_pre: bool) -> tuple[Tensor, Tensor, Tensor]:
    scale = _kernels().row_scales(weight, bits)
    y, pre = _kernels().qlinear_fwd(x, weight, scale, bias, bits, gelu=gelu, save_pre=save_pre)
    return y, (pre if pre is not None else x.new_empty(0)), scale


@_qlinear_fwd.register_fake
def _(x, weight, bias, bits, gelu, save_pre):
    m, n = x.shape[0], weight.shape[0]
    pre = x.new_empty(m, n) if save_pre else x.new_empty(0)
    return x.new_empty(m, n), pre, weight.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("rspeft_fast::qlinear_bwd", mutates_args=())
def _qlinear_bwd(
    dy: Tensor, x: Tensor, weight: Tensor, scale: Tensor, pre: Tensor,
    bits: int, gelu: bool, has_bias: bool, needs_dx: bool, needs_dw: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = _kernels().qlinear_bwd(dy, x, weight, scale, pre if gelu else None, bits, gelu, has_bias, needs_dx, needs_dw)
    # unused outputs: distinct empty tensors (custom-op outputs may not alias each other)
    return (
        dx if dx is not None else dy.new_empty(0),
        dw if dw is not None else weight.new_empty(0),
        db if db is not None else dy.new_empty(0, dtype=torch.float32),
    )


@_qlinear_bwd.register_fake
def _(dy, x, weight, scale, pre, bits, gelu, has_bias, needs_dx, needs_dw):
    m, n = dy.shape
    k = x.shape[1]
    dx = dy.new_empty(m, k) if needs_dx else dy.new_empty(0)
    dw = weight.new_empty(n, k) if needs_dw else weight.new_empty(0)
    db = dy.new_empty(n, dtype=torch.float32) if has_bias else dy.new_empty(0, dtype=torch.float32)
    return dx, dw, db


def _qlinear_setup(ctx, inputs, output):
    x, weight, bias, bits, gelu, save_pre = inputs
    _, pre, scale = output
    ctx.save_for_backward(x, weight, scale, pre)
    ctx.bits, ctx.gelu, ctx.save_pre = bits, gelu, save_pre
    ctx.bias_dtype = None if bias is None else bias.dtype


def _qlinear_backward(ctx, dy, _dpre, _dscale):
    x, weight, scale, pre = ctx.saved_tensors
    if ctx.gelu and not ctx.save_pre:
        raise RuntimeError("qlinear_fwd was called with save_pre=False, so its GELU epilogue cannot be differentiated")
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    has_bias = ctx.bias_dtype is not None and need_b
    dx, dw, db = _qlinear_bwd(dy.contiguous(), x, weight, scale, pre, ctx.bits, ctx.gelu, has_bias, need_x, need_w)
    return (
        _grad_or_none(dx, need_x),
        _grad_or_none(dw, need_w),
        db.to(ctx.bias_dtype) if has_bias else None,
        None, None, None,
    )


_qlinear_fwd.register_autograd(_qlinear_backward, setup_context=_qlinear_setup)


def qlinear_rows(x: Tensor, weight: Tensor, bias: Optional[Tensor], bits: int, gelu: bool = False) -> Tensor:
    """The fused Q-Linear on rows, differentiable: ``[GELU](x (M, in) Wqᵀ + bias)`` → ``(M, out)``.

    The ``rspeft_fast::qlinear_fwd`` custom op, whose autograd is registered with
    ``torch.library.register_autograd`` (backward: the ``rspeft_fast::qlinear_bwd`` op), so ``torch.compile``
    sees one op in the forward and one in the backward. Inputs unchecked: use :func:`qlinear`.
    """
    save_pre = bool(gelu) and torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    y, _, _ = _qlinear_fwd(x, weight, bias, bits, bool(gelu), save_pre)
    return y


def _check_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], name: str = "weight") -> None:
    check_float(x, "x")
    check_float(weight, name)
    if weight.dim() != 2:
        raise ValueError(f"{name} must be 2-D (out, in), got shape {tuple(weight.shape)}")
    check_last_dim(x, weight.shape[1], "x")
    if bias is not None:
        check_float(bias, "bias")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    check_same_device(("x", x), (name, weight), ("bias", bias))


def _rows(x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """``x`` cast to the compute dtype and flattened to contiguous rows, with its leading shape."""
    (xc,) = cast_for_compute(compute_dtype(x), x)
    return as_rows(xc)


def _resolve(op: str, impl: str, x: Tensor, limits) -> str:
    check_kernel_dtype(op, impl, compute_dtype(x))
    return resolve_impl(op, impl, x.device, limits=limits)


def qlinear(x: Tensor, weight: Tensor, bias: Optional[Tensor], bits: int, gelu: bool = False, *,
            impl: str = "triton") -> Tensor:
    """Q-Linear ``[GELU](x Wqᵀ + bias)`` (SPEC §1): ``x (..., in)``, ``weight (out, in)``, ``bias (out,)`` or None
    → ``(..., out)``; straight-through gradients to ``x``, ``weight`` and ``bias``.

    Dtypes as eager ``F.linear``: outside autocast ``x``, ``weight`` and ``bias`` share one dtype (else a
    TypeError naming them, for every implementation); the quantiser runs in float32 whatever the weight's
    dtype. ``impl``: ``"triton"`` (default: the fused kernels, CUDA or CPU under ``TRITON_INTERPRET=1``),
    ``"reference"`` or ``"auto"`` (see :func:`rspeft_fast._impl.resolve_impl`).
    """
    check_bits(bits)
    _check_linear(x, weight, bias)
    check_matching_dtypes("qlinear", x, ("weight", weight), ("bias", bias))
    if _resolve("qlinear", impl, x, _limits(x, weight.shape[0], weight.shape[1], bits)) == "reference":
        y = qlinear_ref(x, weight, bias, bits)
        return F.gelu(y) if gelu else y
    x2, lead = _rows(x)
    y = qlinear_rows(x2, weight, bias, bits, gelu)
    return y.reshape(*lead, weight.shape[0])


# ----------------------------------------------------------------------------- EQAM (training)
#
# Fused path: the two small weights are fake-quantised into (R, d) / (d, R) tensors in the compute dtype
# (one tiny launch each, ``kernels.qlinear.fake_quant``), then ONE launch of the shared bottleneck kernel
# of ``kernels/mufa.py`` (``col_scale = 1``, ``scale = 1``) computes ``(GELU(x Wdqᵀ + bd)) Wuqᵀ + bu``
# keeping the bottleneck on chip. Its backward (``bottleneck_bwd``) gives gradients with respect to the
# quantised weights, which the straight-through estimator passes on unchanged to the master weights.
# Bottlenecks wider than FUSED_MAX_RANK (padded) use two Q-Linear launches instead (GELU epilogue on the first).

FUSED_MAX_RANK = 256


def _eqam_weights(down_w, down_b, up_w, up_b, bits, dtype):
    r, d = down_w.shape
    wdq, _ = _kernels().fake_quant(down_w, bits, dtype)
    wuq, _ = _kernels().fake_quant(up_w, bits, dtype)
    bd = down_b.to(dtype) if down_b is not None else down_w.new_zeros(r, dtype=dtype)
    bu = up_b if up_b is not None else up_w.new_zeros(up_w.shape[0], dtype=torch.float32)
    ones = torch.ones(r, device=down_w.device, dtype=torch.float32)
    return wdq, bd, wuq, bu, ones


@torch.library.custom_op("rspeft_fast::eqam_fwd", mutates_args=())
def _eqam_fwd(x: Tensor, down_w: Tensor, down_b: Optional[Tensor], up_w: Tensor, up_b: Optional[Tensor], bits: int, save_pre: bool) -> tuple[Tensor, Tensor]:
    from ..kernels.mufa import bottleneck_fwd

    wdq, bd, wuq, bu, ones = _eqam_weights(down_w, down_b, up_w, up_b, bits, x.dtype)
    y, pre = bottleneck_fwd(x, wdq, bd, wuq, bu, ones, 1.0, save_pre=save_pre)
    return y, (pre if pre is not None else x.new_empty(0))


@_eqam_fwd.register_fake
def _(x, down_w, down_b, up_w, up_b, bits, save_pre):
    n = x.shape[0]
    pre = x.new_empty(n, down_w.shape[0]) if save_pre else x.new_empty(0)
    return x.new_empty(n, up_w.shape[0]), pre


@torch.library.custom_op("rspeft_fast::eqam_bwd", mutates_args=())
def _eqam_bwd(dy: Tensor, x: Tensor, pre: Tensor, down_w: Tensor, down_b: Optional[Tensor], up_w: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    from ..kernels.mufa import bottleneck_bwd

    wdq, bd, wuq, _, ones = _eqam_weights(down_w, down_b, up_w, None, bits, x.dtype)
    dx, dwd, dbd, dwu, dbu, _ = bottleneck_bwd(dy, x, pre if pre.numel() or x.shape[0] == 0 else None, wdq, bd, wuq, ones, 1.0)
    return dx, dwd, dbd, dwu, dbu


@_eqam_bwd.register_fake
def _(dy, x, pre, down_w, down_b, up_w, bits):
    r, d = down_w.shape
    f32 = dict(dtype=torch.float32)
    return x.new_empty(x.shape), x.new_empty(r, d, **f32), x.new_empty(r, **f32), x.new_empty(d, r, **f32), x.new_empty(d, **f32)


def _eqam_setup(ctx, inputs, output):
    x, down_w, down_b, up_w, up_b, bits, _ = inputs
    ctx.save_for_backward(x, output[1], down_w, down_b, up_w)
    ctx.bits = bits
    ctx.dtypes = tuple(None if t is None else t.dtype for t in (down_w, down_b, up_w, up_b))


def _eqam_backward(ctx, dy, _dpre):
    x, pre, down_w, down_b, up_w = ctx.saved_tensors
    dx, dwd, dbd, dwu, dbu = _eqam_bwd(dy.contiguous(), x, pre, down_w, down_b, up_w, ctx.bits)
    need = ctx.needs_input_grad
    grads = [dx if need[0] else None]
    for g, dt, n in zip((dwd, dbd, dwu, dbu), ctx.dtypes, need[1:5]):
        grads.append(g.to(dt) if (n and dt is not None) else None)
    return (*grads, None, None)


_eqam_fwd.register_autograd(_eqam_backward, setup_context=_eqam_setup)


# ----------------------------------------------------------------------------- EQAM: the eager hot path
#
# As MuFA's (ops/mufa.py): checks, resolution and the bottleneck launch plans once per key (_EQAM_PLANS), a plain
# autograd.Function straight to the kernels (the custom ops above stay what torch.compile sees). Derived tensors:
# the fake-quantised weights, kept per parameter (_QUANT, weakly keyed) and remade when the parameter's
# ``_version`` or storage changes (an optimizer step, ``load_state_dict``, ``.to()``): so inference quantises once,
# and a training step once in the forward, the backward reusing them. Writes that bypass the version counter
# (``p.data.copy_(...)``) are not seen: use ``torch.no_grad(): p.copy_(...)``. Constant tensors (zero biases,
# the unit column scale and its index) are made once per (shape, dtype, device).
_EQAM_PLANS: dict = register_plan_cache({})
_QUANT = WeakIdKeyDictionary()
_CONST: dict = register_plan_cache({})
_FQ_PLANS: dict = register_plan_cache({})


def _const(kind: str, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    key = (kind, n, dtype, device)
    t = _CONST.get(key)
    if t is None:
        t = _CONST[key] = (torch.zeros if kind == "zeros" else torch.ones)(n, dtype=dtype, device=device)
    return t


def _quantized(w: Tensor, bits: int, dtype: torch.dtype) -> Tensor:
    """``fake_quant(w, bits, dtype)``, remade only when ``w`` changed (its ``_version`` or storage)."""
    c = _QUANT.get(w)
    v, ptr = w._version, w.data_ptr()
    if c is not None and c[0] == v and c[1] == ptr and c[2] == bits and c[3] == dtype:
        return c[4]
    key = (w.shape, w.stride(), w.dtype, bits, dtype, w.device)
    plan = _FQ_PLANS.get(key)
    if plan is None:
        plan = _FQ_PLANS[key] = _kernels().plan_fake_quant(w.shape[0], w.shape[1], bits, w.dtype, dtype, w.device,
                                                           w.stride())
    with torch.no_grad():
        q = _kernels().run_fake_quant(plan, w)
    _QUANT[w] = (v, ptr, bits, dtype, q)
    return q


class _EqamPlan:
    __slots__ = ("impl", "fused", "cdtype", "r", "d", "n", "fwd", "fwd_nograd", "ci", "cs", "bd0", "bu0", "grad_dtypes",
                 "bwd", "cast")

    def bwd_plan(self, dy_dtype: torch.dtype, recompute: bool):
        key = (dy_dtype, recompute)
        p = self.bwd.get(key)
        if p is None:
            p = self.bwd[key] = _kernels_mufa().plan_bwd_launch(
                self.n, self.d, self.r, self.cdtype, dy_dtype=dy_dtype, recompute=recompute, n_gate=1, gate_grad=False,
                grad_dtypes=self.grad_dtypes, device=self.ci.device)
        return p


def _kernels_mufa():
    from ..kernels import mufa as k

    return k


def _eqam_key(x, down_w, down_b, up_w, up_b, bits, impl):
    dev = x.device
    env = os.environ.get
    return (impl, x.shape, x.dtype, dev, x.is_contiguous(), down_w.shape, down_w.dtype, down_w.device,
            None if down_b is None else (down_b.shape, down_b.dtype, down_b.device), up_w.shape, up_w.dtype, up_w.device,
            None if up_b is None else (up_b.shape, up_b.dtype, up_b.device), bits,
            autocast_state(dev.type), torch.get_float32_matmul_precision(),
            env("TRITON_INTERPRET"), env(ENV_FORCE))


def _eqam_check(x, down_w, down_b, up_w, up_b, bits) -> None:
    check_bits(bits)
    _check_linear(x, down_w, down_b, "down_w")
    check_float(up_w, "up_w")
    if up_w.dim() != 2 or up_w.shape != (down_w.shape[1], down_w.shape[0]):
        raise ValueError(f"up_w must have shape {(down_w.shape[1], down_w.shape[0])}, got {tuple(up_w.shape)}")
    if up_b is not None:
        check_float(up_b, "up_b")
        if up_b.shape != (up_w.shape[0],):
            raise ValueError(f"up_b must have shape ({up_w.shape[0]},), got {tuple(up_b.shape)}")
    check_same_device(("x", x), ("down_w", down_w), ("up_w", up_w), ("down_b", down_b), ("up_b", up_b))
    check_matching_dtypes("eqam", x, ("down_w", down_w), ("down_b", down_b), ("up_w", up_w), ("up_b", up_b))


def _eqam_plan(x, down_w, down_b, up_w, up_b, bits, impl) -> _EqamPlan:
    key = _eqam_key(x, down_w, down_b, up_w, up_b, bits, impl)
    p = _EQAM_PLANS.get(key)
    if p is not None:
        return p
    _eqam_check(x, down_w, down_b, up_w, up_b, bits)
    p = _EqamPlan()
    p.impl = _resolve("eqam", impl, x, _limits(x, down_w.shape[0], down_w.shape[1], bits))
    p.fused = p.impl != "reference" and max(16, _next_pow2(down_w.shape[0])) <= FUSED_MAX_RANK
    if p.fused:
        k = _kernels_mufa()
        cdt = p.cdtype = compute_dtype(x)
        dev = x.device
        p.r, p.d = down_w.shape
        p.n = x.numel() // max(p.d, 1)
        p.cast = x.dtype != cdt or (down_b is not None and down_b.dtype != cdt)
        p.ci = k.column_index((p.r,), dev)
        p.cs = _const("ones", 1, torch.float32, dev)
        p.bd0 = _const("zeros", p.r, cdt, dev) if down_b is None else None
        p.bu0 = _const("zeros", p.d, torch.float32, dev) if up_b is None else None
        bu_dtype = torch.float32 if up_b is None else up_b.dtype
        p.grad_dtypes = (down_w.dtype, cdt if down_b is None else down_b.dtype, up_w.dtype, bu_dtype, torch.float32)
        common = dict(out_dtype=cdt, bu_dtype=bu_dtype)  # as eager F.linear under autocast, whatever the bias dtype
        p.fwd = k.plan_fwd_launch(p.n, p.d, p.r, cdt, save_pre=True, **common)
        p.fwd_nograd = k.plan_fwd_launch(p.n, p.d, p.r, cdt, save_pre=False, **common)
        p.bwd = {}
    if len(_EQAM_PLANS) >= 512:
        _EQAM_PLANS.clear()
    _EQAM_PLANS[key] = p
    return p


class _EQAMFunction(torch.autograd.Function):
    """The fused EQAM with the straight-through estimator, for eager calls (the kernels of ``eqam_fwd``)."""

    @staticmethod
    def forward(ctx, x, down_w, bd, up_w, bu, plan, bits):
        wdq, wuq = _quantized(down_w, bits, plan.cdtype), _quantized(up_w, bits, plan.cdtype)
        y, pre = _kernels_mufa().run_fwd(plan.fwd, x, wdq, bd, wuq, bu, plan.cs, plan.ci, None, x.shape)
        ctx.save_for_backward(x, pre, wdq, bd, wuq)
        ctx.plan = plan
        return y

    @staticmethod
    def backward(ctx, dy):
        x, pre, wdq, bd, wuq = ctx.saved_tensors
        plan = ctx.plan
        need = ctx.needs_input_grad
        dy = dy.contiguous()
        dx, dwd, dbd, dwu, dbu, _ = _kernels_mufa().run_bwd(plan.bwd_plan(dy.dtype, pre is None), dy, x, pre, wdq, bd,
                                                            wuq, plan.cs, plan.ci, x.shape)
        return (dx if need[0] else None, dwd if need[1] else None, dbd if need[2] else None,
                dwu if need[3] else None, dbu if need[4] else None, None, None)


def _eqam_fused(x, down_w, down_b, up_w, up_b, bits, plan: _EqamPlan) -> Tensor:
    if plan.cast:
        x, down_b = cast_for_compute(plan.cdtype, x, down_b)
    if not x.is_contiguous():
        x = x.contiguous()
    bd = plan.bd0 if down_b is None else down_b
    bu = plan.bu0 if up_b is None else up_b
    if torch.is_grad_enabled() and (x.requires_grad or down_w.requires_grad or up_w.requires_grad or bd.requires_grad
                                    or bu.requires_grad):
        return _EQAMFunction.apply(x, down_w, bd, up_w, bu, plan, bits)
    wdq, wuq = _quantized(down_w, bits, plan.cdtype), _quantized(up_w, bits, plan.cdtype)
    return _kernels_mufa().run_fwd(plan.fwd_nograd, x, wdq, bd, wuq, bu, plan.cs, plan.ci, None, x.shape)[0]


def eqam(x: Tensor, down_w: Tensor, down_b: Optional[Tensor], up_w: Tensor, up_b: Optional[Tensor], bits: int, *,
         impl: str = "triton") -> Tensor:
    """EQAM delta ``QLinear_up(GELU(QLinear_down(x)))``: ``x (..., d)`` → ``(..., d)``, STE gradients to all.

    ``down_w (R, d)``, ``down_b (R,)`` or None, ``up_w (d, R)``, ``up_b (d,)`` or None; dtypes as
    :func:`qlinear`. Fused: one bottleneck launch (forward) when the padded ``R`` is at most
    ``FUSED_MAX_RANK``, else two fused Q-Linear launches. ``impl`` as :func:`qlinear`.
    """
    if not (torch.compiler.is_compiling() or isinstance(x, FakeTensor)):
        plan = _eqam_plan(x, down_w, down_b, up_w, up_b, bits, impl)
        if plan.fused:
            return _eqam_fused(x, down_w, down_b, up_w, up_b, bits, plan)
        if plan.impl == "reference":
            return eqam_ref(x, down_w, down_b, up_w, up_b, bits)
        x2, lead = _rows(x)
        h = qlinear_rows(x2, down_w, down_b, bits, True)
        return qlinear_rows(h, up_w, up_b, bits, False).reshape(*lead, up_w.shape[0])
    _eqam_check(x, down_w, down_b, up_w, up_b, bits)
    if _resolve("eqam", impl, x, _limits(x, down_w.shape[0], down_w.shape[1], bits)) == "reference":
        return eqam_ref(x, down_w, down_b, up_w, up_b, bits)
    x2, lead = _rows(x)
    if max(16, _next_pow2(down_w.shape[0])) <= FUSED_MAX_RANK:
        save_pre = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x2, down_w, down_b, up_w, up_b)
        )
        y, _ = _eqam_fwd(x2, down_w, down_b, up_w, up_b, bits, save_pre)
    else:
        h = qlinear_rows(x2, down_w, down_b, bits, True)
        y = qlinear_rows(h, up_w, up_b, bits, False)
    return y.reshape(*lead, up_w.shape[0])


# ----------------------------------------------------------------------------- packed (inference)


@torch.library.custom_op("rspeft_fast::qlinear_packed", mutates_args=())
def _qlinear_packed(x: Tensor, qweight: Tensor, scale: Tensor, bias: Optional[Tensor], in_features: int, gelu: bool) -> Tensor:
    y, _ = _kernels().qlinear_fwd(x, qweight, scale, bias, gelu=gelu, mode=_mode(qweight), in_features=in_features)
    return y


@_qlinear_packed.register_fake
def _(x, qweight, scale, bias, in_features, gelu):
    return x.new_empty(x.shape[0], qweight.shape[0])


def _check_packed(x: Tensor, qweight: Tensor, scale: Tensor, bias: Optional[Tensor], in_features: int) -> None:
    check_float(x, "x")
    check_last_dim(x, in_features, "x")
    if qweight.dtype == torch.int8:
        want = in_features
    elif qweight.dtype == torch.uint8:
        want = (in_features + 1) // 2
    else:
        raise TypeError(f"qweight must be int8 (8-bit codes) or uint8 (two int4 codes per byte), got {qweight.dtype}")
    if qweight.dim() != 2 or qweight.shape[1] != want:
        raise ValueError(f"qweight of dtype {qweight.dtype} for in_features={in_features} must be (out, {want}), got {tuple(qweight.shape)}")
    if scale.shape != (qweight.shape[0],) or scale.dtype != torch.float32:
        raise ValueError(f"scale must be float32 of shape ({qweight.shape[0]},), got {scale.dtype} {tuple(scale.shape)}")
    if bias is not None and bias.shape != (qweight.shape[0],):
        raise ValueError(f"bias must have shape ({qweight.shape[0]},), got {tuple(bias.shape)}")
    check_same_device(("x", x), ("qweight", qweight), ("scale", scale), ("bias", bias))
    if torch.is_grad_enabled() and x.requires_grad:
        raise RuntimeError(
            "a packed QLinear is inference-only: call it under torch.no_grad()/torch.inference_mode() with an input "
            "that does not require grad, or .unpack() it to train again"
        )


class PackedLinear(NamedTuple):
    """The stored form of a packed :class:`~rspeft_fast.modules.qlinear.QLinear`: ``qweight`` int8 ``(out, in)``
    or uint8 ``(out, ceil(in/2))`` (two int4 codes per byte), ``scale`` float32 ``(out,)``, ``bias (out,)`` or
    None, ``in_features``."""

    qweight: Tensor
    scale: Tensor
    bias: Optional[Tensor]
    in_features: int


def qlinear_packed(x: Tensor, qweight: Tensor, scale: Tensor, bias: Optional[Tensor], in_features: int,
                   gelu: bool = False, *, impl: str = "triton") -> Tensor:
    """Inference Q-Linear from packed storage (:class:`PackedLinear`'s fields): ``x (..., in_features)`` →
    ``(..., out)``; fused: dequantised inside the matmul. Computes in the autocast dtype if on, else x's."""
    _check_packed(x, qweight, scale, bias, in_features)
    if _resolve("qlinear_packed", impl, x, _limits(x, qweight.shape[0], in_features)) == "reference":
        y = qlinear_packed_ref(x, qweight, scale, bias, in_features)
        return F.gelu(y) if gelu else y
    x2, lead = _rows(x)
    y = _qlinear_packed(x2, qweight, scale, bias, int(in_features), bool(gelu))
    return y.reshape(*lead, qweight.shape[0])


def _mode(qweight: Tensor) -> int:
    return _kernels().INT8 if qweight.dtype == torch.int8 else _kernels().INT4


@torch.library.custom_op("rspeft_fast::eqam_packed", mutates_args=())
def _eqam_packed(
    x: Tensor, down_q: Tensor, down_s: Tensor, down_b: Optional[Tensor],
    up_q: Tensor, up_s: Tensor, up_b: Optional[Tensor], dim: int,
) -> Tensor:
    from ..kernels.mufa import bottleneck_fwd

    r = down_q.shape[0]
    wd = _kernels().weight_values(down_q, down_s, x.dtype, mode=_mode(down_q), in_features=dim)
    wu = _kernels().weight_values(up_q, up_s, x.dtype, mode=_mode(up_q), in_features=r)
    bd = down_b.to(x.dtype) if down_b is not None else x.new_zeros(r)
    bu = up_b if up_b is not None else x.new_zeros(dim, dtype=torch.float32)
    ones = torch.ones(r, device=x.device, dtype=torch.float32)
    y, _ = bottleneck_fwd(x, wd, bd, wu, bu, ones, 1.0, save_pre=False)
    return y


@_eqam_packed.register_fake
def _(x, down_q, down_s, down_b, up_q, up_s, up_b, dim):
    return x.new_empty(x.shape[0], up_q.shape[0])


def eqam_packed(x: Tensor, down: PackedLinear, up: PackedLinear, *, impl: str = "triton") -> Tensor:
    """Packed EQAM delta (inference): ``x (..., d)`` → ``(..., d)``; ``down``/``up`` are :class:`PackedLinear`
    (or plain ``(qweight, scale, bias, in_features)`` tuples).

    Fused, small bottleneck (padded ``R <= FUSED_MAX_RANK``): the two small weights are dequantised by a tiny
    kernel and one bottleneck launch does the rest (``h`` never leaves the chip); otherwise two packed
    Q-Linear launches (dequantise-in-the-matmul, GELU epilogue on the first).
    """
    dq, ds, db, din = down = PackedLinear(*down)
    uq, us, ub, uin = up = PackedLinear(*up)
    _check_packed(x, dq, ds, db, din)
    if uin != dq.shape[0] or uq.shape[0] != din:
        raise ValueError(f"EQAM packed: up must map {dq.shape[0]} -> {din} features, got {uin} -> {uq.shape[0]}")
    _check_packed(x.new_empty(0, uin), uq, us, ub, uin)
    if _resolve("eqam_packed", impl, x, _limits(x, dq.shape[0], din)) == "reference":
        h = F.gelu(qlinear_packed_ref(x, dq, ds, db, din))
        return qlinear_packed_ref(h, uq, us, ub, uin)
    x2, lead = _rows(x)
    if max(16, _next_pow2(dq.shape[0])) <= FUSED_MAX_RANK:
        y = _eqam_packed(x2, dq, ds, db, uq, us, ub, int(din))
    else:
        h = _qlinear_packed(x2, dq, ds, db, int(din), True)
        y = _qlinear_packed(h, uq, us, ub, int(uin), False)
    return y.reshape(*lead, uq.shape[0])
