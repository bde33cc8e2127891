"""Q-Linear (UPetu's EQAM building block): Triton kernels and their launchers.

Maths (SPEC §1): per output row ``o``, ``s_o = max(max_k |W[o,k]| / qmax, 1e-8)`` with
``qmax = 2^(b-1) - 1``; ``q = clamp(round_half_even(W / s), -qmax - 1, qmax)``; ``Wq = q s``;
``y = x Wqᵀ + bias`` (optionally ``GELU(.)``). Backward (straight-through estimator):
``dX = dY Wq``, ``dW = dYᵀ X``, ``dbias = Σ dY`` (``dY`` first multiplied by ``GELU'(pre)`` when the
GELU epilogue is on).

Kernels
* ``_row_scale_kernel``: the per-row scales into an ``(out,)`` float32 buffer (the only thing written
  before the matmul; the quantised weight itself is never materialised).
* ``_fwd_kernel``: ``x Wqᵀ (+ bias) (GELU)``; the weight tile is loaded in float, quantised in
  registers (``W_MODE=0``), or loaded as int8 codes (``1``) or two int4 codes per byte (``2``) and
  dequantised in registers (packed inference weights). Optionally stores the pre-activation.
* ``_bwd_dx_kernel``: ``dX = dPre Wq`` with ``dPre = dY * GELU'(pre)`` computed on the fly; the
  programs of the first ``dX`` column block also write ``dPre`` for the ``dW`` kernel.
* ``_bwd_dw_kernel``: ``dW = dPreᵀ X`` and ``dbias = Σ dPre`` in one pass over the rows, split over
  the row axis (float32 partials summed afterwards; deterministic).
* ``_quantize_rows_kernel`` (scales and ``Wq`` in one launch) and ``_weight_kernel`` (``Wq`` from given
  scales, or dequantised packed codes): materialise *small* weights only (the EQAM bottleneck path hands
  them to the shared bottleneck kernels of ``kernels/mufa.py``).

Rounding: half to even is written out (floor and parity), and ``W / s`` uses ``div_rn`` (IEEE
division; a plain ``/`` in Triton is an approximate division on NVIDIA GPUs), so the codes equal
``torch.round(W / s)`` bit for bit.

Packed int4 layout: ``qweight (out, ceil(in / 2))`` uint8, byte ``j`` of a row holds code ``2j`` in
its low nibble and ``2j + 1`` in its high nibble (two's complement); an odd ``in`` is padded with 0.
Written for triton >= 3.6 (torch 2.11's; CI's interpreter 3.8; AOT-compiled under 3.6 / 3.8 / 3.9). Tiles come
from the device through the ``plan_*`` functions below (policy: ``kernels/_launch.py``).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import gelu, gelu_grad
from ._launch import (
    LAUNCH_OPTIONS, SUPPORTED_DTYPES, DeviceProps, PlannedLaunch, arch_unsupported, cast, cdiv, device_props, dot,
    dtype_bytes, pad_pow2, precision, smem_bytes, split_rows, static_assert_tile, static_assert_tiles,
)

# weight tile modes (the W_MODE constexpr)
FLOAT = 0  # float master weight, fake-quantised in registers
INT8 = 1  # int8 codes
INT4 = 2  # two int4 codes per uint8
_FLOAT = tl.constexpr(FLOAT)  # the same, as the kernels read them
_INT8 = tl.constexpr(INT8)
CODE_QMAX = 127  # QMAX of the packed-code modes: unused by their dequantisation (the codes are stored)


# ----------------------------------------------------------------------------- jit helpers


@triton.jit
def round_half_even(v):
    """Round to nearest, ties to even (``torch.round``), written with floor and parity (exact for |v| < 2^23)."""
    f = tl.floor(v)
    d = v - f
    h = f * 0.5
    odd = (h - tl.floor(h)) != 0.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def _weight_tile(W, n2, k2, mask, s2, stride_wn, stride_wk, W_MODE: tl.constexpr, QMAX: tl.constexpr):
    """Dequantised / fake-quantised weight values ``q * s`` (float32) at rows ``n2``, columns ``k2``.

    ``n2``/``k2``/``mask``/``s2`` are broadcast to the tile's shape by the caller (either orientation).
    """
    if W_MODE == _FLOAT:
        w = tl.load(W + n2 * stride_wn + k2 * stride_wk, mask=mask, other=0.0).to(tl.float32)
        q = round_half_even(tl.math.div_rn(w, s2))
        q = tl.minimum(tl.maximum(q, -QMAX - 1.0), QMAX * 1.0)
    elif W_MODE == _INT8:
        q = tl.load(W + n2 * stride_wn + k2 * stride_wk, mask=mask, other=0).to(tl.float32)
    else:
        byte = tl.load(W + n2 * stride_wn + (k2 // 2) * stride_wk, mask=mask, other=0).to(tl.int32)
        nib = (byte >> ((k2 % 2) * 4)) & 15
        q = (nib - ((nib >> 3) << 4)).to(tl.float32)
    return q * s2


@triton.jit
def _row_scales(W, N, K, stride_wn, stride_wk, QMAX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The ``BLOCK_N`` rows of block ``program_id(0)``, their mask and their scales
    ``s = max(max_k |W[n, k]| / QMAX, 1e-8)`` (float32, IEEE division: SPEC §1's clamp)."""
    tl.static_assert((BLOCK_N & (BLOCK_N - 1)) == 0, "row blocks: a power of two rows")
    static_assert_tile(BLOCK_K)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    amax = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        m = nmask[:, None] & (offs_k[None, :] < K)
        w = tl.load(W + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk, mask=m, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(w))
    s = tl.math.div_rn(tl.max(amax, axis=1), tl.full([BLOCK_N], QMAX, tl.float32))
    return offs_n, nmask, tl.maximum(s, 1e-8)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _row_scale_kernel(W, S, N, K, stride_wn, stride_wk, QMAX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n, nmask, s = _row_scales(W, N, K, stride_wn, stride_wk, QMAX, BLOCK_N, BLOCK_K)
    tl.store(S + offs_n, s, mask=nmask)


@triton.jit
def _weight_kernel(W, S, Q, N, K, stride_wn, stride_wk, stride_qn, W_MODE: tl.constexpr, QMAX: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``Q[n, k] = q * s`` in Q's dtype (for small weights only)."""
    static_assert_tile(BLOCK_N)
    static_assert_tile(BLOCK_K)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    nmask = offs_n < N
    mask = nmask[:, None] & (offs_k[None, :] < K)
    s = tl.load(S + offs_n, mask=nmask, other=1.0)
    wq = _weight_tile(W, offs_n[:, None], offs_k[None, :], mask, s[:, None], stride_wn, stride_wk, W_MODE, QMAX)
    tl.store(Q + offs_n[:, None] * stride_qn + offs_k[None, :], cast(wq, Q.dtype.element_ty, PREC), mask=mask)


@triton.jit
def _quantize_rows_kernel(W, Q, S, N, K, stride_wn, stride_wk, stride_qn, QMAX: tl.constexpr, PREC: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Scales and ``Wq = q * s`` of ``BLOCK_N`` whole rows in one program (two passes over each row)."""
    offs_n, nmask, s = _row_scales(W, N, K, stride_wn, stride_wk, QMAX, BLOCK_N, BLOCK_K)
    tl.store(S + offs_n, s, mask=nmask)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        m = nmask[:, None] & (offs_k[None, :] < K)
        wq = _weight_tile(W, offs_n[:, None], offs_k[None, :], m, s[:, None], stride_wn, stride_wk, _FLOAT, QMAX)
        tl.store(Q + offs_n[:, None] * stride_qn + offs_k[None, :], cast(wq, Q.dtype.element_ty, PREC), mask=m)


@triton.jit
def _fwd_kernel(
    X, W, S, B, Y, PRE,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym,
    W_MODE: tl.constexpr, QMAX: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, SAVE_PRE: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    static_assert_tiles(BLOCK_M, BLOCK_N, BLOCK_K)
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    gsize = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % gsize
    pid_n = (pid % group) // gsize

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < M
    nmask = offs_n < N
    s = tl.load(S + offs_n, mask=nmask, other=1.0)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < K
        x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mmask[:, None] & kmask[None, :], other=0.0)
        # Wqᵀ tile (BLOCK_K, BLOCK_N)
        wt = _weight_tile(W, offs_n[None, :], offs_k[:, None], kmask[:, None] & nmask[None, :], s[None, :], stride_wn, stride_wk, W_MODE, QMAX)
        acc = dot(x, cast(wt, x.dtype, PREC), acc, PREC)
    if HAS_BIAS:
        acc += tl.load(B + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    omask = mmask[:, None] & nmask[None, :]
    optr = offs_m[:, None] * stride_ym + offs_n[None, :]
    if SAVE_PRE:
        tl.store(PRE + optr, cast(acc, PRE.dtype.element_ty, PREC), mask=omask)
    if GELU:
        acc = gelu(acc)
    tl.store(Y + optr, cast(acc, Y.dtype.element_ty, PREC), mask=omask)


@triton.jit
def _bwd_dx_kernel(
    DY, PRE, W, S, DX, DPRE,
    M, N, K,
    stride_dym, stride_wn, stride_wk, stride_dxm,
    QMAX: tl.constexpr, GELU: tl.constexpr, WRITE_DPRE: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``DX (M, K) = dPre (M, N) @ Wq (N, K)``, looping over N; ``dPre = DY * GELU'(PRE)`` if GELU."""
    static_assert_tiles(BLOCK_M, BLOCK_N, BLOCK_K)
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mmask = offs_m < M
    kmask = offs_k < K
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        gmask = mmask[:, None] & nmask[None, :]
        gptr = offs_m[:, None] * stride_dym + offs_n[None, :]
        g = tl.load(DY + gptr, mask=gmask, other=0.0)
        if GELU:
            pre = tl.load(PRE + gptr, mask=gmask, other=0.0).to(tl.float32)
            g = cast(g.to(tl.float32) * gelu_grad(pre), DY.dtype.element_ty, PREC)
            if WRITE_DPRE:
                tl.store(DPRE + gptr, g, mask=gmask & (pid_k == 0))
        s = tl.load(S + offs_n, mask=nmask, other=1.0)
        w = _weight_tile(W, offs_n[:, None], offs_k[None, :], nmask[:, None] & kmask[None, :], s[:, None], stride_wn, stride_wk, _FLOAT, QMAX)
        acc = dot(g, cast(w, g.dtype, PREC), acc, PREC)
    tl.store(DX + offs_m[:, None] * stride_dxm + offs_k[None, :], cast(acc, DX.dtype.element_ty, PREC), mask=mmask[:, None] & kmask[None, :])


@triton.jit
def _bwd_dw_kernel(
    G, X, DW, DB,
    M, N, K, ROWS_PER_SPLIT,
    stride_gm, stride_xm, stride_xk, stride_dws, stride_dwn, stride_dbs,
    HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``DW[split] (N, K) = Gᵀ X`` and ``DB[split] (N,) = Σ G`` over this split's rows (float32)."""
    static_assert_tiles(BLOCK_M, BLOCK_N, BLOCK_K)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    nmask = offs_n < N
    kmask = offs_k < K
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    bacc = tl.zeros([BLOCK_N], dtype=tl.float32)
    row0 = pid_s * ROWS_PER_SPLIT
    row_end = tl.minimum(row0 + ROWS_PER_SPLIT, M)
    for m0 in range(row0, row_end, BLOCK_M):
        offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        mmask = offs_m < row_end
        gt = tl.load(G + offs_m[None, :] * stride_gm + offs_n[:, None], mask=nmask[:, None] & mmask[None, :], other=0.0)
        x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mmask[:, None] & kmask[None, :], other=0.0)
        acc = dot(gt, cast(x, gt.dtype, PREC), acc, PREC)
        if HAS_BIAS:
            bacc += tl.sum(gt.to(tl.float32), axis=1)
    tl.store(DW + pid_s * stride_dws + offs_n[:, None] * stride_dwn + offs_k[None, :], acc, mask=nmask[:, None] & kmask[None, :])
    if HAS_BIAS:
        tl.store(DB + pid_s * stride_dbs + offs_n, bacc, mask=nmask & (pid_k == 0))


# ----------------------------------------------------------------------------- plans

# Preferred tiles; a plan shrinks them (stages first, then the K chunk, then N, then M) until the
# shared-memory estimate fits the device: the same choice on sm_90 as the fixed tiles these kernels had
# (sm_90 AOT-checked), smaller ones on 99 KB cards (sm_86 / sm_89 / sm_120) and in fp32.


class TilePlan(NamedTuple):
    """One launch's tiles: ``BLOCK_M/N/K``, ``num_warps``, ``num_stages`` (and the estimate it was chosen by)."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int
    num_stages: int
    smem: int

    def blocks(self) -> dict:
        """The block constexprs (``BLOCK_M`` is 0 for the row kernels, which take only ``BLOCK_N/K``)."""
        b = dict(BLOCK_M=self.BLOCK_M, BLOCK_N=self.BLOCK_N, BLOCK_K=self.BLOCK_K)
        return b if self.BLOCK_M else {k: v for k, v in b.items() if k != "BLOCK_M"}

    def config(self) -> triton.Config:
        return triton.Config(self.blocks(), num_warps=self.num_warps, num_stages=self.num_stages)

    def launch_kwargs(self) -> dict:
        return dict(self.blocks(), num_warps=self.num_warps, num_stages=self.num_stages)


def _warps(a: int, b: int) -> int:
    return 8 if a * b >= 128 * 128 else 4


def _shrink(bm, bn, bk, stages, estimate, props, warps_of, min_stages=2):
    """The first of ``(bm, bn, bk, stages)`` shrunk step by step (stages → ``min_stages``, then halving bk,
    bn, bm down to 16) whose ``estimate(bm, bn, bk, stages)`` fits ``props``; the smallest if none does."""
    while True:
        est = estimate(bm, bn, bk, stages)
        if est <= props.smem_per_block:
            break
        if stages > min_stages:
            stages -= 1
        elif bk > 32:
            bk //= 2
        elif bn > 32:
            bn //= 2
        elif bm > 32:
            bm //= 2
        elif bk > 16:
            bk //= 2
        elif bn > 16:
            bn //= 2
        elif bm > 16:
            bm //= 2
        elif stages > 1:
            stages -= 1
        else:
            break
    return TilePlan(bm, bn, bk, warps_of(bm, bn, bk), stages, est)


def _wbytes(mode: int, wdtype) -> int:
    return 1 if mode in (INT8, INT4) else dtype_bytes(wdtype)


def plan_fwd(m: int, n: int, k: int, dtype: torch.dtype, props: DeviceProps, *, mode: int = FLOAT,
             w_dtype: torch.dtype = torch.float32) -> TilePlan:
    """Tiles of ``_fwd_kernel`` for ``x (m, k)`` in ``dtype`` times a ``(n, k)`` weight (float ``w_dtype``, or
    int8 / int4 codes with ``mode``). Estimate: ``stages - 1`` pipelined (x, W) chunks, the weight chunk
    converted to ``dtype`` as a dot operand, one fp32 (BLOCK_M, BLOCK_N) epilogue tile."""
    e, we = dtype_bytes(dtype), _wbytes(mode, w_dtype)

    def est(bm, bn, bk, s):
        return smem_bytes(max(1, s - 1), [bm * bk * e, bk * bn * we], scratch=bk * bn * e + bm * bn * 4)

    bm = 128 if m >= 128 else pad_pow2(m, 16, 128)
    return _shrink(bm, pad_pow2(n, 16, 128), pad_pow2(k, 16, 64), 3, est, props, lambda bm, bn, bk: _warps(bm, bn))


def plan_bwd_dx(m: int, n: int, k: int, dtype: torch.dtype, props: DeviceProps, *, gelu: bool = False,
                w_dtype: torch.dtype = torch.float32) -> TilePlan:
    """Tiles of ``_bwd_dx_kernel``: ``dX (m, k) = dPre (m, n) @ Wq (n, k)``, ``dy`` in ``dtype``. Estimate:
    pipelined (dy, pre if GELU, W) chunks, W converted as a dot operand, one fp32 (BLOCK_M, BLOCK_K) tile."""
    e, we = dtype_bytes(dtype), dtype_bytes(w_dtype)

    def est(bm, bn, bk, s):
        return smem_bytes(max(1, s - 1), [bm * bn * e * (2 if gelu else 1), bn * bk * we],
                          scratch=bn * bk * e + bm * bk * 4)

    bm = 128 if m >= 128 else pad_pow2(m, 16, 128)
    # the K axis (output columns) is this kernel's "N": shrink it before the reduction chunk
    p = _shrink(bm, pad_pow2(k, 16, 128), pad_pow2(n, 16, 64), 3,
                lambda bm, bk_, bn_, s: est(bm, bn_, bk_, s), props, lambda bm, bk_, bn_: _warps(bm, bk_))
    return TilePlan(p.BLOCK_M, p.BLOCK_K, p.BLOCK_N, p.num_warps, p.num_stages, p.smem)


class DwPlan(NamedTuple):
    tiles: TilePlan
    rows_per_split: int
    splits: int


def plan_bwd_dw(m: int, n: int, k: int, dtype: torch.dtype, props: DeviceProps, *, split: int | None = None) -> DwPlan:
    """Tiles and row split of ``_bwd_dw_kernel``: ``dW (n, k) = dPreᵀ X`` over ``m`` rows (``dPre``/``X`` in
    ``dtype``); about two waves of output tiles over the SMs, each split at least ``4 * BLOCK_M`` rows.
    ``split`` overrides the number of splits (clamped)."""
    e = dtype_bytes(dtype)

    def est(bm, bn, bk, s):
        return smem_bytes(max(1, s - 1), [bn * bm * e, bm * bk * e], scratch=bn * bk * 4)

    p = _shrink(64, pad_pow2(n, 16, 128), pad_pow2(k, 16, 128), 3, lambda bm, bn, bk, s: est(bm, bn, bk, s), props,
                lambda bm, bn, bk: _warps(bn, bk))
    tiles = cdiv(n, p.BLOCK_N) * cdiv(k, p.BLOCK_K)
    if split is None:
        rows, s = split_rows(m, tiles, props, 4 * p.BLOCK_M)
    else:
        s = max(1, min(int(split), cdiv(m, p.BLOCK_M)))
        rows = cdiv(cdiv(m, s), p.BLOCK_M) * p.BLOCK_M
        s = cdiv(m, rows)
    return DwPlan(p, rows, s)


def plan_rows(n: int, k: int, props: DeviceProps, *, rows_hi: int = 16, k_hi: int = 256, rows_lo: int = 1) -> TilePlan:
    """Tiles of the element-wise weight kernels (scales, quantise, dequantise): ``BLOCK_N`` rows ×
    ``BLOCK_K`` columns in registers (no pipelined loads: a few KB of reduction scratch at most)."""
    bn, bk = pad_pow2(n, rows_lo, rows_hi), pad_pow2(k, 16, k_hi)
    return TilePlan(0, bn, bk, 4, 3, bn * 4)  # Triton's default warps/stages (what these launches always used)


def why_unsupported(*, dtype: torch.dtype, props: DeviceProps, **shapes) -> str | None:
    """Why the Q-Linear kernels cannot run these inputs on ``props`` (None: they can): any ``m, n, k``, any
    bit width 2..8, float32/float16/bfloat16 activations on sm_75+ (``tools/aot_compile.py``)."""
    bits = shapes.get("bits")
    if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8):
        return f"bits={bits!r} (Q-Linear takes 2..8)"
    return arch_unsupported(dtype, props, bf16_min_arch=0)


# ----------------------------------------------------------------------------- launchers


def qmax_of(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 2..8, got {bits!r}")
    return 2 ** (bits - 1) - 1


def _check_2d(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")


# Argument lists, built in one place for the launchers and for aot_launches (meta tensors there).
def _row_scale_args(weight, s, qmax, plan):
    n, k = weight.shape
    return dict(W=weight, S=s, N=n, K=k, stride_wn=weight.stride(0), stride_wk=weight.stride(1), QMAX=qmax,
                **plan.launch_kwargs())


def _weight_args(weight, scale, out, n, k, mode, qmax, plan, prec):
    return dict(W=weight, S=scale, Q=out, N=n, K=k, stride_wn=weight.stride(0), stride_wk=weight.stride(1),
                stride_qn=out.stride(0), W_MODE=mode, QMAX=qmax, PREC=prec, **plan.launch_kwargs())


def _quantize_args(weight, out, s, qmax, plan, prec):
    n, k = weight.shape
    return dict(W=weight, Q=out, S=s, N=n, K=k, stride_wn=weight.stride(0), stride_wk=weight.stride(1),
                stride_qn=out.stride(0), QMAX=qmax, PREC=prec, **plan.launch_kwargs())


def _fwd_args(x, weight, scale, bias, y, pre, mode, qmax, gelu, plan, prec):
    m, k = x.shape
    n = weight.shape[0]
    return dict(
        X=x, W=weight, S=scale, B=bias if bias is not None else scale, Y=y, PRE=pre if pre is not None else y,
        M=m, N=n, K=k,
        stride_xm=x.stride(0), stride_xk=x.stride(1), stride_wn=weight.stride(0), stride_wk=weight.stride(1),
        stride_ym=y.stride(0),
        W_MODE=mode, QMAX=qmax, HAS_BIAS=bias is not None, GELU=bool(gelu), SAVE_PRE=pre is not None, PREC=prec,
        GROUP_M=8, **plan.launch_kwargs(),
    )


def _dx_args(dy, pre, weight, scale, dx_t, dpre, m, n, kk, qmax, gelu, plan, prec):
    return dict(
        DY=dy, PRE=pre if gelu else dy, W=weight, S=scale, DX=dx_t, DPRE=dpre if dpre is not None else dy,
        M=m, N=n, K=kk,
        stride_dym=dy.stride(0), stride_wn=weight.stride(0), stride_wk=weight.stride(1), stride_dxm=dx_t.stride(0),
        QMAX=qmax, GELU=bool(gelu), WRITE_DPRE=dpre is not None, PREC=prec, **plan.launch_kwargs(),
    )


def _dw_args(g, x, dwp, dbp, m, n, k, needs_db, plan, prec):
    return dict(
        G=g, X=x, DW=dwp, DB=dbp, M=m, N=n, K=k, ROWS_PER_SPLIT=plan.rows_per_split,
        stride_gm=g.stride(0), stride_xm=x.stride(0), stride_xk=x.stride(1), stride_dws=dwp.stride(0),
        stride_dwn=dwp.stride(1), stride_dbs=dbp.stride(0),
        HAS_BIAS=needs_db, PREC=prec, **plan.tiles.launch_kwargs(),
    )


def row_scales(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-row scales ``s (out,)`` float32 of a float weight ``(out, in)``."""
    _check_2d("weight", weight)
    qmax = qmax_of(bits)
    n, k = weight.shape
    s = torch.empty(n, device=weight.device, dtype=torch.float32)
    if n == 0:
        return s
    plan = plan_rows(n, k, device_props(weight.device))
    _row_scale_kernel[(triton.cdiv(n, plan.BLOCK_N),)](**_row_scale_args(weight, s, qmax, plan), **LAUNCH_OPTIONS)
    return s


def weight_values(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, bits: int = 8, mode: int = FLOAT, in_features: int | None = None) -> torch.Tensor:
    """Materialise ``q * s`` as an ``(out, in)`` tensor of ``dtype`` (small weights only).

    ``mode=FLOAT``: fake-quantise the float ``weight`` with ``bits``; ``INT8``/``INT4``: dequantise packed codes.
    """
    _check_2d("weight", weight)
    n = weight.shape[0]
    k = in_features if in_features is not None else weight.shape[1]
    qmax = qmax_of(bits) if mode == FLOAT else CODE_QMAX
    out = torch.empty(n, k, device=weight.device, dtype=dtype)
    if out.numel() == 0:
        return out
    plan = plan_rows(n, k, device_props(weight.device), rows_hi=64, k_hi=128, rows_lo=16)
    _weight_kernel[(triton.cdiv(n, plan.BLOCK_N), triton.cdiv(k, plan.BLOCK_K))](
        **_weight_args(weight, scale, out, n, k, mode, qmax, plan, precision(dtype)), **LAUNCH_OPTIONS)
    return out


class FakeQuantPlan(NamedTuple):
    """:func:`run_fake_quant` of one (weight shape, strides, dtypes, bits, device): see :func:`plan_fake_quant`."""

    n: int
    k: int
    dtype: torch.dtype
    launch: PlannedLaunch


def plan_fake_quant(n: int, k: int, bits: int, w_dtype: torch.dtype, dtype: torch.dtype, device,
                    w_strides: tuple | None = None) -> FakeQuantPlan:
    """Plan :func:`fake_quant` of an ``(n, k)`` weight of ``w_dtype`` (strides ``w_strides``, default contiguous)."""
    plan = plan_rows(n, k, device_props(device))
    w = (torch.empty_strided((n, k), w_strides, device="meta", dtype=w_dtype) if w_strides
         else torch.empty((n, k), device="meta", dtype=w_dtype))
    args = _quantize_args(w, torch.empty((n, k), device="meta", dtype=dtype), torch.empty((n,), device="meta"),
                          qmax_of(bits), plan, precision(dtype))
    static = {a: v for a, v in args.items() if not isinstance(v, torch.Tensor)}
    return FakeQuantPlan(n, k, dtype, PlannedLaunch(globals(), "_quantize_rows_kernel", static,
                                                    (triton.cdiv(n, plan.BLOCK_N),)))


def run_fake_quant(plan: FakeQuantPlan, weight: torch.Tensor) -> torch.Tensor:
    """``Wq (n, k)`` in the plan's dtype (the row scales are written to a scratch tensor), one launch."""
    out = torch.empty((plan.n, plan.k), device=weight.device, dtype=plan.dtype)
    if plan.n:
        plan.launch(weight, out, torch.empty((plan.n,), device=weight.device, dtype=torch.float32))
    return out


def fake_quant(weight: torch.Tensor, bits: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Wq (out, in) in dtype, s (out,) float32)`` of a float weight in ONE launch (small weights only)."""
    _check_2d("weight", weight)
    qmax = qmax_of(bits)
    n, k = weight.shape
    out = torch.empty(n, k, device=weight.device, dtype=dtype)
    s = torch.empty(n, device=weight.device, dtype=torch.float32)
    if n == 0:
        return out, s
    plan = plan_rows(n, k, device_props(weight.device))
    _quantize_rows_kernel[(triton.cdiv(n, plan.BLOCK_N),)](**_quantize_args(weight, out, s, qmax, plan, precision(dtype)), **LAUNCH_OPTIONS)
    return out, s


def qlinear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int = 8,
    gelu: bool = False,
    save_pre: bool = False,
    mode: int = FLOAT,
    in_features: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``y = [GELU](x Wqᵀ + bias)`` for ``x (M, K)`` (any strides), in ``x.dtype`` with float32 accumulation.

    ``weight``: float ``(N, K)`` (``mode=FLOAT``, quantised with ``bits`` and the per-row ``scale``
    from :func:`row_scales`), int8 codes ``(N, K)`` (``INT8``) or uint8 pairs ``(N, ceil(K/2))`` (``INT4``,
    pass ``in_features=K``). Returns ``(y, pre)``; ``pre = x Wqᵀ + bias`` when ``save_pre`` (else None).
    """
    _check_2d("x", x)
    _check_2d("weight", weight)
    m, k = x.shape
    n = weight.shape[0]
    if mode == FLOAT:
        kw = weight.shape[1]
    elif mode == INT8:
        kw = weight.shape[1] if in_features is None else in_features
    else:
        kw = in_features
        if kw is None or weight.shape[1] != (kw + 1) // 2:
            raise ValueError(f"int4 weight of shape {tuple(weight.shape)} does not hold in_features={in_features}")
    if kw != k:
        raise ValueError(f"x has {k} features but the weight expects {kw}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"qlinear: the Triton kernels support float32/float16/bfloat16 inputs, got x.dtype={x.dtype}")
    qmax = qmax_of(bits) if mode == FLOAT else CODE_QMAX
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    pre = torch.empty(m, n, device=x.device, dtype=x.dtype) if save_pre else None
    if m == 0 or n == 0:
        return y, pre
    if k == 0:
        y.zero_()
        if bias is not None:
            y += bias.to(y.dtype)
        if save_pre:
            pre.copy_(y)
        if gelu:
            y = torch.nn.functional.gelu(y)
        return y, pre
    plan = plan_fwd(m, n, k, x.dtype, device_props(x.device), mode=mode, w_dtype=weight.dtype)
    grid = (triton.cdiv(m, plan.BLOCK_M) * triton.cdiv(n, plan.BLOCK_N),)
    _fwd_kernel[grid](**_fwd_args(x, weight, scale, bias, y, pre, mode, qmax, gelu, plan, precision(x.dtype)), **LAUNCH_OPTIONS)
    return y, pre


def qlinear_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    pre: torch.Tensor | None,
    bits: int = 8,
    gelu: bool = False,
    has_bias: bool = True,
    needs_dx: bool = True,
    needs_dw: bool = True,
    split: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """STE backward of :func:`qlinear_fwd` (float weight): ``(dx, dw, db)``, None where not needed.

    ``dy (M, N)`` contiguous rows, ``x (M, K)`` any strides, ``pre`` the saved pre-activation if ``gelu``.
    ``dx`` in ``dy.dtype``; ``dw`` in ``weight.dtype``; ``db`` float32 (caller casts). ``split`` overrides
    the number of row splits of the ``dW`` reduction.
    """
    _check_2d("dy", dy)
    _check_2d("x", x)
    m, n = dy.shape
    k = x.shape[1]
    if dy.stride(1) != 1:
        dy = dy.contiguous()
    if gelu:
        if pre is None or pre.shape != dy.shape:
            raise ValueError("the GELU epilogue's backward needs the saved pre-activation of shape (M, N)")
        if pre.stride(1) != 1 or pre.stride(0) != dy.stride(0):
            pre = pre.contiguous()
            dy = dy.contiguous()
    qmax = qmax_of(bits)
    needs_db = has_bias
    if m == 0 or n == 0 or k == 0:
        return _bwd_degenerate(dy, x, weight, pre, gelu, needs_db, needs_dx, needs_dw)
    props = device_props(dy.device)
    dx = dw = db = None
    g = dy
    write_dpre = gelu and (needs_dw or needs_db)
    if needs_dx or write_dpre:
        # when only dPre is needed (no dx), one column block of programs runs and writes it
        dpre = torch.empty_like(dy) if write_dpre else None
        dx_t = torch.empty(m, k if needs_dx else 1, device=dy.device, dtype=dy.dtype)
        plan = plan_bwd_dx(m, n, k, dy.dtype, props, gelu=gelu, w_dtype=weight.dtype)
        grid = (triton.cdiv(m, plan.BLOCK_M), triton.cdiv(k, plan.BLOCK_K) if needs_dx else 1)
        _bwd_dx_kernel[grid](**_dx_args(dy, pre, weight, scale, dx_t, dpre, m, n, k if needs_dx else 1, qmax, gelu,
                                        plan, precision(dy.dtype)), **LAUNCH_OPTIONS)
        if needs_dx:
            dx = dx_t
        if write_dpre:
            g = dpre
    if needs_dw or needs_db:
        plan = plan_bwd_dw(m, n, k, g.dtype, props, split=split)
        dwp = torch.empty(plan.splits, n, k, device=dy.device, dtype=torch.float32)
        dbp = torch.empty(plan.splits, n, device=dy.device, dtype=torch.float32)
        grid = (triton.cdiv(n, plan.tiles.BLOCK_N), triton.cdiv(k, plan.tiles.BLOCK_K), plan.splits)
        _bwd_dw_kernel[grid](**_dw_args(g, x, dwp, dbp, m, n, k, needs_db, plan, precision(g.dtype)), **LAUNCH_OPTIONS)
        if needs_dw:
            dw = (dwp[0] if plan.splits == 1 else dwp.sum(0)).to(weight.dtype)
        if needs_db:
            db = dbp[0] if plan.splits == 1 else dbp.sum(0)
    return dx, dw, db


def _bwd_degenerate(dy, x, weight, pre, gelu, needs_db, needs_dx, needs_dw):
    """Empty rows / features: nothing for a kernel to do; plain torch on (at least partly) empty tensors."""
    m, n = dy.shape
    k = x.shape[1]
    g = dy.float()
    if gelu:
        g = torch.ops.aten.gelu_backward(g, pre.float())
    dx = torch.zeros(m, k, device=dy.device, dtype=dy.dtype) if needs_dx else None
    dw = torch.zeros(n, k, device=dy.device, dtype=weight.dtype) if needs_dw else None
    db = g.sum(0) if needs_db else None
    return dx, dw, db


# ----------------------------------------------------------------------------- AOT

# (label, in, out, rows, gelu, edge): the two Q-Linear layers of EQAM at both ConvNeXt stages (SPEC §2); the
# stage-4 layers 1024 -> 256 and 256 -> 1024 are the reduction-4 widths (the paper's budget is hidden 16)
AOT_CASES = [
    ("s1 down 128->32", 128, 32, 64 * 56 * 56, True, False),
    ("s1 up 32->128", 32, 128, 64 * 56 * 56, False, False),
    ("s4 down 1024->256", 1024, 256, 64 * 7 * 7, True, False),
    ("s4 up 256->1024", 256, 1024, 64 * 7 * 7, False, False),
    ("s4 down 1024->16", 1024, 16, 64 * 7 * 7, True, False),
    ("s4 up 16->1024", 16, 1024, 64 * 7 * 7, False, False),
]


def _strip(args: dict) -> dict:
    """A launch's kernel arguments without the config part (blocks, warps, stages: the AotLaunch's config)."""
    return {k: v for k, v in args.items() if k not in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")}


def aot_launches(props: DeviceProps, dtype: str, profile: str = "quick") -> list:
    """Every launch of the Q-Linear launchers at :data:`AOT_CASES` on ``props`` (``kernels._launch.AotLaunch``
    records built by the launchers' own argument helpers and plans). The float master weight is fp32 (autocast
    training) for a 16-bit compute dtype. ``profile``: ``_launch.aot_profile``'s names: lean (``quick``, ``ci``)
    compiles outside bf16 one bit width, no dequantisation kernel and no packed int4 forward; thin (``ci``) the
    scale / quantise kernels at 8 bits only and the dequantisation kernel for float weights only."""
    from ._launch import AotLaunch, aot_dtype, aot_profile

    tdt, prec = aot_dtype(dtype)
    prof = aot_profile(profile)
    ci, lean = prof.thin, prof.lean
    meta = lambda *shape, dt=tdt: torch.empty(shape, device="meta", dtype=dt)  # noqa: E731
    f32 = lambda *shape: meta(*shape, dt=torch.float32)  # noqa: E731
    out = []
    bits_list = (8, 4) if dtype == "bf16" or not lean else (8,)
    for label, k, n, m, gelu, edge in AOT_CASES:
        case = f"{dtype} {label}"
        w = f32(n, k)
        for bits in bits_list[:1] if ci else bits_list:
            qmax = qmax_of(bits)
            p = plan_rows(n, k, props)
            out.append(AotLaunch("qlinear._row_scale_kernel", f"{case} bits{bits}",
                                 _strip(_row_scale_args(w, f32(n), qmax, p)), (p.config(),), False, edge))
            out.append(AotLaunch("qlinear._quantize_rows_kernel", f"{case} bits{bits}",
                                 _strip(_quantize_args(w, meta(n, k), f32(n), qmax, p, prec)), (p.config(),), False, edge))
        for mode, mname in ((FLOAT, "float"), (INT8, "int8"), (INT4, "int4")):
            if (lean and dtype != "bf16") or (ci and mode != FLOAT):
                break
            wq = {FLOAT: w, INT8: meta(n, k, dt=torch.int8), INT4: meta(n, (k + 1) // 2, dt=torch.uint8)}[mode]
            p = plan_rows(n, k, props, rows_hi=64, k_hi=128, rows_lo=16)
            out.append(AotLaunch("qlinear._weight_kernel", f"{case} {mname}",
                                 _strip(_weight_args(wq, f32(n), meta(n, k), n, k, mode, CODE_QMAX if mode != FLOAT else qmax_of(4), p, prec)),
                                 (p.config(),), False, edge))
        # forward: training (float weight, both bit widths) and packed inference (int8 / int4 codes)
        variants = [(FLOAT, b, gelu, gelu) for b in bits_list] + [(INT8, 8, gelu, False)]
        if not (lean and dtype != "bf16"):
            variants.append((INT4, 4, gelu, False))
        x = meta(m, k)
        for mode, bits, use_gelu, save_pre in variants:
            wq = {FLOAT: w, INT8: meta(n, k, dt=torch.int8), INT4: meta(n, (k + 1) // 2, dt=torch.uint8)}[mode]
            p = plan_fwd(m, n, k, tdt, props, mode=mode, w_dtype=torch.float32)
            mname = {FLOAT: f"float bits{bits}", INT8: "packed int8", INT4: "packed int4"}[mode]
            args = _fwd_args(x, wq, f32(n), f32(n), meta(m, n), meta(m, n) if save_pre else None, mode,
                             qmax_of(bits) if mode == FLOAT else CODE_QMAX, use_gelu, p, prec)
            args = _strip(args)
            out.append(AotLaunch("qlinear._fwd_kernel", f"{case} {mname}{' gelu' if use_gelu else ''}", args,
                                 (p.config(),), False, edge))
        # backward (float weight): dX = dPre Wq (dPre written when GELU), dW = dPreᵀ X (+ Σ dPre)
        p = plan_bwd_dx(m, n, k, tdt, props, gelu=gelu, w_dtype=torch.float32)
        args = _dx_args(meta(m, n), meta(m, n), w, f32(n), meta(m, k), meta(m, n) if gelu else None, m, n, k,
                        qmax_of(8), gelu, p, prec)
        args = _strip(args)
        out.append(AotLaunch("qlinear._bwd_dx_kernel", f"{case}{' gelu' if gelu else ''}", args, (p.config(),), False,
                             edge))
        dp = plan_bwd_dw(m, n, k, tdt, props)
        args = _dw_args(meta(m, n), x, f32(dp.splits, n, k), f32(dp.splits, n), m, n, k, True, dp, prec)
        args = _strip(args)
        out.append(AotLaunch("qlinear._bwd_dw_kernel", f"{case} splits={dp.splits}", args, (dp.tiles.config(),), False,
                             edge))
    return out
