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
    INTERPRET, LAUNCH_OPTIONS, SUPPORTED_DTYPES, DeviceProps, PlannedLaunch, arch_unsupported, cached_plan, cast, cdiv,
    device_props, dot, dtype_bytes, operand_bytes, pad_pow2, plan_cache, precision, prune_configs, smem_bytes, split_rows,
    static_assert_tile, static_assert_tiles,
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
def _col_scale(cs_ptr, ci_ptr, cols, cmask):
    """``col_scale[cols] = cs[ci[cols]]`` in float32 (0 outside): the gate of each column's branch (``ci`` the
    branch of each column), or a per-column scale with ``ci = arange(R)``."""
    idx = tl.load(ci_ptr + cols, mask=cmask, other=0)
    return tl.load(cs_ptr + idx, mask=cmask, other=0.0).to(tl.float32)


@triton.jit
def _fwd_columns(acc, cols, cmask, rows, rmask, bd_ptr, cs_ptr, ci_ptr, pre_ptr, stride_pm, SAVE_PRE: tl.constexpr,
                 OUT_TY: tl.constexpr, PREC: tl.constexpr):
    """One column group of the bottleneck: ``pre = acc + bd`` (saved if asked), returns ``GELU(pre) * cs``
    in OUT_TY. Padded columns give 0 (pre = 0 there, GELU(0) = 0, cs = 0)."""
    bd = tl.load(bd_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    pre = acc + bd[None, :]
    if SAVE_PRE:
        tl.store(pre_ptr + rows[:, None] * stride_pm + cols[None, :], cast(pre, pre_ptr.dtype.element_ty, PREC),
                 mask=rmask[:, None] & cmask[None, :])
    cs = _col_scale(cs_ptr, ci_ptr, cols, cmask)
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
    x_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr, cs_ptr, ci_ptr, base_ptr, y_ptr, pre_ptr,
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
    hs_a = _fwd_columns(acc_a, ca, ma, rows, rmask, bd_ptr, cs_ptr, ci_ptr, pre_ptr, stride_pm, SAVE_PRE, wu_ptr.dtype.element_ty, PREC)
    if R_B > 0:
        hs_b = _fwd_columns(acc_b, cb, mb, rows, rmask, bd_ptr, cs_ptr, ci_ptr, pre_ptr, stride_pm, SAVE_PRE, wu_ptr.dtype.element_ty, PREC)

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
def _bwd_columns(pre, dhs, cols, cmask, rows, rmask, cs_ptr, ci_ptr, g_ptr, dpre_ptr, stride_gm, stride_dpm,
                 PREC: tl.constexpr):
    """One column group: stores ``g = GELU(pre)`` and ``dpre = dhs * cs * GELU'(pre)`` (compute dtype),
    returns dpre in the compute dtype (the operand of ``dx = dpre Wd``)."""
    valid = rmask[:, None] & cmask[None, :]
    cs = _col_scale(cs_ptr, ci_ptr, cols, cmask)
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
    dy_ptr, x_ptr, pre_ptr, wd_ptr, bd_ptr, wu_ptr, cs_ptr, ci_ptr, dx_ptr, dpre_ptr, g_ptr,
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

    dpre_a = _bwd_columns(pre_a, dhs_a * scale, ca, ma, rows, rmask, cs_ptr, ci_ptr, g_ptr, dpre_ptr, stride_gm, stride_dpm,
                          PREC)
    if R_B > 0:
        dpre_b = _bwd_columns(pre_b, dhs_b * scale, cb, mb, rows, rmask, cs_ptr, ci_ptr, g_ptr, dpre_ptr, stride_gm, stride_dpm,
                          PREC)

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
# backward, 4/5: the weight gradients from the split-K partials, in their final dtypes (no torch ops)
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["S_A", "S_B"])  # split counts follow the row count: one compile for all
def _bwd_finalize_kernel(
    pa_ptr, pb_ptr, sb_ptr, wu_ptr, cs_ptr, ci_ptr, dwd_ptr, dwu_ptr, dbu_ptr, dcsp_ptr,
    D, R, S_A, S_B, scale,
    stride_pas, stride_par, stride_pbs, stride_pbj, stride_sbs, stride_wu_n, stride_wu_r,
    stride_dwd, stride_dwu, stride_dcsp,
    GATE: tl.constexpr, PREC: tl.constexpr, R_P: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """Program ``j`` owns output features ``[j·BLOCK_J, (j+1)·BLOCK_J)`` and every bottleneck column:
    ``dWd[:, jj] = Σ_s pa[s, :, jj]``, ``G[jj, :] = Σ_s pb[s, jj, :]``, ``dWu = scale·G·col_scale``,
    ``dbu[jj] = scale·Σ_s sb[s, jj]`` (stored in the gradients' dtypes) and, with a gate, the partial
    ``dcsp[j, r] = scale·Σ_{jj} Wu[jj, r]·G[jj, r]`` of ``d col_scale`` (summed by ``_bwd_gate_kernel``).
    Fixed summation order: deterministic."""
    pid = tl.program_id(0)
    jj = pid * BLOCK_J + tl.arange(0, BLOCK_J)
    jm = jj < D
    rr = tl.arange(0, R_P)
    rm = rr < R
    m_jr = jm[:, None] & rm[None, :]
    m_rj = rm[:, None] & jm[None, :]
    g = tl.zeros((BLOCK_J, R_P), dtype=tl.float32)
    sdy = tl.zeros((BLOCK_J,), dtype=tl.float32)
    for s in range(0, S_B):
        g += tl.load(pb_ptr + s * stride_pbs + jj[:, None] * stride_pbj + rr[None, :], mask=m_jr, other=0.0)
        sdy += tl.load(sb_ptr + s * stride_sbs + jj, mask=jm, other=0.0)
    a = tl.zeros((R_P, BLOCK_J), dtype=tl.float32)
    for s in range(0, S_A):
        a += tl.load(pa_ptr + s * stride_pas + rr[:, None] * stride_par + jj[None, :], mask=m_rj, other=0.0)
    cs = _col_scale(cs_ptr, ci_ptr, rr, rm)
    tl.store(dwd_ptr + rr[:, None] * stride_dwd + jj[None, :], cast(a, dwd_ptr.dtype.element_ty, PREC), mask=m_rj)
    tl.store(dwu_ptr + jj[:, None] * stride_dwu + rr[None, :],
             cast(g * (scale * cs)[None, :], dwu_ptr.dtype.element_ty, PREC), mask=m_jr)
    tl.store(dbu_ptr + jj, cast(sdy * scale, dbu_ptr.dtype.element_ty, PREC), mask=jm)
    if GATE != 0:
        wu = tl.load(wu_ptr + jj[:, None] * stride_wu_n + rr[None, :] * stride_wu_r, mask=m_jr, other=0.0).to(tl.float32)
        tl.store(dcsp_ptr + pid * stride_dcsp + rr, tl.sum(wu * g, 0) * scale, mask=rm)


@triton.jit(do_not_specialize=["S_A"])
def _bwd_gate_kernel(
    sa_ptr, dcsp_ptr, ci_ptr, dbd_ptr, dg_ptr,
    R, S_A, JB, NG, stride_sas, stride_dcsp,
    GATE: tl.constexpr, PREC: tl.constexpr, R_P: tl.constexpr, NG_P: tl.constexpr,
):
    """One program: ``dbd = Σ_s sa[s]`` and, with a gate, ``d col_scale = Σ_j dcsp[j]`` reduced to the gate:
    ``GATE == 1`` one entry per column (``col_scale`` itself), ``GATE == 2`` ``dgate[i] = Σ_{ci[r] = i} d col_scale[r]``
    (a MuFA branch's gate)."""
    rr = tl.arange(0, R_P)
    rm = rr < R
    dbd = tl.zeros((R_P,), dtype=tl.float32)
    for s in range(0, S_A):
        dbd += tl.load(sa_ptr + s * stride_sas + rr, mask=rm, other=0.0)
    tl.store(dbd_ptr + rr, cast(dbd, dbd_ptr.dtype.element_ty, PREC), mask=rm)
    if GATE != 0:
        dcs = tl.zeros((R_P,), dtype=tl.float32)
        for j in range(0, JB):
            dcs += tl.load(dcsp_ptr + j * stride_dcsp + rr, mask=rm, other=0.0)
        if GATE == 1:
            tl.store(dg_ptr + rr, cast(dcs, dg_ptr.dtype.element_ty, PREC), mask=rm)
        else:
            gi = tl.load(ci_ptr + rr, mask=rm, other=-1)
            gg = tl.arange(0, NG_P)
            dg = tl.sum(tl.where(gi[None, :] == gg[:, None], dcs[None, :], 0.0), 1)
            tl.store(dg_ptr + gg, cast(dg, dg_ptr.dtype.element_ty, PREC), mask=gg < NG)


# ----------------------------------------------------------------------------------------------
# launchers
#
# Each launch is planned once per (shapes, dtypes, flags) — :func:`plan_fwd_launch` / :func:`plan_bwd_launch`:
# every non-tensor kernel argument, the grids and the buffers' shapes and dtypes — and run by
# :func:`run_fwd` / :func:`run_bwd` with the tensors only (allocations + launches, nothing else). The public
# launchers :func:`bottleneck_fwd` / :func:`bottleneck_bwd` check their arguments and do both; the ops'
# hot path keeps the plans (``rspeft_fast/ops/mufa.py``).
# ----------------------------------------------------------------------------------------------
def _rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D tensor whose last dimension is unit-stride (no copy when it already is)."""
    return t if t.stride(-1) == 1 else t.contiguous()


_INDEX: dict = {}


def column_index(branches, device) -> torch.Tensor:
    """int32 ``(R,)`` on ``device``: the gate entry of each bottleneck column. ``branches`` an int ``R`` (one entry
    per column: ``col_scale`` itself) or a tuple of branch widths (column ``r`` of branch ``i`` reads ``gate[i]``).
    Made once per (branches, device) and cached (never written)."""
    device = torch.device(device)
    key = (branches, device)
    t = _INDEX.get(key)
    if t is None:
        if isinstance(branches, int):
            t = torch.arange(branches, dtype=torch.int32)
        else:
            t = torch.repeat_interleave(torch.arange(len(branches), dtype=torch.int32),
                                        torch.tensor(branches, dtype=torch.int64))
        t = t.to(device)
        _INDEX[key] = t
    return t


def _check_args(x, wd, bd, wu, bu, col_scale, base, col_index=None):
    if x.dim() != 2:
        raise ValueError(f"bottleneck: x must be 2-D (N, d), got shape {tuple(x.shape)}")
    n, d = x.shape
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"bottleneck: the Triton kernels support float32/float16/bfloat16 inputs, got x.dtype={x.dtype}")
    if wd.dim() != 2 or wd.shape[1] != d:
        raise ValueError(f"bottleneck: wd must be (R, {d}), got {tuple(wd.shape)}")
    r = wd.shape[0]
    expected = {"bd": (bd, (r,)), "wu": (wu, (d, r)), "bu": (bu, (d,)), "base": (base, (n, d))}
    if col_index is None:
        expected["col_scale"] = (col_scale, (r,))
    for name, (t, shape) in expected.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"bottleneck: {name} must have shape {shape}, got {tuple(t.shape)}")
    for name, t in (("wd", wd), ("bd", bd), ("wu", wu)):
        if t.dtype != x.dtype:
            raise TypeError(f"bottleneck: {name} must have x's dtype {x.dtype} (the compute dtype), got {t.dtype}")
    for name, t in (("bu", bu), ("base", base)):
        if t is not None and not t.is_floating_point():
            raise TypeError(f"bottleneck: {name} must be floating, got {t.dtype}")
    if col_index is None:
        if col_scale.dtype != torch.float32:
            raise TypeError(f"bottleneck: col_scale must be float32, got {col_scale.dtype}")
    else:
        if col_scale.dim() != 1 or not col_scale.is_floating_point():
            raise TypeError(f"bottleneck: with col_index, col_scale is the gate: a 1-D float tensor, got "
                            f"{tuple(col_scale.shape)} {col_scale.dtype}")
        if tuple(col_index.shape) != (r,) or col_index.dtype != torch.int32:
            raise ValueError(f"bottleneck: col_index must be int32 of shape ({r},), got {tuple(col_index.shape)} "
                             f"{col_index.dtype}")
    devs = {t.device for t in (x, wd, bd, wu, bu, col_scale, base, col_index) if t is not None}
    if len(devs) != 1:
        raise RuntimeError(f"bottleneck: all tensors must be on one device, got {sorted(map(str, devs))}")
    return n, d, r


# Argument lists of the kernels, built in one place for the plans and for aot_launches (which pass meta
# tensors: the same dtypes, strides and constexprs a real launch has).
def _fwd_args(x, wd, bd, wu, bu, col_scale, base, y, pre, scale, prec, col_index=None):
    n, d = x.shape
    r = wd.shape[0]
    ra, rb = column_groups(r)
    return dict(
        x_ptr=x, wd_ptr=wd, bd_ptr=bd, wu_ptr=wu, bu_ptr=bu, cs_ptr=col_scale,
        ci_ptr=col_index if col_index is not None else col_scale,
        base_ptr=base if base is not None else x, y_ptr=y, pre_ptr=pre if pre is not None else y,
        N=n, D=d, R=r,
        stride_xm=x.stride(0), stride_wd_r=wd.stride(0), stride_wd_k=wd.stride(1), stride_wu_n=wu.stride(0),
        stride_wu_r=wu.stride(1), stride_bm=base.stride(0) if base is not None else 0, stride_ym=y.stride(0),
        stride_pm=pre.stride(0) if pre is not None else 0,
        scale=float(scale),
        HAS_BASE=base is not None, SAVE_PRE=pre is not None, PREC=prec, R_A=ra, R_B=rb,
    )


def _bwd_rows_args(dy, x, pre, wd, bd, wu, col_scale, dx, dpre, g, scale, prec, col_index=None):
    n, d = x.shape
    r = wd.shape[0]
    ra, rb = column_groups(r)
    return dict(
        dy_ptr=dy, x_ptr=x, pre_ptr=pre if pre is not None else dpre, wd_ptr=wd, bd_ptr=bd, wu_ptr=wu,
        cs_ptr=col_scale, ci_ptr=col_index if col_index is not None else col_scale, dx_ptr=dx, dpre_ptr=dpre, g_ptr=g,
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


def finalize_block(d: int, r: int) -> tuple[int, int]:
    """``(R_P, BLOCK_J)`` of :func:`_bwd_finalize_kernel`: all ``r`` columns held (padded), ``BLOCK_J`` output
    features per program, ``BLOCK_J · R_P ≤ 4096`` (two fp32 tiles of 32 registers per thread at 4 warps)."""
    r_p = pad_pow2(r, 16)
    return r_p, max(1, min(pad_pow2(d, 1), 4096 // r_p))


_GATE_NONE, _GATE_COLUMNS, _GATE_BRANCHES = 0, 1, 2
_REDUCE_WARPS = 4


def _finalize_args(pa, pb, sb, wu, cs, ci, dwd, dwu, dbu, dcsp, scale, gate_mode, prec):
    s_a, r, d = pa.shape
    r_p, bj = finalize_block(d, r)
    return dict(
        pa_ptr=pa, pb_ptr=pb, sb_ptr=sb, wu_ptr=wu, cs_ptr=cs, ci_ptr=ci, dwd_ptr=dwd, dwu_ptr=dwu, dbu_ptr=dbu,
        dcsp_ptr=dcsp, D=d, R=r, S_A=s_a, S_B=pb.shape[0], scale=float(scale),
        stride_pas=pa.stride(0), stride_par=pa.stride(1), stride_pbs=pb.stride(0), stride_pbj=pb.stride(1),
        stride_sbs=sb.stride(0), stride_wu_n=wu.stride(0), stride_wu_r=wu.stride(1), stride_dwd=dwd.stride(0),
        stride_dwu=dwu.stride(0), stride_dcsp=dcsp.stride(0) if gate_mode else 0,
        GATE=gate_mode, PREC=prec, R_P=r_p, BLOCK_J=bj,
    )


def _gate_args(sa, dcsp, ci, dbd, dg, n_gate, gate_mode, prec):
    s_a, r = sa.shape
    return dict(
        sa_ptr=sa, dcsp_ptr=dcsp, ci_ptr=ci, dbd_ptr=dbd, dg_ptr=dg,
        R=r, S_A=s_a, JB=dcsp.shape[0] if gate_mode else 0, NG=n_gate, stride_sas=sa.stride(0),
        stride_dcsp=dcsp.stride(0) if gate_mode else 0,
        GATE=gate_mode, PREC=prec, R_P=pad_pow2(r, 16), NG_P=pad_pow2(max(n_gate, 1), 2),
    )


def _static(args: dict) -> dict:
    """A launch's arguments without its tensors (what a plan keeps)."""
    return {k: v for k, v in args.items() if not isinstance(v, torch.Tensor)}


def _row_grid(n: int):
    return lambda meta: (triton.cdiv(n, meta["BLOCK_M"]),)


def _Launch(name: str, static: dict, grid, **options) -> PlannedLaunch:
    return PlannedLaunch(globals(), name, static, grid, **options)


class FwdLaunch(NamedTuple):
    """The planned forward of one (shapes, dtypes, flags): see :func:`plan_fwd_launch`."""

    n: int
    d: int
    r: int
    out_dtype: torch.dtype
    cdtype: torch.dtype
    save_pre: bool
    launch: _Launch


def plan_fwd_launch(n: int, d: int, r: int, cdtype: torch.dtype, *, out_dtype: torch.dtype | None = None,
                    save_pre: bool = True, base_dtype: torch.dtype | None = None, bu_dtype: torch.dtype | None = None,
                    cs_dtype: torch.dtype = torch.float32, scale: float = 1.0, x_stride: int | None = None,
                    base_stride: int | None = None, wd_strides: tuple | None = None,
                    wu_strides: tuple | None = None) -> FwdLaunch:
    """Plan :func:`run_fwd` for ``x (n, d)`` (row stride ``x_stride``, default ``d``), bottleneck ``r``, compute dtype
    ``cdtype`` (``x``, ``wd``, ``bd``, ``wu``), weights of the given strides (default contiguous)."""
    out_dtype = cdtype if out_dtype is None else out_dtype
    meta = lambda shape, dt=cdtype, strides=None: (torch.empty_strided(shape, strides, device="meta", dtype=dt)  # noqa: E731
                                                    if strides else torch.empty(shape, device="meta", dtype=dt))
    x = meta((n, d), strides=(x_stride, 1) if x_stride is not None else None)
    base = None if base_dtype is None else meta((n, d), base_dtype, (base_stride, 1) if base_stride is not None else None)
    args = _fwd_args(x, meta((r, d), strides=wd_strides), meta((r,)), meta((d, r), strides=wu_strides),
                     meta((d,), bu_dtype or cdtype), meta((r,), cs_dtype), base, meta((n, d), out_dtype),
                     meta((n, r)) if save_pre else None, scale, precision(cdtype), meta((r,), torch.int32))
    return FwdLaunch(n, d, r, out_dtype, cdtype, bool(save_pre), _Launch("_bottleneck_fwd_kernel", _static(args), _row_grid(n)))


def run_fwd(plan: FwdLaunch, x, wd, bd, wu, bu, cs, ci, base=None, y_shape=None):
    """Allocate ``y`` (shape ``y_shape``, default ``(n, d)``; and ``pre``) and launch the forward kernel of ``plan``
    (tensors as planned, unchecked; ``x`` and ``base`` may have any leading shape when their rows are contiguous)."""
    y = torch.empty(y_shape or (plan.n, plan.d), device=x.device, dtype=plan.out_dtype)
    pre = torch.empty((plan.n, plan.r), device=x.device, dtype=plan.cdtype) if plan.save_pre else None
    if plan.n:
        plan.launch(x, wd, bd, wu, bu, cs, ci, x if base is None else base, y, y if pre is None else pre)
    return y, pre


class BwdLaunch(NamedTuple):
    """The planned backward of one (shapes, dtypes, flags): see :func:`plan_bwd_launch`."""

    n: int
    d: int
    r: int
    cdtype: torch.dtype
    grad_dtypes: tuple  # dwd, dbd, dwu, dbu, dgate
    n_gate: int
    gate_mode: int
    rows: _Launch
    atb_a: _Launch  # dWd = dpreᵀ x and Σ dpre
    splits_a: int
    atb_b: _Launch  # G = dyᵀ g (as (d, R)) and Σ dy
    splits_b: int
    finalize: _Launch
    finalize_blocks: int
    gate: _Launch


def plan_bwd_launch(n: int, d: int, r: int, cdtype: torch.dtype, *, dy_dtype: torch.dtype | None = None,
                    recompute: bool = False, scale: float = 1.0, n_gate: int | None = None, gate_grad: bool = True,
                    grad_dtypes: tuple | None = None, cs_dtype: torch.dtype = torch.float32,
                    wd_strides: tuple | None = None, wu_strides: tuple | None = None,
                    props: DeviceProps | None = None, device="cpu") -> BwdLaunch:
    """Plan :func:`run_bwd`: ``dy``, ``x`` contiguous ``(n, d)``; ``n_gate`` None: ``col_scale`` has one entry per
    column (``R``), else the gate's length (columns mapped by ``col_index``); ``gate_grad=False`` skips its
    gradient; ``grad_dtypes`` the dtypes of ``(dwd, dbd, dwu, dbu, dgate)`` (default float32)."""
    dy_dtype = cdtype if dy_dtype is None else dy_dtype
    props = device_props(device) if props is None else props
    grad_dtypes = (torch.float32,) * 5 if grad_dtypes is None else tuple(grad_dtypes)
    gate_mode = _GATE_NONE if not gate_grad else (_GATE_COLUMNS if n_gate is None else _GATE_BRANCHES)
    n_gate = r if n_gate is None else int(n_gate)
    f32 = torch.float32
    meta = lambda shape, dt=cdtype, strides=None: (torch.empty_strided(shape, strides, device="meta", dtype=dt)  # noqa: E731
                                                    if strides else torch.empty(shape, device="meta", dtype=dt))
    x, dy = meta((n, d)), meta((n, d), dy_dtype)
    wd, wu = meta((r, d), strides=wd_strides), meta((d, r), strides=wu_strides)
    cs, ci = meta((n_gate,), cs_dtype), meta((r,), torch.int32)
    dpre, g = meta((n, r)), meta((n, r))
    prec = precision(cdtype)
    rows = _bwd_rows_args(dy, x, None if recompute else meta((n, r)), wd, meta((r,)), wu, cs, meta((n, d)), dpre, g,
                          scale, prec, ci)
    plan_a = plan_atb(n, r, d, cdtype, props, cdtype)
    pa, sa, _, args_a = _atb_buffers(dpre, x, False, True, False, plan_a)
    plan_b = plan_atb(n, r, d, cdtype, props, dy_dtype)
    pb, _, sb, args_b = _atb_buffers(g, dy, True, False, True, plan_b)
    r_p, bj = finalize_block(d, r)
    blocks = cdiv(d, bj)
    dcsp = meta((blocks, r), f32)
    fin = _finalize_args(pa, pb, sb, wu, cs, ci, meta((r, d), grad_dtypes[0]), meta((d, r), grad_dtypes[2]),
                         meta((d,), grad_dtypes[3]), dcsp, scale, gate_mode, prec)
    gate = _gate_args(sa, dcsp, ci, meta((r,), grad_dtypes[1]), meta((n_gate,), grad_dtypes[4]), n_gate, gate_mode, prec)

    def atb_grid(plan):
        return lambda meta_: (triton.cdiv(r, meta_["BLOCK_P"]), triton.cdiv(d, meta_["BLOCK_Q"]), plan.splits)

    return BwdLaunch(n, d, r, cdtype, grad_dtypes, n_gate, gate_mode,
                     _Launch("_bottleneck_bwd_rows_kernel", _static(rows), _row_grid(n)),
                     _Launch("_atb_splitk_kernel", _static(args_a), atb_grid(plan_a)), plan_a.splits,
                     _Launch("_atb_splitk_kernel", _static(args_b), atb_grid(plan_b)), plan_b.splits,
                     _Launch("_bwd_finalize_kernel", _static(fin), (blocks,), num_warps=_REDUCE_WARPS), blocks,
                     _Launch("_bwd_gate_kernel", _static(gate), (1,), num_warps=_REDUCE_WARPS))


def run_bwd(plan: BwdLaunch, dy, x, pre, wd, bd, wu, cs, ci, dx_shape=None):
    """The backward of ``plan``: ``(dx, dwd, dbd, dwu, dbu, dgate)`` (``dgate`` None without a gate gradient; ``dx``
    of shape ``dx_shape``, default ``(n, d)``; ``dy`` and ``x`` contiguous, any leading shape);
    five launches: the row kernel, two split-K ``AᵀB``, the finalize kernel (weight gradients in their dtypes) and
    the gate kernel (``dbd`` and ``dgate``)."""
    n, d, r = plan.n, plan.d, plan.r
    dev = x.device
    f32 = torch.float32
    gd = plan.grad_dtypes
    dx = torch.empty(dx_shape or (n, d), device=dev, dtype=x.dtype)
    dwd = torch.empty((r, d), device=dev, dtype=gd[0])
    dbd = torch.empty((r,), device=dev, dtype=gd[1])
    dwu = torch.empty((d, r), device=dev, dtype=gd[2])
    dbu = torch.empty((d,), device=dev, dtype=gd[3])
    dg = torch.empty((plan.n_gate,), device=dev, dtype=gd[4]) if plan.gate_mode else None
    if n == 0:
        for t in (dwd, dbd, dwu, dbu, dg):
            if t is not None:
                t.zero_()
        return dx, dwd, dbd, dwu, dbu, dg
    dpre = torch.empty((n, r), device=dev, dtype=plan.cdtype)
    g = torch.empty((n, r), device=dev, dtype=plan.cdtype)
    plan.rows(dy, x, dpre if pre is None else pre, wd, bd, wu, cs, ci, dx, dpre, g)
    pa = torch.empty((plan.splits_a, r, d), device=dev, dtype=f32)
    sa = torch.empty((plan.splits_a, r), device=dev, dtype=f32)
    plan.atb_a(dpre, x, pa, sa, pa)
    pb = torch.empty((plan.splits_b, d, r), device=dev, dtype=f32)
    sb = torch.empty((plan.splits_b, d), device=dev, dtype=f32)
    plan.atb_b(g, dy, pb, pb, sb)
    dcsp = torch.empty((plan.finalize_blocks, r), device=dev, dtype=f32) if plan.gate_mode else sa
    plan.finalize(pa, pb, sb, wu, cs, ci, dwd, dwu, dbu, dcsp)
    plan.gate(sa, dcsp, ci, dbd, dbd if dg is None else dg)
    return dx, dwd, dbd, dwu, dbu, dg


_FWD_PLANS = plan_cache()
_BWD_PLANS = plan_cache()


def bottleneck_fwd(x, wd, bd, wu, bu, col_scale, scale: float, base=None, save_pre: bool = True, out_dtype=None,
                   col_index=None):
    """``y = scale * ((GELU(x Wdᵀ + bd) * col_scale) Wuᵀ + bu) (+ base)``; returns ``(y, pre)``.

    ``x (N, d)``, ``wd (R, d)``, ``bd (R,)``, ``wu (d, R)`` in the compute dtype; ``bu (d,)`` and
    ``base (N, d)`` in any float dtype; ``col_scale (R,)`` float32, or with ``col_index`` (int32 ``(R,)``, see
    :func:`column_index`) the gate ``(n,)`` in any float dtype, column ``r`` scaled by ``col_scale[col_index[r]]``.
    ``y`` is in ``out_dtype`` (default ``x.dtype``); ``pre (N, R)`` is ``x Wdᵀ + bd`` in ``x.dtype``, or None if
    not ``save_pre``.
    """
    n, d, r = _check_args(x, wd, bd, wu, bu, col_scale, base, col_index)
    x = _rows(x)
    base = _rows(base) if base is not None else None
    wd, wu = _rows(wd), _rows(wu)
    ci = column_index(r, x.device) if col_index is None else col_index
    bdt, bst = (None, None) if base is None else (base.dtype, base.stride(0))
    key = (n, d, r, x.dtype, x.device, out_dtype, bool(save_pre), bdt, bst, bu.dtype, col_scale.dtype, float(scale), x.stride(0),
           wd.stride(), wu.stride(), torch.get_float32_matmul_precision())
    plan = cached_plan(_FWD_PLANS, key, lambda: plan_fwd_launch(
        n, d, r, x.dtype, out_dtype=out_dtype, save_pre=save_pre, base_dtype=bdt, bu_dtype=bu.dtype,
        cs_dtype=col_scale.dtype, scale=scale, x_stride=x.stride(0), base_stride=bst, wd_strides=wd.stride(),
        wu_strides=wu.stride()))
    return run_fwd(plan, x, wd, bd.contiguous(), wu, bu.contiguous(), col_scale.contiguous(), ci, base)


def bottleneck_bwd(dy, x, pre, wd, bd, wu, col_scale, scale: float, col_index=None, grad_dtypes=None,
                   gate_grad: bool = True):
    """Gradients of :func:`bottleneck_fwd`: ``(dx, dwd, dbd, dwu, dbu, dcol_scale)``.

    ``dy (N, d)`` any float dtype; ``x``, ``wd``, ``bd``, ``wu``, ``col_scale`` (and ``col_index``) as given to the
    forward; ``pre`` its saved ``pre`` or None (then recomputed from ``x`` in the row kernel).
    ``dx`` is in ``x.dtype``; ``dwd (R, d)``, ``dbd (R,)``, ``dwu (d, R)``, ``dbu (d,)`` and ``dcol_scale`` (the
    shape of ``col_scale``: per column, or per gate entry with ``col_index``) are float32 unless ``grad_dtypes``
    gives their five dtypes; ``gate_grad=False``: ``dcol_scale`` is None. The gradient of ``base`` (if the forward
    had one) is ``dy`` itself.
    """
    n, d, r = _check_args(x, wd, bd, wu, None, col_scale, None, col_index)
    if tuple(dy.shape) != (n, d) or not dy.is_floating_point():
        raise ValueError(f"bottleneck_bwd: dy must be a float tensor of shape {(n, d)}, got {tuple(dy.shape)} {dy.dtype}")
    if pre is not None and (tuple(pre.shape) != (n, r) or pre.dtype != x.dtype):
        raise ValueError(f"bottleneck_bwd: pre must be {(n, r)} in {x.dtype}, got {tuple(pre.shape)} {pre.dtype}")
    dy, x = dy.contiguous(), x.contiguous()
    pre = pre.contiguous() if pre is not None else None
    wd, wu = _rows(wd), _rows(wu)
    ci = column_index(r, x.device) if col_index is None else col_index
    n_gate = None if col_index is None else col_scale.shape[0]
    grad_dtypes = None if grad_dtypes is None else tuple(grad_dtypes)
    key = (n, d, r, x.dtype, dy.dtype, pre is None, float(scale), n_gate, bool(gate_grad), grad_dtypes, col_scale.dtype,
           wd.stride(), wu.stride(), x.device, torch.get_float32_matmul_precision())
    plan = cached_plan(_BWD_PLANS, key, lambda: plan_bwd_launch(
        n, d, r, x.dtype, dy_dtype=dy.dtype, recompute=pre is None, scale=scale, n_gate=n_gate, gate_grad=gate_grad,
        grad_dtypes=grad_dtypes, cs_dtype=col_scale.dtype, wd_strides=wd.stride(), wu_strides=wu.stride(),
        device=x.device))
    return run_bwd(plan, dy, x, pre, wd, bd.contiguous(), wu, col_scale.contiguous(), ci)


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
        # autocast keeps the fp32 up bias; MuFA's gate (one entry per branch) and EQAM's ones(1) are fp32 and the
        # columns read them through the int32 column index
        gated = isinstance(rr, tuple)
        n_gate = len(rr) if gated else 1
        bu, cs, ci = meta(d, dt=torch.float32), meta(n_gate, dt=torch.float32), meta(r, dt=torch.int32)
        for save_pre, base in ((True, has_base), (False, False)):
            if quick and not save_pre and dtype != "bf16":
                continue
            args = _fwd_args(x, wd, bd, wu, bu, cs, meta(n, d) if base else None, meta(n, d),
                             meta(n, r) if save_pre else None, 0.5, prec, ci)
            cfgs = plan_fwd(n, d, r, tdt, props, save_pre=save_pre, has_base=base)
            tuned = _SPILL_FREE.get((props.arch, dtype, label), lambda c: False)
            out.append(AotLaunch("mufa._bottleneck_fwd_kernel", f"{case} {'train' if save_pre else 'infer'}", args,
                                 cfgs, True, edge, tuple(c for c in cfgs if tuned(c))))
        for recompute in (False, True):
            if quick and recompute and dtype != "bf16":
                continue
            args = _bwd_rows_args(meta(n, d), x, None if recompute else meta(n, r), wd, bd, wu, cs, meta(n, d),
                                  meta(n, r), meta(n, r), 0.5, prec, ci)
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
        # the weight gradients in their dtypes: MuFA's follow the autocast-cast weights (the fp32 up bias and gate
        # stay fp32), EQAM's the fp32 master weights (straight-through), without a gate gradient
        f32 = torch.float32
        grad_dtypes = (tdt, tdt, tdt, f32, f32) if gated else (f32,) * 5
        lp = plan_bwd_launch(n, d, r, tdt, dy_dtype=tdt, scale=0.5, n_gate=n_gate if gated else 1, gate_grad=gated,
                             grad_dtypes=grad_dtypes, props=props)
        splits = (lp.splits_a, lp.splits_b)
        fin = _finalize_args(meta(splits[0], r, d, dt=f32), meta(splits[1], d, r, dt=f32), meta(splits[1], d, dt=f32),
                             wu, cs, ci, meta(r, d, dt=grad_dtypes[0]), meta(d, r, dt=grad_dtypes[2]),
                             meta(d, dt=grad_dtypes[3]), meta(lp.finalize_blocks, r, dt=f32), 0.5, lp.gate_mode, prec)
        reduce_cfg = (triton.Config({}, num_warps=_REDUCE_WARPS, num_stages=1),)
        out.append(AotLaunch("mufa._bwd_finalize_kernel", f"{case} {'gate' if gated else 'no gate'}", fin, reduce_cfg,
                             False, edge))
        gate = _gate_args(meta(splits[0], r, dt=f32), meta(lp.finalize_blocks, r, dt=f32), ci,
                          meta(r, dt=grad_dtypes[1]), meta(n_gate, dt=grad_dtypes[4]), n_gate, lp.gate_mode, prec)
        out.append(AotLaunch("mufa._bwd_gate_kernel", f"{case} {'gate' if gated else 'no gate'}", gate, reduce_cfg,
                             False, edge))
    return out
