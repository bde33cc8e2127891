"""MGAdapter (HarMA gated multimodal adapter, optional BiShare): fused Triton op, autograd and functional.

``mga(x, down_weight, down_bias, up_weight, up_bias, attn, gate, heads, share=None, key_padding_mask=None)``
computes exactly :func:`rspeft_fast.reference.mga.mga_ref` with the kernels of ``rspeft_fast.kernels.mga`` (short
sequences) or the blocked path of ``rspeft_fast.ops._mga_blocked`` (``kernels.attention`` + GEMMs).

Registered with ``torch.library`` so ``torch.compile`` sees single ops, no graph break:

* ``rspeft_fast::mga_fwd``: returns ``y`` and what autograd needs (:class:`~rspeft_fast.kernels.mga.MGASaved`:
  ``hpre``, ``z1``, ``z2``, ``w`` ``(B, L, hidden)``/``(B, L, hidden/2)``; on the blocked path also the head
  outputs ``o`` and fp32 log-sum-exps ``lse`` of each MSA call; empty when nothing needs grad);
* ``rspeft_fast::mga_bwd``: the backward kernels, then deterministic GEMMs / row sums for the weight
  gradients (no atomics).

The launch plan (``kernels.mga.plan_mga``, from the device) picks, per layer, the per-sequence kernels (one
program per sequence, the whole forward in ONE launch; short sequences) or the blocked path (any L: GEMMs over
the B·L rows and flash-attention-style kernels over (sequence·head, query/key block) with the forward's
``lse`` reused by the backward). Same results within rounding, both deterministic.

Key padding mask: ``(B, L)`` bool, True = padded key, as ``nn.MultiheadAttention``. A sequence whose
keys are ALL padded yields NaN in its output (softmax over only ``-inf``), exactly as the reference and
``nn.MultiheadAttention`` do; its gradients are NaN as well. Callers must not pass fully padded rows.

Dtypes: float32/float16/bfloat16 (float64 raises: use ``impl="reference"``). The compute dtype is
``compute_dtype(x)`` (the autocast dtype when autocast is on); weights are cast to it as eager
``F.linear`` would; ``y`` has dtype ``promote(x.dtype, compute dtype)`` like ``x + F.linear(...)``.
What the kernels genuinely cannot run (head dims above 128) is named by :func:`mga_limits`.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from torch._subclasses.fake_tensor import FakeTensor

from .._impl import ENV_FORCE, autocast_state, kernel_limits, register_plan_cache, resolve_impl
from .._validate import check_float, check_kernel_dtype, check_last_dim, check_same_device, compute_dtype
from ..reference.mga import mga_ref

_ATTN_KEYS = ("in_proj_weight", "in_proj_bias", "out_proj_weight", "out_proj_bias")
_SHARE_KEYS = ("down_weight", "down_bias", "up_weight", "up_bias")
_N_SHARE = 9  # down_w, down_b, up_w, up_b, in_w, in_b, out_w, out_b, gate


_MODULES: dict = {}  # the kernel modules, imported at first use (Triton only when a fused call needs it)


def _kernels():
    k = _MODULES.get("k")
    if k is None:
        from ..kernels import mga as k

        _MODULES["k"] = k
    return k


def _blocked():
    b = _MODULES.get("b")
    if b is None:
        from . import _mga_blocked as b

        _MODULES["b"] = b
    return b


def _mask_u8(mask: Optional[Tensor]) -> Optional[Tensor]:
    return None if mask is None else mask.to(torch.uint8).contiguous()


def _share_weights(share_tensors, share_heads):
    if share_tensors[0] is None:
        return None
    return _kernels().ShareWeights(*share_tensors, share_heads)


# ----------------------------------------------------------------------------------------------------
# forward op
# ----------------------------------------------------------------------------------------------------
@torch.library.custom_op("rspeft_fast::mga_fwd", mutates_args=())
def mga_fwd(
    x: Tensor, down_weight: Tensor, down_bias: Tensor, up_weight: Tensor, up_bias: Tensor,
    in_proj_weight: Tensor, in_proj_bias: Tensor, out_proj_weight: Tensor, out_proj_bias: Tensor,
    gate: Tensor, heads: int,
    s_down_weight: Optional[Tensor], s_down_bias: Optional[Tensor], s_up_weight: Optional[Tensor],
    s_up_bias: Optional[Tensor], s_in_proj_weight: Optional[Tensor], s_in_proj_bias: Optional[Tensor],
    s_out_proj_weight: Optional[Tensor], s_out_proj_bias: Optional[Tensor], s_gate: Optional[Tensor],
    share_heads: int, key_padding_mask: Optional[Tensor], save: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fused MGA forward: ``(y, hpre, z1, z2, w, o, o_s, lse, lse_s)`` (``y`` and the fields of
    ``kernels.mga.MGASaved``, filled when ``save``)."""
    share = _share_weights((s_down_weight, s_down_bias, s_up_weight, s_up_bias, s_in_proj_weight, s_in_proj_bias,
                          s_out_proj_weight, s_out_proj_bias, s_gate), share_heads)
    k = _kernels()
    plan = k.plan_for(x.shape, down_weight.shape[0], heads, share, down_weight.dtype, x.device, save)
    forward = _blocked().mga_forward_blocked if plan.path == "blocked" else k.mga_forward
    with torch.autocast(x.device.type, enabled=False):
        y, saved = forward(x, down_weight, down_bias, up_weight, up_bias, in_proj_weight, in_proj_bias,
                           out_proj_weight, out_proj_bias, gate, heads, share=share,
                           mask_u8=_mask_u8(key_padding_mask), save=save, plan=plan)
    return (y, *saved)


@mga_fwd.register_fake
def _(x, down_weight, down_bias, up_weight, up_bias, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias,
      gate, heads, s_down_weight, s_down_bias, s_up_weight, s_up_bias, s_in_proj_weight, s_in_proj_bias,
      s_out_proj_weight, s_out_proj_bias, s_gate, share_heads, key_padding_mask, save):
    k = _kernels()
    H = down_weight.shape[0]
    cdt = down_weight.dtype
    y = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, cdt))
    share = _share_weights((s_down_weight, s_down_bias, s_up_weight, s_up_bias, s_in_proj_weight, s_in_proj_bias,
                            s_out_proj_weight, s_out_proj_bias, s_gate), share_heads)
    blocked = k.plan_for(x.shape, H, heads, share, cdt, x.device, save).path == "blocked"
    return (y, *k.saved_buffers(x, H, heads, share, cdt, blocked, save))


def _weight_grads(dy, x, r, z1, z2, ws, gate, share, s_gate, cdt):
    """The weight gradients from the backward launchers' intermediates ``r`` (:class:`kernels.mga.MGAGrads`):
    deterministic GEMMs and column sums over the B·L rows, in the compute dtype (fp32 accumulation);
    ``[dx, dWd, dbd, dWu, dbu, dWin, dbin, dWo, dbo, dgate]`` + the 9 BiShare ones (empty without share)."""
    D = x.shape[-1]
    H = r.dpre.shape[-1]
    f32 = torch.float32

    def rows(t, n):
        return t.reshape(-1, n)

    def colsum(t, n):
        return rows(t, n).sum(0, dtype=f32).to(cdt)

    dy2 = rows(dy, D)
    dWu = dy2.to(cdt).t().mm(rows(r.u, H))
    dbu = dy2.sum(0, dtype=f32).to(cdt)
    dpre = rows(r.dpre, H)
    dWd = dpre.t().mm(rows(x, D).to(cdt))
    dbd = colsum(dpre, H)
    dqkv = r.dqkv
    dWin = torch.addmm(rows(dqkv[0], 3 * H).t().mm(rows(r.z0, H)), rows(dqkv[1], 3 * H).t(), rows(z2, H))
    dbin = colsum(dqkv, 3 * H)
    g = rows(r.g, H)
    dWo = g.t().mm(rows(r.o, H))
    dbo = colsum(g, H)
    dgate = r.gate_partial.sum().reshape(gate.shape).to(gate.dtype)
    out = [r.dx, dWd, dbd, dWu, dbu, dWin, dbin, dWo, dbo, dgate]
    if share is None:
        out += [dy.new_empty(0) for _ in range(_N_SHARE)]
    else:
        H2 = share.down_w.shape[0]
        sr = r.share
        dz2, dw = rows(sr.dz2, H), rows(sr.dw, H2)
        sg = rows(sr.g, H2)
        out += [
            dw.t().mm(rows(z1, H)), colsum(dw, H2),                    # down_s
            dz2.t().mm(rows(sr.vs, H2)), colsum(dz2, H),               # up_s
            rows(sr.dqkv, 3 * H2).t().mm(rows(ws, H2)), colsum(sr.dqkv, 3 * H2),  # in_proj_s
            sg.t().mm(rows(sr.o, H2)), colsum(sg, H2),                 # out_proj_s
            sr.gate_partial.sum().reshape(s_gate.shape).to(s_gate.dtype),
        ]
    return out


# ----------------------------------------------------------------------------------------------------
# backward op
# ----------------------------------------------------------------------------------------------------
@torch.library.custom_op("rspeft_fast::mga_bwd", mutates_args=())
def mga_bwd(
    dy: Tensor, x: Tensor, down_weight: Tensor, up_weight: Tensor,
    in_proj_weight: Tensor, in_proj_bias: Tensor, out_proj_weight: Tensor, out_proj_bias: Tensor,
    gate: Tensor, heads: int, hpre: Tensor, z1: Tensor, z2: Tensor, ws: Tensor,
    o: Tensor, o_s: Tensor, lse: Tensor, lse_s: Tensor, s_down_weight: Optional[Tensor], s_down_bias: Optional[Tensor], s_up_weight: Optional[Tensor],
    s_up_bias: Optional[Tensor], s_in_proj_weight: Optional[Tensor], s_in_proj_bias: Optional[Tensor],
    s_out_proj_weight: Optional[Tensor], s_out_proj_bias: Optional[Tensor], s_gate: Optional[Tensor],
    share_heads: int, key_padding_mask: Optional[Tensor],
) -> list[Tensor]:
    """Gradients ``[dx, dWd, dbd, dWu, dbu, dWin, dbin, dWo, dbo, dgate]`` + the 9 BiShare ones (empty
    tensors without share). Weight gradients in the compute dtype (fp32 accumulation), ``dx`` in x.dtype."""
    k = _kernels()
    share = _share_weights((s_down_weight, s_down_bias, s_up_weight, s_up_bias, s_in_proj_weight, s_in_proj_bias,
                            s_out_proj_weight, s_out_proj_bias, s_gate), share_heads)
    cdt = down_weight.dtype
    with torch.autocast(x.device.type, enabled=False):
        # the forward's path: the blocked one saved the attention's head outputs
        backward = _blocked().mga_backward_blocked if o.numel() > 0 else k.mga_backward
        r = backward(dy, x.dtype, down_weight, up_weight, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias,
                     gate, heads, k.MGASaved(hpre, z1, z2, ws, o, o_s, lse, lse_s), share=share,
                     mask_u8=_mask_u8(key_padding_mask))

        return _weight_grads(dy, x, r, z1, z2, ws, gate, share, s_gate, cdt)


@mga_bwd.register_fake
def _(dy, x, down_weight, up_weight, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, gate, heads,
      hpre, z1, z2, ws, o, o_s, lse, lse_s, s_down_weight, s_down_bias, s_up_weight, s_up_bias, s_in_proj_weight, s_in_proj_bias,
      s_out_proj_weight, s_out_proj_bias, s_gate, share_heads, key_padding_mask):
    cdt = down_weight.dtype
    H, D = down_weight.shape

    def e(*shape):
        return x.new_empty(shape, dtype=cdt)

    out = [x.new_empty(x.shape), e(H, D), e(H), e(D, H), e(D), e(3 * H, H), e(3 * H), e(H, H), e(H),
           gate.new_empty(gate.shape)]
    if s_down_weight is None:
        out += [dy.new_empty(0) for _ in range(_N_SHARE)]
    else:
        H2 = s_down_weight.shape[0]
        out += [e(H2, H), e(H2), e(H, H2), e(H), e(3 * H2, H2), e(3 * H2), e(H2, H2), e(H2), s_gate.new_empty(s_gate.shape)]
    return out


# ----------------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------------
def _setup_context(ctx, inputs, output):
    (x, dw, db, uw, ub, iw, ib, ow, ob, gate, heads, *s, share_heads, mask, save) = inputs
    _, *saved = output
    ctx.heads = heads
    ctx.share_heads = share_heads
    ctx.has_share = s[0] is not None
    ctx.save_for_backward(x, dw, uw, iw, ib, ow, ob, gate, mask, *saved, *s)
    ctx.mark_non_differentiable(*saved)


_N_SAVED = 8  # the fields of kernels.mga.MGASaved


def _backward(ctx, dy, *unused):
    x, dw, uw, iw, ib, ow, ob, gate, mask, *rest = ctx.saved_tensors
    saved, s = rest[:_N_SAVED], rest[_N_SAVED:]
    if saved[0].numel() == 0 and x.numel() != 0:
        raise RuntimeError("mga: backward called but the forward ran with save=False (no input required grad)")
    grads = torch.ops.rspeft_fast.mga_bwd(dy, x, dw, uw, iw, ib, ow, ob, gate, ctx.heads, *saved,
                                          *s, ctx.share_heads, mask)
    main, sh = grads[:10], grads[10:]
    if not ctx.has_share:
        sh = [None] * _N_SHARE
    # inputs: x, dw, db, uw, ub, iw, ib, ow, ob, gate, heads, 9 share tensors, share_heads, mask, save
    return (*main, None, *sh, None, None, None)


mga_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------
# functional entry point
# ----------------------------------------------------------------------------------------------------
def _check_attn(attn: dict, h: int, name: str):
    if not isinstance(attn, dict) or any(k not in attn for k in _ATTN_KEYS):
        raise TypeError(f"{name} must be a dict with keys {_ATTN_KEYS}")
    w, ow = attn["in_proj_weight"], attn["out_proj_weight"]
    if tuple(w.shape) != (3 * h, h):
        raise ValueError(f"{name}['in_proj_weight'] must have shape (3*{h}, {h}), got {tuple(w.shape)}")
    if tuple(ow.shape) != (h, h):
        raise ValueError(f"{name}['out_proj_weight'] must have shape ({h}, {h}), got {tuple(ow.shape)}")


def mga_limits(x: Tensor, hidden: int, heads: int, share_hidden: Optional[int] = None,
               share_heads: Optional[int] = None):
    """The ``limits=`` callable of ``resolve_impl`` for an MGA call on ``x (B, L, d)``: returns None when the
    fused kernels run these shapes and x's compute dtype on x's device, else a one-line reason naming the
    limit (``kernels.mga.why_unsupported``)."""
    return kernel_limits(_kernels, x.device, compute_dtype(x), L=int(x.shape[1]), D=int(x.shape[-1]),
                         hidden=int(hidden), heads=int(heads), share_hidden=share_hidden, share_heads=share_heads)


def _bias(b: Optional[Tensor], n: int, like: Tensor) -> Tensor:
    return like.new_zeros(n) if b is None else b


def _prep_linear(w, b, cdt):
    """Weights in the compute dtype, contiguous (differentiable casts, as eager autocast does)."""
    return w.to(cdt).contiguous(), b.to(cdt).contiguous()


def _check_call(x, down_weight, down_bias, up_weight, up_bias, attn, gate, heads, share, key_padding_mask, impl):
    """Every check of :func:`mga` (raising as it always did): ``(H, H2 or None, share heads, compute dtype)``."""
    check_float(x, "x")
    if x.dim() != 3:
        raise ValueError(f"mga expects x of shape (B, L, d), got {tuple(x.shape)}")
    B, L, D = x.shape
    check_float(down_weight, "down_weight")
    if down_weight.dim() != 2:
        raise ValueError(f"down_weight must be 2-D (hidden, d), got {tuple(down_weight.shape)}")
    H = down_weight.shape[0]
    check_last_dim(x, down_weight.shape[1], "x")
    if tuple(up_weight.shape) != (D, H):
        raise ValueError(f"up_weight must have shape ({D}, {H}), got {tuple(up_weight.shape)}")
    _check_attn(attn, H, "attn")
    if not isinstance(gate, Tensor) or gate.numel() != 1:
        raise TypeError("gate must be a one-element tensor")
    check_same_device(("x", x), ("down_weight", down_weight), ("up_weight", up_weight), ("gate", gate),
                      ("attn.in_proj_weight", attn["in_proj_weight"]), ("key_padding_mask", key_padding_mask))
    cdt = compute_dtype(x)
    check_kernel_dtype("mga", impl, cdt)
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (B, L):
            raise ValueError(f"key_padding_mask must have shape (B, L) = ({B}, {L}), got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be bool (True = padded key), got {key_padding_mask.dtype}")
    # every tensor the kernels read (a bias on another device would otherwise reach the kernel unchecked)
    named = [("x", x), ("down_weight", down_weight), ("down_bias", down_bias), ("up_weight", up_weight),
             ("up_bias", up_bias), ("gate", gate)] + [(f"attn.{k}", attn[k]) for k in _ATTN_KEYS]
    s_heads = 0
    if share is not None:
        if not isinstance(share, dict) or any(k not in share for k in _SHARE_KEYS + ("attn", "gate", "heads")):
            raise TypeError(f"share must be a dict with keys {_SHARE_KEYS + ('attn', 'gate', 'heads')} "
                            "(BiShareAdapter.tensors())")
        H2 = share["down_weight"].shape[0]
        if tuple(share["down_weight"].shape) != (H2, H) or tuple(share["up_weight"].shape) != (H, H2):
            raise ValueError(f"share down/up weights must have shapes (h2, {H}) and ({H}, h2); got "
                             f"{tuple(share['down_weight'].shape)} and {tuple(share['up_weight'].shape)}")
        _check_attn(share["attn"], H2, "share['attn']")
        s_heads = int(share["heads"])
        named += [(f"share.{k}", share[k]) for k in _SHARE_KEYS + ("gate",)]
        named += [(f"share.attn.{k}", share["attn"][k]) for k in _ATTN_KEYS]
    check_same_device(*named)
    if int(heads) < 1 or H % int(heads):
        raise ValueError(f"mga: hidden={H} must be divisible by heads={heads}")
    if share is not None and (s_heads < 1 or H2 % s_heads):
        raise ValueError(f"mga: BiShare hidden={H2} must be divisible by its heads={s_heads}")
    return H, (H2 if share is not None else None), s_heads, cdt


def mga(x, down_weight, down_bias, up_weight, up_bias, attn: dict, gate, heads, share=None, key_padding_mask=None,
        impl: str = "triton"):
    """Fused MGAdapter: ``x (B, L, d)`` → ``x + up(a·GELU(down x) + (1-a)·MSA(share?(MSA(GELU(down x)))))``.

    Same arguments and result as :func:`rspeft_fast.reference.mga.mga_ref` (``share`` a dict of the BiShare
    tensors as ``BiShareAdapter.tensors()`` gives, ``key_padding_mask (B, L)`` bool, True = padded key; a fully
    padded sequence gives NaN like the reference).

    ``impl``: ``"triton"`` (default: the fused kernels, on CUDA or on CPU under ``TRITON_INTERPRET=1``;
    :class:`ImplUnavailableError` where they cannot run, before any launch), ``"reference"``, or ``"auto"``
    (the kernels on CUDA inside their limits, else the reference, with one warning per limit) — the same rule
    as every other op (``rspeft_fast._impl.resolve_impl``).
    """
    if not (torch.compiler.is_compiling() or isinstance(x, FakeTensor)):
        return mga_eager(x, down_weight, down_bias, up_weight, up_bias, attn, gate, heads, share, key_padding_mask,
                          impl, None)
    H, H2, s_heads, cdt = _check_call(x, down_weight, down_bias, up_weight, up_bias, attn, gate, heads, share, key_padding_mask, impl)
    impl = resolve_impl("mga", impl, x.device, limits=None)  # under compile the op itself checks at run time
    if impl == "reference":
        return mga_ref(x, down_weight, down_bias, up_weight, up_bias, attn, gate, heads, share=share,
                       key_padding_mask=key_padding_mask)
    D = x.shape[-1]
    dwt, dbt = _prep_linear(down_weight, _bias(down_bias, H, down_weight), cdt)
    uwt, ubt = _prep_linear(up_weight, _bias(up_bias, D, up_weight), cdt)
    iwt, ibt = _prep_linear(attn["in_proj_weight"], _bias(attn["in_proj_bias"], 3 * H, down_weight), cdt)
    owt, obt = _prep_linear(attn["out_proj_weight"], _bias(attn["out_proj_bias"], H, down_weight), cdt)
    if share is not None:
        sa = share["attn"]
        s_t = [*_prep_linear(share["down_weight"], _bias(share["down_bias"], H2, down_weight), cdt),
               *_prep_linear(share["up_weight"], _bias(share["up_bias"], H, down_weight), cdt),
               *_prep_linear(sa["in_proj_weight"], _bias(sa["in_proj_bias"], 3 * H2, down_weight), cdt),
               *_prep_linear(sa["out_proj_weight"], _bias(sa["out_proj_bias"], H2, down_weight), cdt),
               share["gate"]]
    else:
        s_t = [None] * _N_SHARE
    params = [down_weight, down_bias, up_weight, up_bias, gate, *attn.values()]
    if share is not None:
        params += [share["down_weight"], share["down_bias"], share["up_weight"], share["up_bias"], share["gate"],
                   *share["attn"].values()]
    save = torch.is_grad_enabled() and (x.requires_grad or any(p is not None and p.requires_grad for p in params))
    y, *_ = torch.ops.rspeft_fast.mga_fwd(x, dwt, dbt, uwt, ubt, iwt, ibt, owt, obt, gate, int(heads), *s_t,
                                          s_heads, key_padding_mask, save)
    return y


# ----------------------------------------------------------------------------------------------------
# the eager hot path: checked, resolved and planned once per key (issue #27)
# ----------------------------------------------------------------------------------------------------
class _Plan:
    """What an eager call of one key needs: the implementation, the compute dtype, whether the weights need a
    cast or copy, the layer's launch plan (``kernels.mga.MGAPlan``, for training and inference), the zero biases
    that stand for missing ones, and the per-sequence launches' non-tensor arguments (made at their first use)."""

    __slots__ = ("impl", "cdt", "prep", "H", "D", "H2", "heads", "s_heads", "train", "infer", "zeros", "scratch", "none")


_PLANS: dict = register_plan_cache({})
_MAX_PLANS = 512


def _tk(t):
    return None if t is None else (t.shape, t.dtype, t.device, t.is_contiguous())


def _plan_key(tag, x, tensors, heads, s_heads, mask, impl):
    dev = x.device
    env = os.environ.get
    return (tag, impl, x.shape, x.dtype, dev, x.stride(), heads, s_heads, *map(_tk, tensors),
            None if mask is None else (mask.shape, mask.dtype, mask.device, mask.is_contiguous()),
            autocast_state(dev.type), torch.get_float32_matmul_precision(), env("TRITON_INTERPRET"), env(ENV_FORCE))


def _make_plan(x, dw, db, uw, ub, attn, gate, heads, share, mask, impl, check) -> _Plan:
    if check is not None:
        check()
    H, H2, s_heads, cdt = _check_call(x, dw, db, uw, ub, attn, gate, heads, share, mask, impl)
    limits = None
    if impl != "reference":
        limits = mga_limits(x, H, int(heads), H2, s_heads if share is not None else None)
    p = _Plan()
    p.impl = resolve_impl("mga", impl, x.device, limits=limits)
    if p.impl == "reference":
        return p
    k = _kernels()
    tensors = _flat(dw, db, uw, ub, attn, gate, share)
    p.cdt, p.H, p.D, p.H2, p.heads, p.s_heads = cdt, H, x.shape[-1], H2, int(heads), s_heads
    # weights used as they are when they already are what the kernels read (compute dtype, contiguous)
    p.prep = any(t is not None and (t.dtype != cdt or not t.is_contiguous()) for i, t in enumerate(tensors)
                 if i not in (8, 17))
    sh = None if share is None else k.ShareWeights(*tensors[9:], s_heads)
    p.train = k.plan_for(x.shape, H, p.heads, sh, cdt, x.device, True)
    p.infer = k.plan_for(x.shape, H, p.heads, sh, cdt, x.device, False)
    p.zeros = {i: torch.zeros(n(H, p.D, H2 or 0), device=x.device, dtype=cdt) for i, n in _BIAS_LEN.items()
               if tensors[i] is None and (i < 9 or share is not None)}
    p.scratch = {}  # the blocked forward's GEMM operands (ops/_mga_blocked._up_operands)
    p.none = torch.empty(0, device=x.device, dtype=cdt)  # every saved field a call does not fill
    return p


# bias slot in the flat tensor list → its length from (H, D, H2)
_BIAS_LEN = {1: lambda H, D, H2: H, 3: lambda H, D, H2: D, 5: lambda H, D, H2: 3 * H, 7: lambda H, D, H2: H,
             10: lambda H, D, H2: H2, 12: lambda H, D, H2: H, 14: lambda H, D, H2: 3 * H2, 16: lambda H, D, H2: H2}


def _flat(dw, db, uw, ub, attn, gate, share) -> list:
    """The 18 tensors of a call in the custom op's order: ``dw, db, uw, ub, in_w, in_b, out_w, out_b, gate`` and
    the same nine of BiShare (Nones without it)."""
    t = [dw, db, uw, ub, attn["in_proj_weight"], attn["in_proj_bias"], attn["out_proj_weight"],
         attn["out_proj_bias"], gate]
    if share is None:
        return t + [None] * _N_SHARE
    sa = share["attn"]
    return t + [share["down_weight"], share["down_bias"], share["up_weight"], share["up_bias"], sa["in_proj_weight"],
                sa["in_proj_bias"], sa["out_proj_weight"], sa["out_proj_bias"], share["gate"]]


def mga_eager(x, dw, db, uw, ub, attn, gate, heads, share, mask, impl, check):
    """:func:`mga` outside torch.compile: plan once per key, then the kernels through :class:`_MGAFunction`.
    ``check`` (the module's own checks) runs when a key is planned."""
    tensors = _flat(dw, db, uw, ub, attn, gate, share)
    s_heads = share["heads"] if share is not None else 0
    key = _plan_key(check is not None, x, tensors, heads, s_heads, mask, impl)
    p = _PLANS.get(key)
    if p is None:
        p = _make_plan(x, dw, db, uw, ub, attn, gate, heads, share, mask, impl, check)
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = p
    if p.impl == "reference":
        return mga_ref(x, dw, db, uw, ub, attn, gate, heads, share=share, key_padding_mask=mask)
    for i, z in p.zeros.items():
        tensors[i] = z
    if p.prep:
        cdt = p.cdt
        tensors = [t if t is None or i in (8, 17) else t.to(cdt).contiguous() for i, t in enumerate(tensors)]
    mask_u8 = None if mask is None else mask.view(torch.uint8)
    if mask_u8 is not None and not mask_u8.is_contiguous():
        mask_u8 = mask_u8.contiguous()
    if torch.is_grad_enabled() and (x.requires_grad or any(t is not None and t.requires_grad for t in tensors)):
        return _MGAFunction.apply(p, mask_u8, x, *tensors)
    return _forward(p, p.infer, x, tensors, mask_u8, False)[0]


def _share(p: _Plan, t):
    return None if p.H2 is None else _kernels().ShareWeights(*t[9:], p.s_heads)


def _forward(p: _Plan, plan, x, t, mask_u8, save):
    if plan.path == "blocked":
        return _blocked().mga_forward_blocked(x, *t[:9], p.heads, share=_share(p, t), mask_u8=mask_u8, save=save,
                                              plan=plan, scratch=p.scratch, none=p.none)
    return _kernels().mga_forward(x, *t[:9], p.heads, share=_share(p, t), mask_u8=mask_u8, save=save, plan=plan,
                                  none=p.none)


class _MGAFunction(torch.autograd.Function):
    """The fused MGA with autograd, for eager calls (the launchers of the custom ops, planned once)."""

    @staticmethod
    def forward(ctx, p, mask_u8, x, *t):
        y, saved = _forward(p, p.train, x, t, mask_u8, True)
        ctx.p, ctx.mask = p, mask_u8
        ctx.save_for_backward(x, *t, *saved)
        return y

    @staticmethod
    def backward(ctx, dy):
        p = ctx.p
        x, *rest = ctx.saved_tensors
        t, saved = rest[:18], _kernels().MGASaved(*rest[18:])
        share = _share(p, t)
        dy = dy.contiguous()
        dw, db, uw, ub, iw, ib, ow, ob, gate = t[:9]
        backward = _blocked().mga_backward_blocked if p.train.path == "blocked" else _kernels().mga_backward
        r = backward(dy, x.dtype, dw, uw, iw, ib, ow, ob, gate, p.heads, saved, share=share, mask_u8=ctx.mask,
                     plan=p.train)
        g = _weight_grads(dy, x, r, saved.z1, saved.z2, saved.ws, gate, share, t[17], p.cdt)
        if p.H2 is None:
            g[10:] = [None] * _N_SHARE
        return (None, None, *g)
