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

Launch plans (``kernels/_launch.py`` holds the policy): each launch's candidate configs come from
:func:`plan_fwd` / :func:`plan_bwd_rows` / :func:`plan_atb` ``(shapes..., dtype, props)``, the same
functions ``tools/aot_compile.py`` calls per arch (:func:`aot_launches`). Autotuning (keyed on
``(D, R)`` and the constexpr flags, never on the row count) runs over the configs whose shared-memory
estimate fits the device (``triton.autotune``'s ``early_config_prune`` calls the plan); when none of the
main list fits (99 KB cards, fp32, wide bottlenecks) the plan falls back to a list of small tiles, and at
least one config is always kept. Under ``TRITON_INTERPRET=1`` each kernel has a single config.
Numerics: ``PREC`` from :func:`kernels._launch.precision` (``"ieee"`` / ``"tf32"`` / ``"emulate"``):
under the interpreter 16-bit dots are widened and every float32 → bfloat16 conversion is rounded like
the GPU's (``_launch.cast``), so CPU tests check 16-bit rounding.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import gelu, gelu_grad
from ._launch import (
    INTERPRET, LAUNCH_OPTIONS, SUPPORTED_DTYPES, DeviceProps, arch_unsupported, cast, cdiv, device_props, dot, dtype_bytes,
    operand_bytes, pad_pow2, precision, prune_configs, smem_bytes, split_rows, static_assert_tile, static_assert_tiles,
)

__all__ = ["bottleneck_fwd", "bottleneck_bwd", "SUPPORTED_DTYPES", "column_groups", "plan_fwd", "plan_bwd_rows",
           "plan_atb", "why_unsupported", "aot_launches"]

# Row granularity of the split-K weight-gradient reduction (a multiple of every BLOCK_M below).
_SPLIT_ROWS = 128


def padded_width(r: int) -> int:
    """Power-of-two width holding ``r`` columns, at least 16 (tl.dot's minimum)."""
    return pad_pow2(r, 16)


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


if INTERPRET:
    _FWD_CONFIGS = [_cfg(4, 1, BLOCK_M=32, BLOCK_K=64, BLOCK_N=64)]
    _BWD_CONFIGS = [_cfg(4, 1, BLOCK_M=32, BLOCK_K=64, BLOCK_N=64)]
    _ATB_CONFIGS = [_cfg(4, 1, BLOCK_M=32, BLOCK_P=16, BLOCK_Q=64)]
    _SMALL_ROW_CONFIGS = list(_FWD_CONFIGS)
    _SMALL_ATB_CONFIGS = list(_ATB_CONFIGS)
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
    # Fallback of the row kernels when no config above fits the device (99 KB cards in fp32, or a wide
    # bottleneck such as d = 2048 → R = 448, held as 512 columns): short d chunks / output blocks, one stage.
    _SMALL_ROW_CONFIGS = [
        _cfg(4, 2, BLOCK_M=32, BLOCK_K=32, BLOCK_N=32),
        _cfg(4, 1, BLOCK_M=32, BLOCK_K=16, BLOCK_N=16),
        _cfg(4, 1, BLOCK_M=16, BLOCK_K=16, BLOCK_N=16),
    ]
    # Fallback of the split-K kernel (64 KB sm_75 in fp32)
    _SMALL_ATB_CONFIGS = [_cfg(4, 2, BLOCK_M=32, BLOCK_P=32, BLOCK_Q=32)]


# ----------------------------------------------------------------------------------------------
# plans: which configs a launch may use on a device (the launchers and tools/aot_compile.py)
# ----------------------------------------------------------------------------------------------
def _stages(cfg, props: DeviceProps) -> int:
    """Pipelined buffers per loop: sm_90+ keeps ``num_stages`` of them, sm_80-class ``num_stages - 1``."""
    return max(1, cfg.num_stages if props.arch >= 90 else cfg.num_stages - 1)


def _row_smem(cfg, d: int, r: int, dtype, two_inputs: bool, props: DeviceProps) -> int:
    """Shared-memory estimate of the row kernels (calibrated on sm_75 / sm_86 / sm_90 compiles of
    tools/aot_compile.py; the larger of the two loops, their buffers are reused):

    * the d loop: pipelined chunks of x (and dy) and of the down weight for every held column;
    * the up / dx loop: pipelined output blocks of the weight, the bottleneck staged as a dot operand and
      the (BLOCK_M, BLOCK_N) output tile (sm_75 has no asynchronous copies: no output staging seen there).

    Before sm_80 Triton (3.6-3.9) emits no tensor-core instructions: the dots run as FMAs on operands staged in
    float32, whatever the dtype (sm_75 compiles: 98304 B for a bf16 R = 256 tile, as an fp32 one).
    """
    e = operand_bytes(dtype, props)
    kw = cfg.kwargs
    bm, bk, bn = kw["BLOCK_M"], kw["BLOCK_K"], kw["BLOCK_N"]
    ra, rb = column_groups(r)
    rp = ra + rb
    stages = _stages(cfg, props)
    down = smem_bytes(stages, [bm * bk * e * (2 if two_inputs else 1), bk * rp * e])
    up = smem_bytes(stages, [rp * bn * e], scratch=bm * rp * e + (bm * bn * e if props.arch >= 80 else 0))
    return max(down, up)


def _pick(configs, small, estimate, props: DeviceProps) -> tuple:
    """Configs of ``configs`` that fit; else of the fallback ``small`` list; never empty."""
    fits = prune_configs(configs, estimate, props)
    if estimate(fits[0]) <= props.smem_per_block or not small:
        return tuple(fits)
    return tuple(prune_configs(small, estimate, props))


def plan_fwd(n: int, d: int, r: int, dtype: torch.dtype, props: DeviceProps, *, save_pre: bool = True,
             has_base: bool = False) -> tuple:
    """Candidate ``triton.Config`` s of the forward kernel for ``x (n, d)``, bottleneck ``r`` on ``props``."""
    del n, save_pre, has_base  # the estimate does not depend on them (the epilogue tile is the same)
    return _pick(_FWD_CONFIGS, _SMALL_ROW_CONFIGS, lambda c: _row_smem(c, d, r, dtype, False, props), props)


def plan_bwd_rows(n: int, d: int, r: int, dtype: torch.dtype, props: DeviceProps, *, recompute: bool = False) -> tuple:
    """Candidate configs of the backward row kernel (``recompute``: ``pre`` recomputed from ``x``)."""
    del n, recompute
    return _pick(_BWD_CONFIGS, _SMALL_ROW_CONFIGS, lambda c: _row_smem(c, d, r, dtype, True, props), props)


class AtbPlan(NamedTuple):
    configs: tuple
    rows_per_split: int
    splits: int


def _atb_smem(cfg, a_dtype, b_dtype, props: DeviceProps) -> int:
    """Pipelined (aᵀ chunk, b chunk) buffers plus a half-size fp32 output tile (calibrated as _row_smem)."""
    kw = cfg.kwargs
    bm, bp, bq = kw["BLOCK_M"], kw["BLOCK_P"], kw["BLOCK_Q"]
    ea, eb = dtype_bytes(a_dtype), dtype_bytes(b_dtype)
    return smem_bytes(_stages(cfg, props), [bp * bm * ea, bm * bq * eb], scratch=bp * bq * 2)


def plan_atb(n: int, p: int, q: int, dtype: torch.dtype, props: DeviceProps, b_dtype: torch.dtype | None = None) -> AtbPlan:
    """Configs and split of ``aᵀ b`` (``a (n, p)`` in ``dtype``, ``b (n, q)`` in ``b_dtype``, default ``dtype``):
    about two waves of 64x64 tiles over the SMs, each split a multiple of ``_SPLIT_ROWS`` rows."""
    b_dtype = dtype if b_dtype is None else b_dtype
    rows, splits = split_rows(n, cdiv(p, 64) * cdiv(q, 64), props, _SPLIT_ROWS)
    return AtbPlan(_pick(_ATB_CONFIGS, _SMALL_ATB_CONFIGS, lambda c: _atb_smem(c, dtype, b_dtype, props), props), rows, splits)


def _launch_props(nargs: dict) -> DeviceProps:
    for v in nargs.values():
        if isinstance(v, torch.Tensor):
            return device_props(v.device)
    return device_props("cpu")


def _prune_rows(kind):
    """``early_config_prune`` of the autotuned row kernels: the plan's configs (its list, in its order)."""

    def prune(configs, nargs, **kwargs):
        a = {**nargs, **kwargs}
        dtype = (a["x_ptr"] if kind == "fwd" else a["wd_ptr"]).dtype
        props = _launch_props(a)
        if kind == "fwd":
            return list(plan_fwd(a["N"], a["D"], a["R"], dtype, props))
        return list(plan_bwd_rows(a["N"], a["D"], a["R"], dtype, props))

    return prune


def _prune_atb(configs, nargs, **kwargs):
    a = {**nargs, **kwargs}
    props = _launch_props(a)
    return list(_pick(_ATB_CONFIGS, _SMALL_ATB_CONFIGS, lambda c: _atb_smem(c, a["a_ptr"].dtype, a["b_ptr"].dtype, props),
                      props))


def why_unsupported(*, dtype: torch.dtype, props: DeviceProps, **shapes) -> str | None:
    """Why the MuFA/bottleneck kernels cannot run these inputs on ``props`` (None: they can).

    The kernels take any ``n``, ``d`` and ``r`` (``shapes`` is accepted for a uniform signature) in
    float32/float16/bfloat16 on sm_75+ (every config fits, checked by ``tools/aot_compile.py``)."""
    del shapes
    return arch_unsupported(dtype, props, bf16_min_arch=0)


# ----------------------------------------------------------------------------------------------
# jit helpers
# ----------------------------------------------------------------------------------------------
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
def _fwd_columns(acc, cols, cmask, rows, rmask, bd_ptr, cs_ptr, pre_ptr, stride_pm, SAVE_PRE: tl.constexpr, OUT_TY: tl.constexpr,
                 PREC: tl.constexpr):
    """One column group of the bottleneck: ``pre = acc + bd`` (saved if asked), returns ``GELU(pre) * cs``
    in OUT_TY. Padded columns give 0 (pre = 0 there, GELU(0) = 0, cs = 0)."""
    bd = tl.load(bd_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    pre = acc + bd[None, :]
    if SAVE_PRE:
        tl.store(pre_ptr + rows[:, None] * stride_pm + cols[None, :], cast(pre, pre_ptr.dtype.element_ty, PREC),
                 mask=rmask[:, None] & cmask[None, :])
    cs = tl.load(cs_ptr + cols, mask=cmask, other=0.0)
    return cast(gelu(pre) * cs[None, :], OUT_TY, PREC)


@triton.jit
def _row_block(N, R, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, R_A: tl.constexpr,
               R_B: tl.constexpr):
    """The preamble of the row kernels: the ``BLOCK_M`` rows of block ``program_id(0)`` and their mask, the
    columns of group A and their mask. Preconditions: tiles and column groups are powers of two ≥ 16 (group B
    may be absent: ``R_B = 0``)."""
    static_assert_tiles(BLOCK_M, BLOCK_K, BLOCK_N)
    static_assert_tile(R_A)
    tl.static_assert((R_B == 0) | ((R_B >= 16) & ((R_B & (R_B - 1)) == 0)), "R_B: 0 or a power of two >= 16")
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    ca = tl.arange(0, R_A)
    return rows, rows < N, ca, ca < R


# ----------------------------------------------------------------------------------------------
# forward
#
# The bottleneck (R columns) is held on chip as one or two power-of-two column groups, A = [0, R_A)
# and B = [R_A, R_A + R_B) (R_B = 0: one group): R = 168 runs as 128 + 64 instead of a 256-wide pad,
# 25 % fewer tensor-core FLOPs and registers.
# ----------------------------------------------------------------------------------------------
@triton.autotune(configs=_FWD_CONFIGS, key=["D", "R", "HAS_BASE", "SAVE_PRE", "PREC"],
                 prune_configs_by={"early_config_prune": _prune_rows("fwd")})
@triton.jit
def _bottleneck_fwd_kernel(
    x_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr, cs_ptr, base_ptr, y_ptr, pre_ptr,
    N, D, R,
    stride_xm, stride_wd_r, stride_wd_k, stride_wu_n, stride_wu_r,
    stride_bm, stride_ym, stride_pm,
    scale,
    HAS_BASE: tl.constexpr, SAVE_PRE: tl.constexpr, PREC: tl.constexpr, R_A: tl.constexpr, R_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows, rmask, ca, ma = _row_block(N, R, BLOCK_M, BLOCK_K, BLOCK_N, R_A, R_B)
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
        acc_a = dot(xt, _load_kc(wd_ptr, ca, ma, kk, kmask, stride_wd_r, stride_wd_k), acc_a, PREC)
        if R_B > 0:
            acc_b = dot(xt, _load_kc(wd_ptr, cb, mb, kk, kmask, stride_wd_r, stride_wd_k), acc_b, PREC)
    hs_a = _fwd_columns(acc_a, ca, ma, rows, rmask, bd_ptr, cs_ptr, pre_ptr, stride_pm, SAVE_PRE, wu_ptr.dtype.element_ty, PREC)
    if R_B > 0:
        hs_b = _fwd_columns(acc_b, cb, mb, rows, rmask, bd_ptr, cs_ptr, pre_ptr, stride_pm, SAVE_PRE, wu_ptr.dtype.element_ty, PREC)

    # up projection, BLOCK_N output columns at a time, bias/scale/residual in the epilogue (one write of y)
    for n0 in range(0, D, BLOCK_N):
        nn = n0 + tl.arange(0, BLOCK_N)
        nmask = nn < D
        out = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        out = dot(hs_a, _load_cn(wu_ptr, ca, ma, nn, nmask, stride_wu_r, stride_wu_n), out, PREC)
        if R_B > 0:
            out = dot(hs_b, _load_cn(wu_ptr, cb, mb, nn, nmask, stride_wu_r, stride_wu_n), out, PREC)
        bu = tl.load(bu_ptr + nn, mask=nmask, other=0.0).to(tl.float32)
        out = scale * (out + bu[None, :])
        omask = rmask[:, None] & nmask[None, :]
        if HAS_BASE:
            out += tl.load(base_ptr + rows[:, None] * stride_bm + nn[None, :], mask=omask, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows[:, None] * stride_ym + nn[None, :], cast(out, y_ptr.dtype.element_ty, PREC), mask=omask)


# ----------------------------------------------------------------------------------------------
# backward, 1: row kernel (dx, dpre, g)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _bwd_columns(pre, dhs, cols, cmask, rows, rmask, cs_ptr, g_ptr, dpre_ptr, stride_gm, stride_dpm, PREC: tl.constexpr):
    """One column group: stores ``g = GELU(pre)`` and ``dpre = dhs * cs * GELU'(pre)`` (compute dtype),
    returns dpre in the compute dtype (the operand of ``dx = dpre Wd``)."""
    valid = rmask[:, None] & cmask[None, :]
    cs = tl.load(cs_ptr + cols, mask=cmask, other=0.0)
    g = tl.where(valid, gelu(pre), 0.0)
    dpre = tl.where(valid, dhs * cs[None, :] * gelu_grad(pre), 0.0)
    tl.store(g_ptr + rows[:, None] * stride_gm + cols[None, :], cast(g, g_ptr.dtype.element_ty, PREC), mask=valid)
    dpre_c = cast(dpre, dpre_ptr.dtype.element_ty, PREC)
    tl.store(dpre_ptr + rows[:, None] * stride_dpm + cols[None, :], dpre_c, mask=valid)
    return dpre_c


@triton.autotune(configs=_BWD_CONFIGS, key=["D", "R", "RECOMPUTE", "PREC"],
                 prune_configs_by={"early_config_prune": _prune_rows("bwd")})
@triton.jit
def _bottleneck_bwd_rows_kernel(
    dy_ptr, x_ptr, pre_ptr, wd_ptr, bd_ptr, wu_ptr, cs_ptr, dx_ptr, dpre_ptr, g_ptr,
    N, D, R,
    stride_dym, stride_xm, stride_pm, stride_wd_r, stride_wd_k, stride_wu_n, stride_wu_r,
    stride_dxm, stride_dpm, stride_gm,
    scale,
    RECOMPUTE: tl.constexpr, PREC: tl.constexpr, R_A: tl.constexpr, R_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows, rmask, ca, ma = _row_block(N, R, BLOCK_M, BLOCK_K, BLOCK_N, R_A, R_B)
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
            pre_a = dot(xt, _load_kc(wd_ptr, ca, ma, kk, kmask, stride_wd_r, stride_wd_k), pre_a, PREC)
            if R_B > 0:
                pre_b = dot(xt, _load_kc(wd_ptr, cb, mb, kk, kmask, stride_wd_r, stride_wd_k), pre_b, PREC)
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
                      mask=rmask[:, None] & kmask[None, :], other=0.0)
        dyt = cast(dyt, wu_ptr.dtype.element_ty, PREC)
        dhs_a = dot(dyt, _load_kc(wu_ptr, ca, ma, kk, kmask, stride_wu_r, stride_wu_n), dhs_a, PREC)
        if R_B > 0:
            dhs_b = dot(dyt, _load_kc(wu_ptr, cb, mb, kk, kmask, stride_wu_r, stride_wu_n), dhs_b, PREC)

    dpre_a = _bwd_columns(pre_a, dhs_a * scale, ca, ma, rows, rmask, cs_ptr, g_ptr, dpre_ptr, stride_gm, stride_dpm, PREC)
    if R_B > 0:
        dpre_b = _bwd_columns(pre_b, dhs_b * scale, cb, mb, rows, rmask, cs_ptr, g_ptr, dpre_ptr, stride_gm, stride_dpm, PREC)

    # dx = dpre @ Wd, BLOCK_N columns at a time
    for n0 in range(0, D, BLOCK_N):
        nn = n0 + tl.arange(0, BLOCK_N)
        nmask = nn < D
        dxt = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        dxt = dot(dpre_a, _load_cn(wd_ptr, ca, ma, nn, nmask, stride_wd_r, stride_wd_k), dxt, PREC)
        if R_B > 0:
            dxt = dot(dpre_b, _load_cn(wd_ptr, cb, mb, nn, nmask, stride_wd_r, stride_wd_k), dxt, PREC)
        tl.store(dx_ptr + rows[:, None] * stride_dxm + nn[None, :], cast(dxt, dx_ptr.dtype.element_ty, PREC),
                 mask=rmask[:, None] & nmask[None, :])


# ----------------------------------------------------------------------------------------------
# backward, 2/3: split-K  C[s] = A[rows_s]ᵀ B[rows_s]  (+ column sums), fp32 partials
# ----------------------------------------------------------------------------------------------
@triton.autotune(configs=_ATB_CONFIGS, key=["P", "Q", "SUM_A", "SUM_B", "PREC"],
                 prune_configs_by={"early_config_prune": _prune_atb})
@triton.jit
def _atb_splitk_kernel(
    a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr,
    N, P, Q, rows_per_split,
    stride_am, stride_bm, stride_cs, stride_cp, stride_cq, stride_sas, stride_sbs,
    SUM_A: tl.constexpr, SUM_B: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    """``c[s, p, q] = Σ_{n in split s} a[n, p] b[n, q]`` (b cast to a's dtype for the dot), fp32;
    optionally ``sa[s, p] = Σ a[n, p]`` and ``sb[s, q] = Σ b[n, q]`` (fp32, from b's own dtype)."""
    static_assert_tiles(BLOCK_M, BLOCK_P, BLOCK_Q)
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
        acc = dot(at, cast(bt, at.dtype, PREC), acc, PREC)
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


# Argument lists of the three kernels, built in one place for the launchers and for aot_launches (which
# passes meta tensors: the same dtypes, strides and constexprs a real launch has).
def _fwd_args(x, wd, bd, wu, bu, col_scale, base, y, pre, scale, prec):
    n, d = x.shape
    r = wd.shape[0]
    ra, rb = column_groups(r)
    return dict(
        x_ptr=x, wd_ptr=wd, bd_ptr=bd, wu_ptr=wu, bu_ptr=bu, cs_ptr=col_scale,
        base_ptr=base if base is not None else x, y_ptr=y, pre_ptr=pre if pre is not None else y,
        N=n, D=d, R=r,
        stride_xm=x.stride(0), stride_wd_r=wd.stride(0), stride_wd_k=wd.stride(1), stride_wu_n=wu.stride(0),
        stride_wu_r=wu.stride(1), stride_bm=base.stride(0) if base is not None else 0, stride_ym=y.stride(0),
        stride_pm=pre.stride(0) if pre is not None else 0,
        scale=float(scale),
        HAS_BASE=base is not None, SAVE_PRE=pre is not None, PREC=prec, R_A=ra, R_B=rb,
    )


def _bwd_rows_args(dy, x, pre, wd, bd, wu, col_scale, dx, dpre, g, scale, prec):
    n, d = x.shape
    r = wd.shape[0]
    ra, rb = column_groups(r)
    return dict(
        dy_ptr=dy, x_ptr=x, pre_ptr=pre if pre is not None else dpre, wd_ptr=wd, bd_ptr=bd, wu_ptr=wu,
        cs_ptr=col_scale, dx_ptr=dx, dpre_ptr=dpre, g_ptr=g,
        N=n, D=d, R=r,
        stride_dym=dy.stride(0), stride_xm=x.stride(0), stride_pm=pre.stride(0) if pre is not None else 0,
        stride_wd_r=wd.stride(0), stride_wd_k=wd.stride(1), stride_wu_n=wu.stride(0), stride_wu_r=wu.stride(1),
        stride_dxm=dx.stride(0), stride_dpm=dpre.stride(0), stride_gm=g.stride(0),
        scale=float(scale),
        RECOMPUTE=pre is None, PREC=prec, R_A=ra, R_B=rb,
    )


def _atb_buffers(a, b, out_layout_qp, sum_a, sum_b, plan):
    n, p = a.shape
    q = b.shape[1]
    s = plan.splits
    f32 = dict(device=a.device, dtype=torch.float32)
    if out_layout_qp:
        part = torch.empty((s, q, p), **f32)
        stride_cp, stride_cq = part.stride(2), part.stride(1)
    else:
        part = torch.empty((s, p, q), **f32)
        stride_cp, stride_cq = part.stride(1), part.stride(2)
    sa = torch.empty((s, p), **f32) if sum_a else part
    sb = torch.empty((s, q), **f32) if sum_b else part
    args = dict(
        a_ptr=a, b_ptr=b, c_ptr=part, sa_ptr=sa, sb_ptr=sb,
        N=n, P=p, Q=q, rows_per_split=plan.rows_per_split,
        stride_am=a.stride(0), stride_bm=b.stride(0), stride_cs=part.stride(0), stride_cp=stride_cp,
        stride_cq=stride_cq, stride_sas=sa.stride(0) if sum_a else 0, stride_sbs=sb.stride(0) if sum_b else 0,
        SUM_A=sum_a, SUM_B=sum_b, PREC=precision(a.dtype),
    )
    return part, sa, sb, args


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

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_M"]),)

    _bottleneck_fwd_kernel[grid](**_fwd_args(x, wd, bd.contiguous(), wu, bu.contiguous(), col_scale.contiguous(),
                                             base, y, pre, scale, precision(x.dtype)), **LAUNCH_OPTIONS)
    return y, pre


def _atb(a, b, out_layout_qp: bool, sum_a: bool, sum_b: bool):
    """``aᵀ b`` in fp32, shape (P, Q) or, with ``out_layout_qp``, its transpose (Q, P) contiguous;
    plus the column sums of a (P,) and b (Q,) when asked. Deterministic split-K (:func:`plan_atb`)."""
    n, p = a.shape
    q = b.shape[1]
    plan = plan_atb(n, p, q, a.dtype, device_props(a.device), b.dtype)
    part, sa, sb, args = _atb_buffers(a, b, out_layout_qp, sum_a, sum_b, plan)

    def grid(meta):
        return (triton.cdiv(p, meta["BLOCK_P"]), triton.cdiv(q, meta["BLOCK_Q"]), plan.splits)

    _atb_splitk_kernel[grid](**args, **LAUNCH_OPTIONS)
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
    dpre = torch.empty((n, r), device=x.device, dtype=x.dtype)
    g = torch.empty((n, r), device=x.device, dtype=x.dtype)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_M"]),)

    _bottleneck_bwd_rows_kernel[grid](**_bwd_rows_args(dy, x, pre, wd, bd.contiguous(), wu, col_scale.contiguous(),
                                                       dx, dpre, g, scale, precision(x.dtype)), **LAUNCH_OPTIONS)
    dwd, dbd, _ = _atb(dpre, x, out_layout_qp=False, sum_a=True, sum_b=False)  # (R, d), (R,)
    gt, _, sdy = _atb(g, dy, out_layout_qp=True, sum_a=False, sum_b=True)  # G = dyᵀ g (d, R), Σ dy (d,)
    scale = float(scale)
    dwu = gt * (scale * col_scale)[None, :]
    dbu = sdy * scale
    dcs = (gt * wu.float()).sum(0) * scale
    return dx, dwd, dbd, dwu, dbu, dcs


# ----------------------------------------------------------------------------------------------
# AOT: the launches of each case on an arch, for tools/aot_compile.py
# ----------------------------------------------------------------------------------------------
# (label, d, rates or r, rows, has_base, edge): SPEC §2 shapes; EQAM runs the same bottleneck kernels.
AOT_CASES = [
    ("MuFA ViT-B/16 D768 R168", 768, (8, 16, 32), 64 * 197, True, False),
    ("MuFA Swin-T D96 R21", 96, (8, 16, 32), 64 * 3136, True, False),
    ("EQAM s1 D128 R32", 128, 32, 64 * 56 * 56, False, False),
    ("EQAM s4 D1024 R256", 1024, 256, 64 * 7 * 7, False, False),
    # edges: MuFA on wider backbones (ViT-L d = 1024, ViT-H 1280, ViT-g/2048), rates 8/16/32
    ("edge MuFA D1024 R224", 1024, (8, 16, 32), 32 * 257, True, True),
    ("edge MuFA D2048 R448", 2048, (8, 16, 32), 8 * 577, True, True),
]


# (arch, AOT dtype, case label) -> the forward configs tuned spill-free there (bf16 sm_90 AOT compiles, see the
# config lists): at R = 168 only the 8-warp BLOCK_M = 64 tiles; at R = 21 every config. Elsewhere spills warn.
_SPILL_FREE = {
    (90, "bf16", "MuFA ViT-B/16 D768 R168"): lambda c: c.kwargs["BLOCK_M"] == 64 and c.num_warps == 8,
    (90, "bf16", "MuFA Swin-T D96 R21"): lambda c: True,
}


def _case_r(d, rates_or_r):
    return sum(d // q for q in rates_or_r) if isinstance(rates_or_r, tuple) else int(rates_or_r)


def aot_launches(props: DeviceProps, dtype: str, profile: str = "quick") -> list:
    """Every launch of :func:`bottleneck_fwd` / :func:`bottleneck_bwd` at :data:`AOT_CASES` on ``props``, as
    ``kernels._launch.AotLaunch`` records (meta-tensor arguments, the plan's configs). ``dtype``: ``"fp32"``,
    ``"tf32"`` (fp32 with TF32 allowed), ``"bf16"`` or ``"fp16"``; ``profile``: ``_launch.aot_profile``'s names
    (nothing here is thinned by ``"ci"``). The forward's ``spill_free`` configs: :data:`_SPILL_FREE`."""
    from ._launch import AotLaunch, aot_dtype, aot_profile

    tdt, prec = aot_dtype(dtype)
    quick = aot_profile(profile).lean
    meta = lambda *shape, dt=tdt: torch.empty(shape, device="meta", dtype=dt)  # noqa: E731
    out = []
    for label, d, rr, n, has_base, edge in AOT_CASES:
        if edge and quick:
            continue
        r = _case_r(d, rr)
        case = f"{dtype} {label}"
        x, wd, bd, wu = meta(n, d), meta(r, d), meta(r), meta(d, r)
        bu, cs = meta(d, dt=torch.float32), meta(r, dt=torch.float32)  # autocast keeps the fp32 up bias
        for save_pre, base in ((True, has_base), (False, False)):
            if quick and not save_pre and dtype != "bf16":
                continue
            args = _fwd_args(x, wd, bd, wu, bu, cs, meta(n, d) if base else None, meta(n, d),
                             meta(n, r) if save_pre else None, 0.5, prec)
            cfgs = plan_fwd(n, d, r, tdt, props, save_pre=save_pre, has_base=base)
            tuned = _SPILL_FREE.get((props.arch, dtype, label), lambda c: False)
            out.append(AotLaunch("mufa._bottleneck_fwd_kernel", f"{case} {'train' if save_pre else 'infer'}", args,
                                 cfgs, True, edge, tuple(c for c in cfgs if tuned(c))))
        for recompute in (False, True):
            if quick and recompute and dtype != "bf16":
                continue
            args = _bwd_rows_args(meta(n, d), x, None if recompute else meta(n, r), wd, bd, wu, cs, meta(n, d),
                                  meta(n, r), meta(n, r), 0.5, prec)
            out.append(AotLaunch("mufa._bottleneck_bwd_rows_kernel", f"{case} {'recompute' if recompute else 'saved pre'}",
                                 args, plan_bwd_rows(n, d, r, tdt, props, recompute=recompute), True, edge))
        # _atb(dpre, x): dWd (R, d) + Σ dpre;  _atb(g, dy, out_layout_qp): G (d, R) + Σ dy
        for what, a, b, q_layout, sum_a, sum_b in (("dWd", meta(n, r), x, False, True, False),
                                                  ("dWu", meta(n, r), meta(n, d), True, False, True)):
            plan = plan_atb(n, r, d, tdt, props, b.dtype)
            _, _, _, args = _atb_buffers(a, b, q_layout, sum_a, sum_b, plan)
            args["PREC"] = prec
            out.append(AotLaunch("mufa._atb_splitk_kernel", f"{case} {what} splits={plan.splits}", args,
                                 plan.configs, True, edge))
    return out
