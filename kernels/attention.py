"""Blocked multi-head attention (flash-attention's scheme): Triton kernels, their launch plan and launchers.

Design trade-off. Attention over a sequence of L tokens needs the (L, L) scores of every head. Holding them
whole on chip (what the per-sequence MGA kernels of ``kernels/mga.py`` do) is one launch and no HBM traffic
for the scores, but only while L is short: the (L, L) tile outgrows registers and shared memory near L = 128.
These kernels give up the single launch to take any L: each program owns one (sequence·head, query or key
block), streams the other side by blocks with an online softmax in fp32 (running max and sum), and never
holds more than a (BQ, BK) score tile. The forward saves the head outputs ``o`` and the log-sum-exp ``lse``
(fp32) so the backward recomputes ``P = exp(s - lse)`` block by block instead of keeping ``P``; the
backward splits into a query-block pass (``delta = rowsum(do∘o)``, ``dq``) and a key-block pass (``dk``,
``dv``), each program owning its rows: deterministic, no atomics, at the price of computing the scores
twice. B·NH·cdiv(L, BQ) programs fill the GPU even at batch 1.

Layout: ``qkv (B, L, 3H) = [q | k | v]`` (the in-projection of an ``nn.MultiheadAttention``), head ``h`` the
columns ``h·DH : (h+1)·DH`` of each third; the head outputs ``o (B, L, H)`` are concatenated the same way.
Key padding mask ``(B, L)`` uint8, nonzero = padded key (a ``-inf`` score); a query whose keys are all padded
gets ``0/0 = NaN`` and ``lse = -inf``, as ``nn.MultiheadAttention``.

Numerics are ``kernels/_launch.py``'s policy: dot operands in the dtype of ``qkv``, fp32 accumulation and
softmax statistics, stores rounded to nearest even (emulated under the interpreter).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._launch import LAUNCH_OPTIONS, dot_as, operand_bytes, pad_pow2, round_to, smem_bytes, static_assert_tile

__all__ = ["MAX_HEAD_DIM", "AttnPlan", "plan_attention", "attention_forward", "attention_backward", "key_bias",
           "fwd_args", "bwd_args"]

MAX_HEAD_DIM = 128  # (block, head dim) tiles per program; above: registers (callers' why_unsupported)


# ----------------------------------------------------------------------------------------------------
# jit helpers
# ----------------------------------------------------------------------------------------------------
@triton.jit
def key_bias(MASK, b, cols, L, HAS_MASK: tl.constexpr):
    """Additive score bias of the keys ``cols`` of sequence ``b``: 0 valid, -inf padded or out of range."""
    valid = cols < L
    if HAS_MASK:
        pad = tl.load(MASK + b * L + cols, mask=valid, other=1)
        valid = valid & (pad == 0)
    return tl.where(valid, 0.0, float("-inf"))


@triton.jit
def _program_block(L, NH, DH, BLK: tl.constexpr, DHP: tl.constexpr):
    """The preamble of every kernel here: sequence ``b`` and head ``h`` of ``program_id(0) = b·NH + h``, the
    ``BLK`` rows ``idx`` of block ``program_id(1)`` with their mask, the head columns ``dd`` and the
    (BLK, DHP) tile mask."""
    static_assert_tile(BLK)
    static_assert_tile(DHP)
    pid = tl.program_id(0)
    b = (pid // NH).to(tl.int64)
    h = pid % NH
    idx = tl.program_id(1) * BLK + tl.arange(0, BLK)
    imask = idx < L
    dd = tl.arange(0, DHP)
    return b, h, idx, imask, dd, imask[:, None] & (dd[None, :] < DH)


@triton.jit
def _head_tile(P, b, rows, col0, L, W, dd, m):
    """(len(rows), DHP) tile of a ``(B, L, W)`` tensor: rows ``rows`` of sequence ``b``, columns ``col0 + dd``."""
    return tl.load(P + b * L * W + col0 + rows[:, None] * W + dd[None, :], mask=m, other=0.0)


@triton.jit
def _store_head_tile(P, t, b, rows, col0, L, W, dd, m, PREC: tl.constexpr):
    tl.store(P + b * L * W + col0 + rows[:, None] * W + dd[None, :], round_to(t, P, PREC), mask=m)


@triton.jit
def _kv_tiles(QKV, b, h, cols, L, H, DH, dd):
    """k and v of head ``h`` at keys ``cols`` (zero outside L)."""
    km = (cols[:, None] < L) & (dd[None, :] < DH)
    k = _head_tile(QKV, b, cols, H + h * DH, L, 3 * H, dd, km)
    v = _head_tile(QKV, b, cols, 2 * H + h * DH, L, 3 * H, dd, km)
    return k, v


# ----------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _attn_fwd_kernel(
    QKV, MASK, O, LSE,
    L, H, NH, DH, scale,
    BQ: tl.constexpr, BK: tl.constexpr, DHP: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr,
):
    """Query block ``program_id(1)`` of head ``h`` of sequence ``b``: K/V streamed by blocks of ``BK`` keys with
    an online softmax in fp32 (running max ``m``, running sum ``l``); ``o = softmax(q kᵀ·scale) v`` stored at
    ``O (B, L, H)``, ``lse = m + log l`` at ``LSE (B, NH, L)`` fp32 for the backward."""
    static_assert_tile(BK)
    b, h, rows, rmask, dd, m2 = _program_block(L, NH, DH, BQ, DHP)
    q = _head_tile(QKV, b, rows, h * DH, L, 3 * H, dd, m2)

    m_i = tl.full((BQ,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BQ,), dtype=tl.float32)
    acc = tl.zeros((BQ, DHP), dtype=tl.float32)
    for k0 in range(0, L, BK):
        cols = k0 + tl.arange(0, BK)
        k, v = _kv_tiles(QKV, b, h, cols, L, H, DH, dd)
        s = dot_as(q, tl.trans(k), QKV, PREC) * scale + key_bias(MASK, b, cols, L, HAS_MASK)[None, :]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no valid key seen yet: keep exp() finite
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + dot_as(p, v, QKV, PREC)
        m_i = m_new
    o = acc / l_i[:, None]
    lse = tl.where(m_i == float("-inf"), 0.0, m_i) + tl.log(l_i)  # -inf for a fully padded row → NaN grads
    _store_head_tile(O, o, b, rows, h * DH, L, H, dd, m2, PREC)
    tl.store(LSE + (b * NH + h) * L + rows, lse, mask=rmask)


@triton.jit
def _attn_bwd_dq_kernel(
    QKV, DO, MASK, O, LSE, DQKV, DELTA,
    L, H, NH, DH, scale,
    BQ: tl.constexpr, BK: tl.constexpr, DHP: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr,
):
    """Query block ``program_id(1)`` of head ``h`` of sequence ``b``: ``delta = rowsum(do ∘ o)`` (stored at
    ``DELTA (B, NH, L)`` fp32 for the key-block kernel) and ``dq = Σ_keys dS k`` with ``P = exp(s - lse)``
    from the forward's ``LSE`` (stored in the q columns of ``DQKV (B, L, 3H)``). ``DO (B, L, H)`` is the
    gradient of the concatenated head outputs ``O``."""
    static_assert_tile(BK)
    b, h, rows, rmask, dd, m2 = _program_block(L, NH, DH, BQ, DHP)
    q = _head_tile(QKV, b, rows, h * DH, L, 3 * H, dd, m2)
    do = _head_tile(DO, b, rows, h * DH, L, H, dd, m2)
    o = _head_tile(O, b, rows, h * DH, L, H, dd, m2)
    st = (b * NH + h) * L + rows
    lse = tl.load(LSE + st, mask=rmask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + st, delta, mask=rmask)

    dq = tl.zeros((BQ, DHP), dtype=tl.float32)
    for k0 in range(0, L, BK):
        cols = k0 + tl.arange(0, BK)
        k, v = _kv_tiles(QKV, b, h, cols, L, H, DH, dd)
        s = dot_as(q, tl.trans(k), QKV, PREC) * scale + key_bias(MASK, b, cols, L, HAS_MASK)[None, :]
        p = tl.exp(s - lse[:, None])
        dp = dot_as(do, tl.trans(v), QKV, PREC)
        ds = p * (dp - delta[:, None]) * scale
        dq += dot_as(ds, k, QKV, PREC)
    _store_head_tile(DQKV, dq, b, rows, h * DH, L, 3 * H, dd, m2, PREC)


@triton.jit
def _attn_bwd_dkdv_kernel(
    QKV, DO, MASK, DQKV, LSE, DELTA,
    L, H, NH, DH, scale,
    BQ: tl.constexpr, BK: tl.constexpr, DHP: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr,
):
    """Key block ``program_id(1)`` of head ``h`` of sequence ``b``: ``dv = Σ_queries Pᵀ do``,
    ``dk = Σ_queries dSᵀ q`` (the transposed scores are computed directly: no transpose of a big tile),
    from ``lse`` (forward) and ``delta`` (:func:`_attn_bwd_dq_kernel`); stored in the k/v columns of
    ``DQKV``. Each program owns its key rows: deterministic, no atomics."""
    static_assert_tile(BQ)
    b, h, cols, _, dd, m2 = _program_block(L, NH, DH, BK, DHP)
    k = _head_tile(QKV, b, cols, H + h * DH, L, 3 * H, dd, m2)
    v = _head_tile(QKV, b, cols, 2 * H + h * DH, L, 3 * H, dd, m2)
    kbias = key_bias(MASK, b, cols, L, HAS_MASK)
    st = (b * NH + h) * L

    dk = tl.zeros((BK, DHP), dtype=tl.float32)
    dv = tl.zeros((BK, DHP), dtype=tl.float32)
    for q0 in range(0, L, BQ):
        rows = q0 + tl.arange(0, BQ)
        rmask = rows < L
        qm = rmask[:, None] & (dd[None, :] < DH)
        q = _head_tile(QKV, b, rows, h * DH, L, 3 * H, dd, qm)
        do = _head_tile(DO, b, rows, h * DH, L, H, dd, qm)
        lse = tl.load(LSE + st + rows, mask=rmask, other=0.0)
        delta = tl.load(DELTA + st + rows, mask=rmask, other=0.0)
        s_t = dot_as(k, tl.trans(q), QKV, PREC) * scale + kbias[:, None]  # (BK, BQ)
        p_t = tl.where(rmask[None, :], tl.exp(s_t - lse[None, :]), 0.0)
        dv += dot_as(p_t, do, QKV, PREC)
        dp_t = dot_as(v, tl.trans(do), QKV, PREC)
        ds_t = p_t * (dp_t - delta[None, :]) * scale
        dk += dot_as(ds_t, q, QKV, PREC)
    _store_head_tile(DQKV, dk, b, cols, H + h * DH, L, 3 * H, dd, m2, PREC)
    _store_head_tile(DQKV, dv, b, cols, 2 * H + h * DH, L, 3 * H, dd, m2, PREC)


# ----------------------------------------------------------------------------------------------------
# launch plan (from the device)
# ----------------------------------------------------------------------------------------------------
class AttnPlan(NamedTuple):
    """One blocked-attention launch set (forward or backward) of one MSA: tiles and warps."""
    BQ: int
    BK: int
    DHP: int
    num_warps: int
    num_stages: int


def attn_smem(BQ: int, BK: int, DHP: int, nbytes: int, stages: int) -> int:
    """Shared memory estimate of the kernels here: the streamed K/V (or Q/dO) tiles, pipelined ``stages``
    deep, plus one (BQ, BK) fp32 score tile staged for the second dot."""
    tile = max(BQ, BK) * DHP * nbytes
    # fp32 (FMA dots) also stages its (BQ, DHP) operands for layout conversions: sm_86 AOT at head dim 128,
    # 64 x 64 blocks, 1 stage: 98-147 KB, where the 16-bit kernels need 57-74 KB
    fp32_staging = 2 * max(BQ, BK) * DHP * 4 if nbytes == 4 else 0
    return smem_bytes(stages, (tile, tile), scratch=BQ * BK * 4 + fp32_staging)


def plan_attention(L: int, DH: int, dtype: torch.dtype, props) -> AttnPlan | None:
    """Tiles for head dim ``DH``: 64×64 blocks (flash-attention's sm_80/90 choice for head dims ≤ 128), halved
    while the shared-memory estimate exceeds the device's per-block budget (fp32 at head dim 128 on a 99 KB
    sm_86: 32×32, 2 stages); ``None`` if even 16×16 does not fit. The block never exceeds the padded L (no
    work on rows that do not exist at L = 7)."""
    DHP = pad_pow2(DH, 16)
    nb = operand_bytes(dtype, props)  # 4 before sm_80 (FMA dots on fp32-staged operands): sized like fp32
    blk = min(64, pad_pow2(L, 16))
    # registers: (blk, DHP) fp32 accumulators/operands per program; fp32 at head dim 128 with 64-row blocks
    # spilled 6-13 KB/thread (AOT, sm_80/90), so fp32 keeps blk·DHP ≤ 64·64 (16-bit: ≤ 64·128, spill-free)
    while blk > 16 and blk * DHP > (64 * 64 if nb == 4 else 64 * 128):
        blk //= 2
    stages = 2 if nb == 4 or DHP > 64 else 3
    while blk >= 16:
        for st in (stages, 1):
            if attn_smem(blk, blk, DHP, nb, st) <= props.smem_per_block:
                # 8 warps for fp32 (its FMA dots hold more per thread: 4 warps spilled 0.8-1.5 KB in the fp32
                # backward at head dim 8 on sm_86/90) and for tiles above 64 x 64
                return AttnPlan(blk, blk, DHP, 4 if nb < 4 and blk * DHP <= 64 * 64 else 8, st)
        blk //= 2
    return None


# ----------------------------------------------------------------------------------------------------
# launchers (plain functions: tensors in, tensors out) and their argument helpers (also the AOT records')
# ----------------------------------------------------------------------------------------------------
def _common_args(qkv, heads, mask_u8, placeholder, plan: AttnPlan, prec) -> dict:
    _, L, H3 = qkv.shape
    H = H3 // 3
    NH = int(heads)
    DH = H // NH
    return dict(MASK=mask_u8 if mask_u8 is not None else placeholder, L=L, H=H, NH=NH, DH=DH,
                scale=1.0 / math.sqrt(DH), BQ=plan.BQ, BK=plan.BK, DHP=plan.DHP, HAS_MASK=mask_u8 is not None,
                PREC=prec)


def fwd_args(qkv, heads, mask_u8, o, lse, plan: AttnPlan, prec) -> dict:
    """Arguments of :func:`_attn_fwd_kernel`."""
    return dict(QKV=qkv, O=o, LSE=lse, **_common_args(qkv, heads, mask_u8, lse, plan, prec))


def bwd_args(qkv, do, o, lse, heads, mask_u8, dqkv, delta, plan: AttnPlan, prec) -> tuple[dict, dict]:
    """Arguments of (:func:`_attn_bwd_dq_kernel`, :func:`_attn_bwd_dkdv_kernel`)."""
    common = _common_args(qkv, heads, mask_u8, delta, plan, prec)
    dq = dict(QKV=qkv, DO=do, O=o, LSE=lse, DQKV=dqkv, DELTA=delta, **common)
    dkdv = dict(QKV=qkv, DO=do, DQKV=dqkv, LSE=lse, DELTA=delta, **common)
    return dq, dkdv


def _opts(plan: AttnPlan) -> dict:
    return dict(num_warps=plan.num_warps, num_stages=plan.num_stages, **LAUNCH_OPTIONS)


def attention_forward(qkv, heads, mask_u8, o, lse, plan: AttnPlan, prec):
    """Multi-head attention forward: ``qkv (B, L, 3H)`` = ``[q | k | v]`` → writes the head outputs
    ``o (B, L, H)`` (qkv's dtype) and ``lse (B, NH, L)`` fp32. One launch over (B·NH, cdiv(L, BQ))."""
    B, L, _ = qkv.shape
    _attn_fwd_kernel[(B * int(heads), triton.cdiv(L, plan.BQ))](
        **fwd_args(qkv, heads, mask_u8, o, lse, plan, prec), **_opts(plan))


def attention_backward(qkv, do, o, lse, heads, mask_u8, dqkv, plan: AttnPlan, prec):
    """Multi-head attention backward (any L, no (L, L) tile on chip).

    ``qkv (B, L, 3H)``, ``do (B, L, H)`` the gradient of the head outputs ``o (B, L, H)``, ``lse (B, NH, L)``
    from :func:`attention_forward`; writes ``dqkv (B, L, 3H)``. Two launches: query blocks (``delta``,
    ``dq``), then key blocks (``dk``, ``dv``); deterministic, no atomics."""
    B, L, _ = qkv.shape
    NH = int(heads)
    delta = torch.empty((B, NH, L), device=qkv.device, dtype=torch.float32)
    a_dq, a_kv = bwd_args(qkv, do, o, lse, NH, mask_u8, dqkv, delta, plan, prec)
    _attn_bwd_dq_kernel[(B * NH, triton.cdiv(L, plan.BQ))](**a_dq, **_opts(plan))
    _attn_bwd_dkdv_kernel[(B * NH, triton.cdiv(L, plan.BK))](**a_kv, **_opts(plan))
