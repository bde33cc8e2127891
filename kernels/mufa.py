"""Fused bottleneck kernels: MuFA (all branches at once), AdaptFormer (one branch), Houlsby (serial), EQAM.

The op, written generically so other adapters can reuse it::

    pre = x Wdᵀ + bd                       (N, R)   R = bottleneck width (MuFA: Σ r_i)
    y   = scale * ((GELU(pre) * col_scale) Wuᵀ + bu)  (+ base)

``col_scale (R,)`` (float32) multiplies each bottleneck column: MuFA passes ``gate[i]`` repeated over
branch ``i``'s columns (so ``d gate[i]`` is the sum of ``d col_scale`` over that branch), EQAM passes ones.

Launchers (plain functions, tensors in, tensors out):

* :func:`bottleneck_fwd` — one Triton kernel. Each program owns ``BLOCK_M`` rows and keeps their whole
  (padded) bottleneck on chip: the down projection loops over ``d`` in ``BLOCK_K`` chunks
  (``tl.dot``, fp32 accumulators ``(BLOCK_M, R_A)`` + ``(BLOCK_M, R_B)``, see :func:`column_groups`),
  GELU and ``col_scale`` are applied in registers,
  then the up projection is computed ``BLOCK_N`` output columns at a time, with bias, scale and the
  optional residual ``base`` in the epilogue. One read of ``x`` (and ``base``), one write of ``y``, plus
  the optional write of ``pre`` (N, R) for the backward.
* :func:`bottleneck_bwd` — three launches, all deterministic (no atomics):

  1. row kernel (one program per ``BLOCK_M`` rows): ``pre`` (loaded, or recomputed from ``x``),
     ``dhs = scale * dy Wu`` (one pass over ``dy``), ``g = GELU(pre)``,
     ``dpre = dhs * col_scale * GELU'(pre)``, ``dx = dpre Wd`` (written chunk by chunk); it also writes
     ``dpre`` and ``g`` (N, R) in the compute dtype for the weight gradients.
  2. ``dWd = dpreᵀ x`` and ``dbd = Σ dpre``: split-K "AᵀB" kernel, grid (R tiles, d tiles, splits), each
     program accumulating its contiguous slice of rows in fp32 and writing a partial; the partials are
     summed with ``torch.sum`` (fixed order: deterministic run to run).
  3. ``G = dyᵀ g`` and ``Σ dy``: the same kernel, written straight into a ``(d, R)`` layout; then
     ``dWu = scale * G * col_scale``, ``dbu = scale * Σ dy`` and
     ``dcol_scale[r] = Σ_n dhs[n, r] g[n, r] = scale * Σ_j Wu[j, r] G[j, r]`` (an exact identity, so the
     row kernel needs no per-row-block partials at all).

Dtypes: ``x, wd, bd, wu`` in one compute dtype (float32 / float16 / bfloat16); ``bu``, ``base`` and
``dy`` may be any float dtype (loaded and used in fp32 — this is what eager autocast does with an fp32
``up.bias``). All matmuls accumulate in fp32; in float32 they run in full IEEE precision unless
``torch.get_float32_matmul_precision()`` allows TF32 (then TF32, as eager ``F.linear`` would).
``pre`` is saved in the compute dtype (what eager would keep: the output of ``F.linear``).
Weight gradients (and ``dcol_scale``) are returned in float32.

Autotuning is keyed on ``(D, R)`` only (never on the row count). Under ``TRITON_INTERPRET=1`` each
kernel has a single config.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._common import gelu, gelu_grad

__all__ = ["bottleneck_fwd", "bottleneck_bwd", "SUPPORTED_DTYPES", "column_groups"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip() == "1"

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Row granularity of the split-K weight-gradient reduction (a multiple of every BLOCK_M below).
_SPLIT_ROWS = 128


def padded_width(r: int) -> int:
    """Power-of-two width holding ``r`` columns, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(int(r)))


def column_groups(r: int) -> tuple[int, int]:
    """``(R_A, R_B)``: the bottleneck of ``r`` columns held on chip as two power-of-two column groups
    (``R_B = 0``: one group) — whichever pads less, e.g. 168 → (128, 64), 42 → (32, 16), 21 → (32, 0)."""
    r = int(r)
    one = padded_width(r)
    a = max(16, 1 << (r.bit_length() - 1))  # largest power of two <= r (at least 16)
    if a >= r:
        return one, 0
    b = padded_width(r - a)
    return (a, b) if a + b < one else (one, 0)


def _cfg(num_warps: int, num_stages: int, **blocks) -> triton.Config:
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


# Small config sets for H100-class GPUs; autotuned once per (D, R).
if _INTERPRET:
    _FWD_CONFIGS = [_cfg(4, 1, BLOCK_M=32, BLOCK_K=64, BLOCK_N=64)]
    _BWD_CONFIGS = [_cfg(4, 1, BLOCK_M=32, BLOCK_K=64, BLOCK_N=64)]
    _ATB_CONFIGS = [_cfg(4, 1, BLOCK_M=32, BLOCK_P=16, BLOCK_Q=64)]
else:  # pragma: no cover - needs a GPU
    # Chosen from sm_90 AOT compiles (registers/spills by cuobjdump, bf16): with R = 168 (128 + 64 column
    # groups) only 8-warp BLOCK_M = 64 tiles with 32/64-wide d chunks stay spill-free; the BLOCK_M = 128
    # and 4-warp ones are for small bottlenecks (Swin-T R = 21).
    _FWD_CONFIGS = [
        _cfg(8, 2, BLOCK_M=64, BLOCK_K=32, BLOCK_N=32),
        _cfg(8, 2, BLOCK_M=64, BLOCK_K=32, BLOCK_N=64),
        _cfg(8, 3, BLOCK_M=64, BLOCK_K=64, BLOCK_N=32),
        _cfg(8, 3, BLOCK_M=128, BLOCK_K=32, BLOCK_N=64),
        _cfg(8, 3, BLOCK_M=64, BLOCK_K=64, BLOCK_N=128),
        _cfg(4, 3, BLOCK_M=32, BLOCK_K=64, BLOCK_N=64),
    ]
    _BWD_CONFIGS = [
        _cfg(8, 2, BLOCK_M=64, BLOCK_K=32, BLOCK_N=32),
        _cfg(8, 3, BLOCK_M=64, BLOCK_K=32, BLOCK_N=64),
        _cfg(8, 3, BLOCK_M=64, BLOCK_K=64, BLOCK_N=128),
        _cfg(8, 2, BLOCK_M=128, BLOCK_K=32, BLOCK_N=64),
        _cfg(4, 3, BLOCK_M=32, BLOCK_K=64, BLOCK_N=64),
    ]
    _ATB_CONFIGS = [
        _cfg(4, 3, BLOCK_M=64, BLOCK_P=32, BLOCK_Q=64),
        _cfg(4, 3, BLOCK_M=64, BLOCK_P=64, BLOCK_Q=64),
        _cfg(8, 3, BLOCK_M=64, BLOCK_P=64, BLOCK_Q=128),
        _cfg(8, 3, BLOCK_M=128, BLOCK_P=32, BLOCK_Q=128),
        _cfg(8, 3, BLOCK_M=128, BLOCK_P=128, BLOCK_Q=64),
    ]


# Triton's interpreter (3.8) computes tl.dot of bfloat16 operands wrongly (garbage); there the 16-bit
# operands are widened to fp32 first, which is exact (products of 16-bit floats fit in fp32).
_WIDEN_16BIT_DOTS = tl.constexpr(_INTERPRET)


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation; full-precision fp32 when IEEE (else TF32 for fp32 inputs)."""
    if _WIDEN_16BIT_DOTS:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _load_kc(w_ptr, cols, cmask, kk, kmask, stride_c, stride_k):
    """Tile ``t[k, c] = w[c * stride_c + k * stride_k]`` of shape (len(kk), len(cols)), zero outside."""
    return tl.load(w_ptr + cols[None, :] * stride_c + kk[:, None] * stride_k,
                   mask=cmask[None, :] & kmask[:, None], other=0.0)


@triton.jit
def _load_cn(w_ptr, cols, cmask, nn, nmask, stride_c, stride_n):
    """Tile ``t[c, n] = w[c * stride_c + n * stride_n]`` of shape (len(cols), len(nn)), zero outside."""
    return tl.load(w_ptr + cols[:, None] * stride_c + nn[None, :] * stride_n,
                   mask=cmask[:, None] & nmask[None, :], other=0.0)


@triton.jit
def _fwd_columns(acc, cols, cmask, rows, rmask, bd_ptr, cs_ptr, pre_ptr, stride_pm, SAVE_PRE: tl.constexpr, OUT_TY: tl.constexpr):
    """One column group of the bottleneck: ``pre = acc + bd`` (saved if asked), returns ``GELU(pre) * cs``
    in OUT_TY. Padded columns give 0 (pre = 0 there, GELU(0) = 0, cs = 0)."""
    bd = tl.load(bd_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    pre = acc + bd[None, :]
    if SAVE_PRE:
        tl.store(pre_ptr + rows[:, None] * stride_pm + cols[None, :], pre.to(pre_ptr.dtype.element_ty),
                 mask=rmask[:, None] & cmask[None, :])
    cs = tl.load(cs_ptr + cols, mask=cmask, other=0.0)
    return (gelu(pre) * cs[None, :]).to(OUT_TY)


# ----------------------------------------------------------------------------------------------
# forward
#
# The bottleneck (R columns) is held on chip as one or two power-of-two column groups, A = [0, R_A)
# and B = [R_A, R_A + R_B) (R_B = 0: one group): R = 168 runs as 128 + 64 instead of a 256-wide pad,
# 25 % fewer tensor-core FLOPs and registers.
# ----------------------------------------------------------------------------------------------
@triton.autotune(configs=_FWD_CONFIGS, key=["D", "R"])
@triton.jit
def _bottleneck_fwd_kernel(
    x_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr, cs_ptr, base_ptr, y_ptr, pre_ptr,
    N, D, R,
    stride_xm, stride_wd_r, stride_wd_k, stride_wu_n, stride_wu_r,
    stride_bm, stride_ym, stride_pm,
    scale,
    HAS_BASE: tl.constexpr, SAVE_PRE: tl.constexpr, IEEE: tl.constexpr, R_A: tl.constexpr, R_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rmask = rows < N
    ca = tl.arange(0, R_A)
    ma = ca < R
    acc_a = tl.zeros((BLOCK_M, R_A), dtype=tl.float32)
    if R_B > 0:
        cb = R_A + tl.arange(0, R_B)
        mb = cb < R
        acc_b = tl.zeros((BLOCK_M, R_B), dtype=tl.float32)

    # down projection: acc (BLOCK_M, R) = x[rows] @ Wdᵀ, d in BLOCK_K chunks (one pass over x)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < D
        xt = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :],
                     mask=rmask[:, None] & kmask[None, :], other=0.0)
        acc_a = _dot(xt, _load_kc(wd_ptr, ca, ma, kk, kmask, stride_wd_r, stride_wd_k), acc_a, IEEE)
        if R_B > 0:
            acc_b = _dot(xt, _load_kc(wd_ptr, cb, mb, kk, kmask, stride_wd_r, stride_wd_k), acc_b, IEEE)
    hs_a = _fwd_columns(acc_a, ca, ma, rows, rmask, bd_ptr, cs_ptr, pre_ptr, stride_pm, SAVE_PRE, wu_ptr.dtype.element_ty)
    if R_B > 0:
        hs_b = _fwd_columns(acc_b, cb, mb, rows, rmask, bd_ptr, cs_ptr, pre_ptr, stride_pm, SAVE_PRE, wu_ptr.dtype.element_ty)

    # up projection, BLOCK_N output columns at a time, bias/scale/residual in the epilogue (one write of y)
    for n0 in range(0, D, BLOCK_N):
        nn = n0 + tl.arange(0, BLOCK_N)
        nmask = nn < D
        out = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        out = _dot(hs_a, _load_cn(wu_ptr, ca, ma, nn, nmask, stride_wu_r, stride_wu_n), out, IEEE)
        if R_B > 0:
            out = _dot(hs_b, _load_cn(wu_ptr, cb, mb, nn, nmask, stride_wu_r, stride_wu_n), out, IEEE)
        bu = tl.load(bu_ptr + nn, mask=nmask, other=0.0).to(tl.float32)
        out = scale * (out + bu[None, :])
        omask = rmask[:, None] & nmask[None, :]
        if HAS_BASE:
            out += tl.load(base_ptr + rows[:, None] * stride_bm + nn[None, :], mask=omask, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows[:, None] * stride_ym + nn[None, :], out.to(y_ptr.dtype.element_ty), mask=omask)


# ----------------------------------------------------------------------------------------------
# backward, 1: row kernel (dx, dpre, g)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _bwd_columns(pre, dhs, cols, cmask, rows, rmask, cs_ptr, g_ptr, dpre_ptr, stride_gm, stride_dpm):
    """One column group: stores ``g = GELU(pre)`` and ``dpre = dhs * cs * GELU'(pre)`` (compute dtype),
    returns dpre in the compute dtype (the operand of ``dx = dpre Wd``)."""
    valid = rmask[:, None] & cmask[None, :]
    cs = tl.load(cs_ptr + cols, mask=cmask, other=0.0)
    g = tl.where(valid, gelu(pre), 0.0)
    dpre = tl.where(valid, dhs * cs[None, :] * gelu_grad(pre), 0.0)
    tl.store(g_ptr + rows[:, None] * stride_gm + cols[None, :], g.to(g_ptr.dtype.element_ty), mask=valid)
    dpre_c = dpre.to(dpre_ptr.dtype.element_ty)
    tl.store(dpre_ptr + rows[:, None] * stride_dpm + cols[None, :], dpre_c, mask=valid)
    return dpre_c


@triton.autotune(configs=_BWD_CONFIGS, key=["D", "R"])
@triton.jit
def _bottleneck_bwd_rows_kernel(
    dy_ptr, x_ptr, pre_ptr, wd_ptr, bd_ptr, wu_ptr, cs_ptr, dx_ptr, dpre_ptr, g_ptr,
    N, D, R,
    stride_dym, stride_xm, stride_pm, stride_wd_r, stride_wd_k, stride_wu_n, stride_wu_r,
    stride_dxm, stride_dpm, stride_gm,
    scale,
    RECOMPUTE: tl.constexpr, IEEE: tl.constexpr, R_A: tl.constexpr, R_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rmask = rows < N
    ca = tl.arange(0, R_A)
    ma = ca < R
    if R_B > 0:
        cb = R_A + tl.arange(0, R_B)
        mb = cb < R

    # pre-activation: saved, or recomputed from x (one extra pass over x)
    if RECOMPUTE:
        pre_a = tl.zeros((BLOCK_M, R_A), dtype=tl.float32)
        if R_B > 0:
            pre_b = tl.zeros((BLOCK_M, R_B), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            kmask = kk < D
            xt = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :],
                         mask=rmask[:, None] & kmask[None, :], other=0.0)
            pre_a = _dot(xt, _load_kc(wd_ptr, ca, ma, kk, kmask, stride_wd_r, stride_wd_k), pre_a, IEEE)
            if R_B > 0:
                pre_b = _dot(xt, _load_kc(wd_ptr, cb, mb, kk, kmask, stride_wd_r, stride_wd_k), pre_b, IEEE)
        pre_a += tl.load(bd_ptr + ca, mask=ma, other=0.0).to(tl.float32)[None, :]
        if R_B > 0:
            pre_b += tl.load(bd_ptr + cb, mask=mb, other=0.0).to(tl.float32)[None, :]
    else:
        pre_a = tl.load(pre_ptr + rows[:, None] * stride_pm + ca[None, :],
                        mask=rmask[:, None] & ma[None, :], other=0.0).to(tl.float32)
        if R_B > 0:
            pre_b = tl.load(pre_ptr + rows[:, None] * stride_pm + cb[None, :],
                            mask=rmask[:, None] & mb[None, :], other=0.0).to(tl.float32)

    # dhs = scale * dy @ Wu   (one pass over dy)
    dhs_a = tl.zeros((BLOCK_M, R_A), dtype=tl.float32)
    if R_B > 0:
        dhs_b = tl.zeros((BLOCK_M, R_B), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < D
        dyt = tl.load(dy_ptr + rows[:, None] * stride_dym + kk[None, :],
                      mask=rmask[:, None] & kmask[None, :], other=0.0).to(wu_ptr.dtype.element_ty)
        dhs_a = _dot(dyt, _load_kc(wu_ptr, ca, ma, kk, kmask, stride_wu_r, stride_wu_n), dhs_a, IEEE)
        if R_B > 0:
            dhs_b = _dot(dyt, _load_kc(wu_ptr, cb, mb, kk, kmask, stride_wu_r, stride_wu_n), dhs_b, IEEE)

    dpre_a = _bwd_columns(pre_a, dhs_a * scale, ca, ma, rows, rmask, cs_ptr, g_ptr, dpre_ptr, stride_gm, stride_dpm)
    if R_B > 0:
        dpre_b = _bwd_columns(pre_b, dhs_b * scale, cb, mb, rows, rmask, cs_ptr, g_ptr, dpre_ptr, stride_gm, stride_dpm)

    # dx = dpre @ Wd, BLOCK_N columns at a time
    for n0 in range(0, D, BLOCK_N):
        nn = n0 + tl.arange(0, BLOCK_N)
        nmask = nn < D
        dxt = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        dxt = _dot(dpre_a, _load_cn(wd_ptr, ca, ma, nn, nmask, stride_wd_r, stride_wd_k), dxt, IEEE)
        if R_B > 0:
            dxt = _dot(dpre_b, _load_cn(wd_ptr, cb, mb, nn, nmask, stride_wd_r, stride_wd_k), dxt, IEEE)
        tl.store(dx_ptr + rows[:, None] * stride_dxm + nn[None, :], dxt.to(dx_ptr.dtype.element_ty),
                 mask=rmask[:, None] & nmask[None, :])


# ----------------------------------------------------------------------------------------------
# backward, 2/3: split-K  C[s] = A[rows_s]ᵀ B[rows_s]  (+ column sums), fp32 partials
# ----------------------------------------------------------------------------------------------
@triton.autotune(configs=_ATB_CONFIGS, key=["P", "Q"])
@triton.jit
def _atb_splitk_kernel(
    a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr,
    N, P, Q, rows_per_split,
    stride_am, stride_bm, stride_cs, stride_cp, stride_cq, stride_sas, stride_sbs,
    SUM_A: tl.constexpr, SUM_B: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    """``c[s, p, q] = Σ_{n in split s} a[n, p] b[n, q]`` (b cast to a's dtype for the dot), fp32;
    optionally ``sa[s, p] = Σ a[n, p]`` and ``sb[s, q] = Σ b[n, q]`` (fp32, from b's own dtype)."""
    pid_p = tl.program_id(0)
    pid_q = tl.program_id(1)
    pid_s = tl.program_id(2)
    pp = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    qq = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    pmask = pp < P
    qmask = qq < Q
    start = pid_s * rows_per_split
    end = tl.minimum(start + rows_per_split, N)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    suma = tl.zeros((BLOCK_P,), dtype=tl.float32)
    sumb = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    for i in range(0, tl.cdiv(rows_per_split, BLOCK_M)):
        mm = (start + i * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        mmask = mm < end
        at = tl.load(a_ptr + mm[None, :] * stride_am + pp[:, None],
                     mask=pmask[:, None] & mmask[None, :], other=0.0)  # (BLOCK_P, BLOCK_M) = Aᵀ tile
        bt = tl.load(b_ptr + mm[:, None] * stride_bm + qq[None, :],
                     mask=mmask[:, None] & qmask[None, :], other=0.0)  # (BLOCK_M, BLOCK_Q)
        if SUM_A:
            suma += tl.sum(at.to(tl.float32), 1)
        if SUM_B:
            sumb += tl.sum(bt.to(tl.float32), 0)
        acc = _dot(at, bt.to(at.dtype), acc, IEEE)
    tl.store(c_ptr + pid_s * stride_cs + pp[:, None] * stride_cp + qq[None, :] * stride_cq, acc,
             mask=pmask[:, None] & qmask[None, :])
    if SUM_A:
        if pid_q == 0:
            tl.store(sa_ptr + pid_s * stride_sas + pp, suma, mask=pmask)
    if SUM_B:
        if pid_p == 0:
            tl.store(sb_ptr + pid_s * stride_sbs + qq, sumb, mask=qmask)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def _ieee(dtype: torch.dtype) -> bool:
    """fp32 operands: full-precision dots unless the user allowed TF32 for fp32 matmuls (as eager does).
    16-bit operands: tensor cores either way (the flag only matters for fp32)."""
    return dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D tensor whose last dimension is unit-stride (no copy when it already is)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_args(x, wd, bd, wu, bu, col_scale, base):
    if x.dim() != 2:
        raise ValueError(f"bottleneck: x must be 2-D (N, d), got shape {tuple(x.shape)}")
    n, d = x.shape
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"bottleneck: the Triton kernels support float32/float16/bfloat16 inputs, got x.dtype={x.dtype}")
    if wd.dim() != 2 or wd.shape[1] != d:
        raise ValueError(f"bottleneck: wd must be (R, {d}), got {tuple(wd.shape)}")
    r = wd.shape[0]
    expected = {"bd": (bd, (r,)), "wu": (wu, (d, r)), "bu": (bu, (d,)), "col_scale": (col_scale, (r,)),
                "base": (base, (n, d))}
    for name, (t, shape) in expected.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"bottleneck: {name} must have shape {shape}, got {tuple(t.shape)}")
    for name, t in (("wd", wd), ("bd", bd), ("wu", wu)):
        if t.dtype != x.dtype:
            raise TypeError(f"bottleneck: {name} must have x's dtype {x.dtype} (the compute dtype), got {t.dtype}")
    for name, t in (("bu", bu), ("base", base)):
        if t is not None and not t.is_floating_point():
            raise TypeError(f"bottleneck: {name} must be floating, got {t.dtype}")
    if col_scale.dtype != torch.float32:
        raise TypeError(f"bottleneck: col_scale must be float32, got {col_scale.dtype}")
    devs = {t.device for t in (x, wd, bd, wu, bu, col_scale, base) if t is not None}
    if len(devs) != 1:
        raise RuntimeError(f"bottleneck: all tensors must be on one device, got {sorted(map(str, devs))}")
    return n, d, r


def bottleneck_fwd(x, wd, bd, wu, bu, col_scale, scale: float, base=None, save_pre: bool = True, out_dtype=None):
    """``y = scale * ((GELU(x Wdᵀ + bd) * col_scale) Wuᵀ + bu) (+ base)``; returns ``(y, pre)``.

    ``x (N, d)``, ``wd (R, d)``, ``bd (R,)``, ``wu (d, R)`` in the compute dtype; ``bu (d,)`` and
    ``base (N, d)`` in any float dtype; ``col_scale (R,)`` float32. ``y`` is in ``out_dtype``
    (default ``x.dtype``); ``pre (N, R)`` is ``x Wdᵀ + bd`` in ``x.dtype``, or None if not ``save_pre``.
    """
    n, d, r = _check_args(x, wd, bd, wu, bu, col_scale, base)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    x = _rows(x)
    base = _rows(base) if base is not None else None
    y = torch.empty((n, d), device=x.device, dtype=out_dtype)
    pre = torch.empty((n, r), device=x.device, dtype=x.dtype) if save_pre else None
    if n == 0:
        return y, pre
    bu = bu.contiguous()
    bd = bd.contiguous()
    col_scale = col_scale.contiguous()

    ra, rb = column_groups(r)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_M"]),)

    _bottleneck_fwd_kernel[grid](
        x, wd, bd, wu, bu, col_scale, base if base is not None else x, y, pre if pre is not None else y,
        n, d, r,
        x.stride(0), wd.stride(0), wd.stride(1), wu.stride(0), wu.stride(1),
        base.stride(0) if base is not None else 0, y.stride(0), pre.stride(0) if pre is not None else 0,
        float(scale),
        HAS_BASE=base is not None, SAVE_PRE=pre is not None, IEEE=_ieee(x.dtype), R_A=ra, R_B=rb,
    )
    return y, pre


def _num_splits(n: int, p: int, q: int, device: torch.device) -> int:
    """How many row slices the weight-gradient reduction uses: enough programs to fill the GPU
    (about two waves of 64x64 tiles), never more than one slice per ``_SPLIT_ROWS`` rows."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = 2  # interpreter: a couple of splits, enough to exercise the reduction
    tiles = triton.cdiv(p, 64) * triton.cdiv(q, 64)
    want = max(1, (2 * sms) // tiles)
    return max(1, min(want, triton.cdiv(n, _SPLIT_ROWS)))


def _atb(a, b, out_layout_qp: bool, sum_a: bool, sum_b: bool):
    """``aᵀ b`` in fp32, shape (P, Q) or, with ``out_layout_qp``, its transpose (Q, P) contiguous;
    plus the column sums of a (P,) and b (Q,) when asked. Deterministic split-K."""
    n, p = a.shape
    q = b.shape[1]
    s = _num_splits(n, p, q, a.device)
    rows_per_split = triton.cdiv(triton.cdiv(n, s), _SPLIT_ROWS) * _SPLIT_ROWS
    s = triton.cdiv(n, rows_per_split)
    f32 = dict(device=a.device, dtype=torch.float32)
    if out_layout_qp:
        part = torch.empty((s, q, p), **f32)
        stride_cp, stride_cq = part.stride(2), part.stride(1)
    else:
        part = torch.empty((s, p, q), **f32)
        stride_cp, stride_cq = part.stride(1), part.stride(2)
    sa = torch.empty((s, p), **f32) if sum_a else part
    sb = torch.empty((s, q), **f32) if sum_b else part

    def grid(meta):
        return (triton.cdiv(p, meta["BLOCK_P"]), triton.cdiv(q, meta["BLOCK_Q"]), s)

    _atb_splitk_kernel[grid](
        a, b, part, sa, sb,
        n, p, q, rows_per_split,
        a.stride(0), b.stride(0), part.stride(0), stride_cp, stride_cq,
        sa.stride(0) if sum_a else 0, sb.stride(0) if sum_b else 0,
        SUM_A=sum_a, SUM_B=sum_b, IEEE=_ieee(a.dtype),
    )
    c = part.sum(0)
    return c, (sa.sum(0) if sum_a else None), (sb.sum(0) if sum_b else None)


def bottleneck_bwd(dy, x, pre, wd, bd, wu, col_scale, scale: float):
    """Gradients of :func:`bottleneck_fwd`: ``(dx, dwd, dbd, dwu, dbu, dcol_scale)``.

    ``dy (N, d)`` any float dtype; ``x``, ``wd``, ``bd``, ``wu``, ``col_scale`` as given to the forward;
    ``pre`` its saved ``pre`` or None (then recomputed from ``x`` in the row kernel).
    ``dx`` is in ``x.dtype``; ``dwd (R, d)``, ``dbd (R,)``, ``dwu (d, R)``, ``dbu (d,)``,
    ``dcol_scale (R,)`` are float32. The gradient of ``base`` (if the forward had one) is ``dy`` itself.
    """
    n, d, r = _check_args(x, wd, bd, wu, None, col_scale, None)
    if tuple(dy.shape) != (n, d) or not dy.is_floating_point():
        raise ValueError(f"bottleneck_bwd: dy must be a float tensor of shape {(n, d)}, got {tuple(dy.shape)} {dy.dtype}")
    if pre is not None and (tuple(pre.shape) != (n, r) or pre.dtype != x.dtype):
        raise ValueError(f"bottleneck_bwd: pre must be {(n, r)} in {x.dtype}, got {tuple(pre.shape)} {pre.dtype}")
    f32 = dict(device=x.device, dtype=torch.float32)
    dx = torch.empty((n, d), device=x.device, dtype=x.dtype)
    if n == 0:
        z = lambda *s: torch.zeros(s, **f32)  # noqa: E731
        return dx, z(r, d), z(r), z(d, r), z(d), z(r)
    dy = _rows(dy)
    x = _rows(x)
    pre = _rows(pre) if pre is not None else None
    bd = bd.contiguous()
    col_scale = col_scale.contiguous()
    dpre = torch.empty((n, r), device=x.device, dtype=x.dtype)
    g = torch.empty((n, r), device=x.device, dtype=x.dtype)
    ieee = _ieee(x.dtype)
    ra, rb = column_groups(r)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_M"]),)

    _bottleneck_bwd_rows_kernel[grid](
        dy, x, pre if pre is not None else dpre, wd, bd, wu, col_scale, dx, dpre, g,
        n, d, r,
        dy.stride(0), x.stride(0), pre.stride(0) if pre is not None else 0,
        wd.stride(0), wd.stride(1), wu.stride(0), wu.stride(1),
        dx.stride(0), dpre.stride(0), g.stride(0),
        float(scale),
        RECOMPUTE=pre is None, IEEE=ieee, R_A=ra, R_B=rb,
    )
    dwd, dbd, _ = _atb(dpre, x, out_layout_qp=False, sum_a=True, sum_b=False)  # (R, d), (R,)
    gt, _, sdy = _atb(g, dy, out_layout_qp=True, sum_a=False, sum_b=True)  # G = dyᵀ g (d, R), Σ dy (d,)
    scale = float(scale)
    dwu = gt * (scale * col_scale)[None, :]
    dbu = sdy * scale
    dcs = (gt * wu.float()).sum(0) * scale
    return dx, dwd, dbd, dwu, dbu, dcs
