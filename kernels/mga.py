"""HarMA's gated multimodal adapter (MGA) with the optional BiShare adapter: fused Triton kernels.

Maths (SPEC §1)::

    z0 = GELU(x Wdᵀ + bd);  z1 = MSA(z0);  z2 = z1 + up_s(a_s MSA_s(w) + (1 - a_s) w), w = down_s(z1)  (share)
    z2 = z1 (no share);  z3 = MSA(z2);  u = a z0 + (1 - a) z3;  y = x + u Wuᵀ + bu

with ``a = sigmoid(gate)``, MSA the ``nn.MultiheadAttention`` maths (in-projection, softmax attention over
the sequence, out-projection), the same weights for both MSA calls.

Two paths; :func:`plan_mga` picks one per layer from the device (``kernels/_launch.device_props``), the dtype
and the feature sizes / L (never the batch), with the reason in the plan; :func:`why_unsupported` names what
neither runs (head dims above 128, dtypes/archs of ``_launch.arch_unsupported``).

**Per-sequence** (short L: padded L ≤ 128, padded hidden ≤ 128, shared-memory estimate within the device).
One program per sequence. A sequence's low-dimensional activations ``(L, hidden)`` stay in registers (padded
to powers of two, masked), the attention is computed head by head from registers (``q_h = z Wq_hᵀ``,
``S = q kᵀ``, max-subtracted softmax in fp32, ``o_h = P v``, and the out-projection is accumulated head by
head: ``out += o_h Wo[:, h]ᵀ``), so the whole forward is ONE launch that reads ``x`` and the weights once and
writes ``y`` (plus, when autograd needs them, the small ``(B, L, hidden)`` activations ``hpre``, ``z1``,
``z2``, ``w``). Backward, one program per sequence again, in reverse order, recomputing the attention:

* ``_bwd_msa2_kernel``: ``du = dy Wu``, MSA backward of the 2nd call (recomputing ``z3``), writes
  ``u``, ``du``, ``dz2``, the per-program gate partial, and ``dqkv``/``o``/``g`` of that call;
* ``_bwd_share_kernel`` (BiShare only): ``dv = dz2 Wu_s``, MSA_s backward, writes ``dw``, ``v_s``, ``dz1``;
* ``_bwd_msa1_kernel``: MSA backward of the 1st call, ``dpre = (dz0 + a du) GELU'(hpre)``,
  ``dx = dy + dpre Wd``.

**Blocked** (any L ≥ 1, hidden any size, head dims 4..128): the projections are GEMMs over all ``B·L`` rows
(cuBLAS, compute dtype, fp32 accumulation), the attention of each MSA call is flash-attention's scheme:
``_attn_fwd_kernel`` over (sequence·head, query block) streams K/V by blocks with an online softmax in fp32
and saves the head outputs ``o`` and the log-sum-exp ``lse`` (fp32); the backward reuses them
(``_attn_bwd_dq_kernel``: ``delta = rowsum(do∘o)``, ``dq``; ``_attn_bwd_dkdv_kernel``: ``dk``, ``dv``), each
program owning its rows. Forward ≈ 13 launches (≈ 20 with BiShare), backward ≈ twice that.

Both paths: weight gradients are plain deterministic GEMMs / row sums over the ``B·L`` rows of the
``(B, L, ·)`` intermediates (done by the caller, ``rspeft_fast.ops.mga``); the gate gradients are per-sequence
partials summed afterwards. No atomics anywhere: bitwise deterministic.

Key padding mask: True (nonzero) = padded key, excluded by a ``-inf`` score. A query whose keys are all
padded gets ``0/0 = NaN``, exactly as ``nn.MultiheadAttention``/``msa_ref`` (documented, not hidden).

``tl.dot`` needs every dimension ≥ 16: L, hidden and head dim are padded to powers of two ≥ 16 with masks.
Numerics are ``kernels/_launch.py``'s one policy (``precision``, ``dot``, ``cast``): operands of every dot in
the compute dtype (the dtype of the weights), fp32 accumulation, fp32 softmax statistics; fp32 dots "ieee"
unless TF32 is allowed in torch; under the interpreter 16-bit rounding is emulated.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import gelu, gelu_grad
from ._launch import (LAUNCH_OPTIONS, DeviceProps, arch_unsupported, cast, device_props, dot, dtype_bytes,  # noqa: F401
                      operand_bytes, pad_pow2, precision, smem_bytes)


# ----------------------------------------------------------------------------------------------------
# jit helpers
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _round_to(x, P, PREC: tl.constexpr):
    """``x`` cast to the element type of pointer ``P`` (``_launch.cast``: round to nearest even, emulated on
    the float32 bits under the interpreter)."""
    return cast(x, P.dtype.element_ty, PREC)


@triton.jit
def _dot(a, b, W, PREC: tl.constexpr):
    """fp32-accumulated ``a @ b`` with both operands cast to the element type of pointer ``W`` (the compute
    dtype), under the one precision policy (``_launch.dot`` / ``_launch.cast``)."""
    T = W.dtype.element_ty
    return dot(cast(a, T, PREC), cast(b, T, PREC), None, PREC)


@triton.jit
def _load_tile(P, rows, cols, L, N, stride_l):
    """(LP, NP) fp32 tile of a row-major ``(L, N)`` block (rows/cols padded with zeros)."""
    m = (rows[:, None] < L) & (cols[None, :] < N)
    return tl.load(P + rows[:, None] * stride_l + cols[None, :], mask=m, other=0.0).to(tl.float32)


@triton.jit
def _store_tile(P, t, rows, cols, L, N, stride_l, PREC: tl.constexpr):
    m = (rows[:, None] < L) & (cols[None, :] < N)
    tl.store(P + rows[:, None] * stride_l + cols[None, :], _round_to(t, P, PREC), mask=m)


@triton.jit
def _linear(a, W, bias, K, N, KP: tl.constexpr, NP: tl.constexpr, PREC: tl.constexpr):
    """``a (LP, KP) @ Wᵀ + b`` for an nn.Linear weight ``W (N, K)`` → (LP, NP)."""
    kk = tl.arange(0, KP)
    nn = tl.arange(0, NP)
    w = tl.load(W + nn[None, :] * K + kk[:, None], mask=(kk[:, None] < K) & (nn[None, :] < N), other=0.0)
    b = tl.load(bias + nn, mask=nn < N, other=0.0).to(tl.float32)
    return _dot(a, w, W, PREC) + b[None, :]


@triton.jit
def _linear_t(g, W, K, N, KP: tl.constexpr, NP: tl.constexpr, PREC: tl.constexpr):
    """``g (LP, NP) @ W`` for an nn.Linear weight ``W (N, K)`` (the input gradient) → (LP, KP)."""
    kk = tl.arange(0, KP)
    nn = tl.arange(0, NP)
    w = tl.load(W + nn[:, None] * K + kk[None, :], mask=(nn[:, None] < N) & (kk[None, :] < K), other=0.0)
    return _dot(g, w, W, PREC)


@triton.jit
def _key_bias(MASK, b, L, LP: tl.constexpr, HAS_MASK: tl.constexpr):
    """(LP,) additive score bias: 0 for a valid key, -inf for a padded (or out-of-range) key."""
    cols = tl.arange(0, LP)
    valid = cols < L
    if HAS_MASK:
        pad = tl.load(MASK + b * L + cols, mask=valid, other=1)
        valid = valid & (pad == 0)
    return tl.where(valid, 0.0, float("-inf"))


@triton.jit
def _head_weights(Win, b_in, h, H, DH, HP: tl.constexpr, DHP: tl.constexpr):
    """Wq_hᵀ, Wk_hᵀ, Wv_hᵀ (HP, DHP) and their biases (DHP,) of head ``h``."""
    kk = tl.arange(0, HP)
    dd = tl.arange(0, DHP)
    c = h * DH + dd
    m = (kk[:, None] < H) & (dd[None, :] < DH)
    wq = tl.load(Win + c[None, :] * H + kk[:, None], mask=m, other=0.0)
    wk = tl.load(Win + (H + c)[None, :] * H + kk[:, None], mask=m, other=0.0)
    wv = tl.load(Win + (2 * H + c)[None, :] * H + kk[:, None], mask=m, other=0.0)
    dm = dd < DH
    bq = tl.load(b_in + c, mask=dm, other=0.0).to(tl.float32)
    bk = tl.load(b_in + H + c, mask=dm, other=0.0).to(tl.float32)
    bv = tl.load(b_in + 2 * H + c, mask=dm, other=0.0).to(tl.float32)
    return wq, wk, wv, bq, bk, bv


@triton.jit
def _head_out_weight(Wout, h, H, DH, HP: tl.constexpr, DHP: tl.constexpr):
    """``Wo[:, h*DH:(h+1)*DH]ᵀ`` as (DHP, HP)."""
    kk = tl.arange(0, HP)
    dd = tl.arange(0, DHP)
    m = (dd[:, None] < DH) & (kk[None, :] < H)
    return tl.load(Wout + kk[None, :] * H + (h * DH + dd)[:, None], mask=m, other=0.0)


@triton.jit
def _softmax_rows(s):
    """Max-subtracted softmax over the last axis in fp32 (a row of only -inf gives NaN, as torch)."""
    mx = tl.max(s, 1)
    p = tl.exp(s - mx[:, None])
    return p / tl.sum(p, 1)[:, None]


@triton.jit
def _msa_fwd(z, kbias, Win, b_in, Wout, bout, H, DH, NH, scale,
             LP: tl.constexpr, HP: tl.constexpr, DHP: tl.constexpr, PREC: tl.constexpr):
    """nn.MultiheadAttention self-attention of one sequence held in registers: z (LP, HP) → (LP, HP)."""
    acc = tl.zeros((LP, HP), dtype=tl.float32)
    for h in range(NH):
        wq, wk, wv, bq, bk, bv = _head_weights(Win, b_in, h, H, DH, HP, DHP)
        q = _dot(z, wq, Win, PREC) + bq[None, :]
        k = _dot(z, wk, Win, PREC) + bk[None, :]
        v = _dot(z, wv, Win, PREC) + bv[None, :]
        s = _dot(q, tl.trans(k), Win, PREC) * scale + kbias[None, :]
        p = _softmax_rows(s)
        o = _dot(p, v, Win, PREC)
        acc += _dot(o, _head_out_weight(Wout, h, H, DH, HP, DHP), Wout, PREC)
    kk = tl.arange(0, HP)
    bo = tl.load(bout + kk, mask=kk < H, other=0.0).to(tl.float32)
    return acc + bo[None, :]


@triton.jit
def _msa_bwd(z, g, kbias, Win, b_in, Wout, bout, DQKV, O, L, H, DH, NH, scale,
             LP: tl.constexpr, HP: tl.constexpr, DHP: tl.constexpr, NEED_OUT: tl.constexpr, PREC: tl.constexpr):
    """Backward of ``out = MSA(z)`` for one sequence: returns (dz, out if NEED_OUT else 0).

    Writes ``dqkv`` (L, 3H) and the concatenated head outputs ``o`` (L, H) of this sequence at ``DQKV``/``O``
    (for the weight gradients ``dWin = dqkvᵀ z``, ``dWo = gᵀ o``). Padded query rows have ``g = 0`` and so
    contribute nothing; padded keys have ``P = 0``.
    """
    rows = tl.arange(0, LP)
    dd = tl.arange(0, DHP)
    dz = tl.zeros((LP, HP), dtype=tl.float32)
    out = tl.zeros((LP, HP), dtype=tl.float32)
    for h in range(NH):
        wq, wk, wv, bq, bk, bv = _head_weights(Win, b_in, h, H, DH, HP, DHP)
        q = _dot(z, wq, Win, PREC) + bq[None, :]
        k = _dot(z, wk, Win, PREC) + bk[None, :]
        v = _dot(z, wv, Win, PREC) + bv[None, :]
        s = _dot(q, tl.trans(k), Win, PREC) * scale + kbias[None, :]
        p = _softmax_rows(s)
        o = _dot(p, v, Win, PREC)
        wo = _head_out_weight(Wout, h, H, DH, HP, DHP)  # (DHP, HP)
        if NEED_OUT:
            out += _dot(o, wo, Wout, PREC)
        do = _dot(g, tl.trans(wo), Wout, PREC)  # (LP, DHP)
        dp = _dot(do, tl.trans(v), Win, PREC)  # (LP, LP)
        delta = tl.sum(do * o, 1)
        ds = p * (dp - delta[:, None]) * scale
        dv = _dot(tl.trans(p), do, Win, PREC)
        dq = _dot(ds, k, Win, PREC)
        dk = _dot(tl.trans(ds), q, Win, PREC)
        dz += _dot(dq, tl.trans(wq), Win, PREC)
        dz += _dot(dk, tl.trans(wk), Win, PREC)
        dz += _dot(dv, tl.trans(wv), Win, PREC)
        c = h * DH + dd
        m = (rows[:, None] < L) & (dd[None, :] < DH)
        base = DQKV + rows[:, None] * (3 * H) + c[None, :]
        tl.store(base, _round_to(dq, DQKV, PREC), mask=m)
        tl.store(base + H, _round_to(dk, DQKV, PREC), mask=m)
        tl.store(base + 2 * H, _round_to(dv, DQKV, PREC), mask=m)
        tl.store(O + rows[:, None] * H + c[None, :], _round_to(o, O, PREC), mask=m)
    if NEED_OUT:
        kk = tl.arange(0, HP)
        bo = tl.load(bout + kk, mask=kk < H, other=0.0).to(tl.float32)
        out += bo[None, :]
    return dz, out


# ----------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _mga_fwd_kernel(
    X, sxb, sxl, sxd, Y, MASK,
    Wd, bd, Wu, bu, Win, b_in, Wo, bo, GATE,
    SWd, Sbd, SWu, Sbu, SWin, Sbin, SWo, Sbo, SGATE,
    HPRE, Z1, Z2, WS,
    L, D, H, NH, DH, H2, NH2, DH2, scale, scale2,
    LP: tl.constexpr, HP: tl.constexpr, DHP: tl.constexpr, H2P: tl.constexpr, DH2P: tl.constexpr,
    BD: tl.constexpr, HAS_MASK: tl.constexpr, SHARE: tl.constexpr, SAVE: tl.constexpr, PREC: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, LP)
    rmask = rows < L
    hc = tl.arange(0, HP)
    Xb = X + b * sxb
    kbias = _key_bias(MASK, b, L, LP, HAS_MASK)

    # down-projection + GELU, K-loop over the model dim
    acc = tl.zeros((LP, HP), dtype=tl.float32)
    for k0 in range(0, D, BD):
        kc = k0 + tl.arange(0, BD)
        xt = tl.load(Xb + rows[:, None] * sxl + kc[None, :] * sxd, mask=rmask[:, None] & (kc[None, :] < D), other=0.0)
        w = tl.load(Wd + hc[None, :] * D + kc[:, None], mask=(kc[:, None] < D) & (hc[None, :] < H), other=0.0)
        acc += _dot(xt, w, Wd, PREC)
    bdv = tl.load(bd + hc, mask=hc < H, other=0.0).to(tl.float32)
    hpre = acc + bdv[None, :]
    z0 = gelu(hpre)
    if SAVE:
        _store_tile(HPRE + b * L * H, hpre, rows, hc, L, H, H, PREC)

    z1 = _msa_fwd(z0, kbias, Win, b_in, Wo, bo, H, DH, NH, scale, LP, HP, DHP, PREC)
    if SHARE:
        h2c = tl.arange(0, H2P)
        w_s = _linear(z1, SWd, Sbd, H, H2, HP, H2P, PREC)
        ms = _msa_fwd(w_s, kbias, SWin, Sbin, SWo, Sbo, H2, DH2, NH2, scale2, LP, H2P, DH2P, PREC)
        a_s = tl.sigmoid(tl.load(SGATE).to(tl.float32))
        vs = a_s * ms + (1.0 - a_s) * w_s
        z2 = z1 + _linear(vs, SWu, Sbu, H2, H, H2P, HP, PREC)
        if SAVE:
            _store_tile(Z1 + b * L * H, z1, rows, hc, L, H, H, PREC)
            _store_tile(WS + b * L * H2, w_s, rows, h2c, L, H2, H2, PREC)
    else:
        z2 = z1
    if SAVE:
        _store_tile(Z2 + b * L * H, z2, rows, hc, L, H, H, PREC)
    z3 = _msa_fwd(z2, kbias, Win, b_in, Wo, bo, H, DH, NH, scale, LP, HP, DHP, PREC)

    a = tl.sigmoid(tl.load(GATE).to(tl.float32))
    u = a * z0 + (1.0 - a) * z3

    # up-projection + residual, N-loop over the model dim
    Yb = Y + b * L * D
    for n0 in range(0, D, BD):
        nc = n0 + tl.arange(0, BD)
        m = rmask[:, None] & (nc[None, :] < D)
        w = tl.load(Wu + nc[None, :] * H + hc[:, None], mask=(hc[:, None] < H) & (nc[None, :] < D), other=0.0)
        bun = tl.load(bu + nc, mask=nc < D, other=0.0).to(tl.float32)
        t = _round_to(_dot(u, w, Wu, PREC) + bun[None, :], Wu, PREC).to(tl.float32)
        xt = tl.load(Xb + rows[:, None] * sxl + nc[None, :] * sxd, mask=m, other=0.0).to(tl.float32)
        tl.store(Yb + rows[:, None] * D + nc[None, :], _round_to(xt + t, Y, PREC), mask=m)


@triton.jit
def _bwd_msa2_kernel(
    DY, sdb, sdl, sdd, MASK, Wu, Win, b_in, Wo, bo, GATE,
    HPRE, Z2, DQKV, O, G, U, DU, DZ2, GP,
    L, D, H, NH, DH, scale,
    LP: tl.constexpr, HP: tl.constexpr, DHP: tl.constexpr, BD: tl.constexpr,
    HAS_MASK: tl.constexpr, PREC: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, LP)
    rmask = rows < L
    hc = tl.arange(0, HP)
    kbias = _key_bias(MASK, b, L, LP, HAS_MASK)
    DYb = DY + b * sdb

    # du = dy Wu  (Wu: (D, H))
    du = tl.zeros((LP, HP), dtype=tl.float32)
    for k0 in range(0, D, BD):
        kc = k0 + tl.arange(0, BD)
        dyt = tl.load(DYb + rows[:, None] * sdl + kc[None, :] * sdd, mask=rmask[:, None] & (kc[None, :] < D), other=0.0)
        w = tl.load(Wu + kc[:, None] * H + hc[None, :], mask=(kc[:, None] < D) & (hc[None, :] < H), other=0.0)
        du += _dot(dyt, w, Wu, PREC)
    a = tl.sigmoid(tl.load(GATE).to(tl.float32))
    g = (1.0 - a) * du

    off = b * L * H
    # du is stored now and read back after the attention backward (fewer live (LP, HP) tiles: spills)
    _store_tile(DU + off, du, rows, hc, L, H, H, PREC)
    _store_tile(G + off, g, rows, hc, L, H, H, PREC)
    z2 = _load_tile(Z2 + off, rows, hc, L, H, H)
    dz2, z3 = _msa_bwd(z2, g, kbias, Win, b_in, Wo, bo, DQKV + b * L * 3 * H, O + off, L, H, DH, NH, scale,
                       LP, HP, DHP, True, PREC)
    _store_tile(DZ2 + off, dz2, rows, hc, L, H, H, PREC)
    z0 = gelu(_load_tile(HPRE + off, rows, hc, L, H, H))
    u = a * z0 + (1.0 - a) * z3
    _store_tile(U + off, u, rows, hc, L, H, H, PREC)
    tl.debug_barrier()  # the DU tile was written by other threads of this program
    du = _load_tile(DU + off, rows, hc, L, H, H)
    gp = tl.sum(du * (z0 - z3)) * a * (1.0 - a)  # one flat sum: Triton 3.6 sm_100 fails on a sum of a sum (TMEM)
    tl.store(GP + b, gp)


@triton.jit
def _bwd_share_kernel(
    DZ2, MASK, SWd, SWu, SWin, Sbin, SWo, Sbo, SGATE,
    WS, DQKV, O, G, VS, DW, DZ1, GP,
    L, H, H2, NH2, DH2, scale2,
    LP: tl.constexpr, HP: tl.constexpr, H2P: tl.constexpr, DH2P: tl.constexpr,
    HAS_MASK: tl.constexpr, PREC: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, LP)
    hc = tl.arange(0, HP)
    h2c = tl.arange(0, H2P)
    kbias = _key_bias(MASK, b, L, LP, HAS_MASK)
    off = b * L * H
    off2 = b * L * H2

    dz2 = _load_tile(DZ2 + off, rows, hc, L, H, H)
    dv = _linear_t(dz2, SWu, H2, H, H2P, HP, PREC)  # (LP, H2P); SWu: (H, H2)
    a_s = tl.sigmoid(tl.load(SGATE).to(tl.float32))
    g = a_s * dv
    w_s = _load_tile(WS + off2, rows, h2c, L, H2, H2)
    dwa, ms = _msa_bwd(w_s, g, kbias, SWin, Sbin, SWo, Sbo, DQKV + b * L * 3 * H2, O + off2, L, H2, DH2, NH2,
                       scale2, LP, H2P, DH2P, True, PREC)
    _store_tile(G + off2, g, rows, h2c, L, H2, H2, PREC)
    # dz2, dv and w_s are read back / recomputed (exactly) instead of held across the attention (spills)
    dz2 = _load_tile(DZ2 + off, rows, hc, L, H, H)
    dv = _linear_t(dz2, SWu, H2, H, H2P, HP, PREC)
    w_s = _load_tile(WS + off2, rows, h2c, L, H2, H2)
    dw = dwa + (1.0 - a_s) * dv
    _store_tile(DW + off2, dw, rows, h2c, L, H2, H2, PREC)
    _store_tile(VS + off2, a_s * ms + (1.0 - a_s) * w_s, rows, h2c, L, H2, H2, PREC)
    gp = tl.sum(dv * (ms - w_s)) * a_s * (1.0 - a_s)  # one flat sum (see _bwd_msa2_kernel)
    tl.store(GP + b, gp)
    dz1 = dz2 + _linear_t(dw, SWd, H, H2, HP, H2P, PREC)  # SWd: (H2, H)
    _store_tile(DZ1 + off, dz1, rows, hc, L, H, H, PREC)


@triton.jit
def _bwd_msa1_kernel(
    DY, sdb, sdl, sdd, DX, MASK, Wd, Win, b_in, Wo, bo, GATE,
    HPRE, G1, DU, DQKV, O, Z0, DPRE,
    L, D, H, NH, DH, scale,
    LP: tl.constexpr, HP: tl.constexpr, DHP: tl.constexpr, BD: tl.constexpr,
    HAS_MASK: tl.constexpr, FUSE_DX: tl.constexpr, PREC: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, LP)
    rmask = rows < L
    hc = tl.arange(0, HP)
    kbias = _key_bias(MASK, b, L, LP, HAS_MASK)
    off = b * L * H

    z0 = gelu(_load_tile(HPRE + off, rows, hc, L, H, H))
    _store_tile(Z0 + off, z0, rows, hc, L, H, H, PREC)
    g = _load_tile(G1 + off, rows, hc, L, H, H)
    dza, _unused = _msa_bwd(z0, g, kbias, Win, b_in, Wo, bo, DQKV + b * L * 3 * H, O + off, L, H, DH, NH, scale,
                            LP, HP, DHP, False, PREC)
    hpre = _load_tile(HPRE + off, rows, hc, L, H, H)  # read again, not held across the attention (spills)
    a = tl.sigmoid(tl.load(GATE).to(tl.float32))
    dz0 = dza + a * _load_tile(DU + off, rows, hc, L, H, H)
    dpre = dz0 * gelu_grad(hpre)
    _store_tile(DPRE + off, dpre, rows, hc, L, H, H, PREC)

    if FUSE_DX:  # dx = dy + dpre Wd  (Wd: (H, D)); for LP > 128 the caller does it (shared memory)
        DYb = DY + b * sdb
        DXb = DX + b * L * D
        for n0 in range(0, D, BD):
            nc = n0 + tl.arange(0, BD)
            m = rmask[:, None] & (nc[None, :] < D)
            w = tl.load(Wd + hc[:, None] * D + nc[None, :], mask=(hc[:, None] < H) & (nc[None, :] < D), other=0.0)
            t = _round_to(_dot(dpre, w, Wd, PREC), Wd, PREC).to(tl.float32)
            dyt = tl.load(DYb + rows[:, None] * sdl + nc[None, :] * sdd, mask=m, other=0.0).to(tl.float32)
            tl.store(DXb + rows[:, None] * D + nc[None, :], _round_to(dyt + t, DX, PREC), mask=m)

# ----------------------------------------------------------------------------------------------------
# blocked attention (any L): flash-attention's scheme, one (sequence, head, query or key block) per program,
# so no (L, L) tile is ever whole on chip and B·NH·cdiv(L, BQ) programs fill the GPU
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _block_key_bias(MASK, b, cols, L, HAS_MASK: tl.constexpr):
    """Additive score bias of the keys ``cols``: 0 valid, -inf padded or out of range."""
    valid = cols < L
    if HAS_MASK:
        pad = tl.load(MASK + b * L + cols, mask=valid, other=1)
        valid = valid & (pad == 0)
    return tl.where(valid, 0.0, float("-inf"))


@triton.jit
def _attn_fwd_kernel(
    QKV, MASK, O, LSE,
    L, H, NH, DH, scale,
    BQ: tl.constexpr, BK: tl.constexpr, DHP: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr,
):
    """Query block ``program_id(1)`` of head ``h`` of sequence ``b`` (``program_id(0) = b·NH + h``).

    ``QKV (B, L, 3H)`` = ``[q | k | v]`` (the in-projection of the attention input). K/V streamed by blocks of
    ``BK`` keys with an online softmax in fp32 (running max ``m``, running sum ``l``): ``o = softmax(q kᵀ·scale) v``
    stored at ``O (B, L, H)`` (the concatenated head outputs), ``lse = m + log l`` at ``LSE (B, NH, L)`` fp32 for
    the backward. A query with every key padded gets ``o = 0/0 = NaN`` and ``lse = -inf``, as ``msa_ref``.
    """
    pid = tl.program_id(0)
    b = (pid // NH).to(tl.int64)
    h = pid % NH
    rows = tl.program_id(1) * BQ + tl.arange(0, BQ)
    rmask = rows < L
    dd = tl.arange(0, DHP)
    m2 = rmask[:, None] & (dd[None, :] < DH)
    H3 = 3 * H
    qkv = QKV + b * L * H3 + h * DH
    q = tl.load(qkv + rows[:, None] * H3 + dd[None, :], mask=m2, other=0.0)

    m_i = tl.full((BQ,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BQ,), dtype=tl.float32)
    acc = tl.zeros((BQ, DHP), dtype=tl.float32)
    for k0 in range(0, L, BK):
        cols = k0 + tl.arange(0, BK)
        km = (cols[:, None] < L) & (dd[None, :] < DH)
        k = tl.load(qkv + H + cols[:, None] * H3 + dd[None, :], mask=km, other=0.0)
        v = tl.load(qkv + 2 * H + cols[:, None] * H3 + dd[None, :], mask=km, other=0.0)
        s = _dot(q, tl.trans(k), QKV, PREC) * scale + _block_key_bias(MASK, b, cols, L, HAS_MASK)[None, :]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no valid key seen yet: keep exp() finite
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p, v, QKV, PREC)
        m_i = m_new
    o = acc / l_i[:, None]
    lse = tl.where(m_i == float("-inf"), 0.0, m_i) + tl.log(l_i)  # -inf for a fully padded row → NaN grads
    tl.store(O + b * L * H + h * DH + rows[:, None] * H + dd[None, :], _round_to(o, O, PREC), mask=m2)
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
    gradient of the concatenated head outputs ``O`` (``g Wo``)."""
    pid = tl.program_id(0)
    b = (pid // NH).to(tl.int64)
    h = pid % NH
    rows = tl.program_id(1) * BQ + tl.arange(0, BQ)
    rmask = rows < L
    dd = tl.arange(0, DHP)
    m2 = rmask[:, None] & (dd[None, :] < DH)
    H3 = 3 * H
    qkv = QKV + b * L * H3 + h * DH
    q = tl.load(qkv + rows[:, None] * H3 + dd[None, :], mask=m2, other=0.0)
    do = tl.load(DO + b * L * H + h * DH + rows[:, None] * H + dd[None, :], mask=m2, other=0.0)
    o = tl.load(O + b * L * H + h * DH + rows[:, None] * H + dd[None, :], mask=m2, other=0.0)
    st = (b * NH + h) * L + rows
    lse = tl.load(LSE + st, mask=rmask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + st, delta, mask=rmask)

    dq = tl.zeros((BQ, DHP), dtype=tl.float32)
    for k0 in range(0, L, BK):
        cols = k0 + tl.arange(0, BK)
        km = (cols[:, None] < L) & (dd[None, :] < DH)
        k = tl.load(qkv + H + cols[:, None] * H3 + dd[None, :], mask=km, other=0.0)
        v = tl.load(qkv + 2 * H + cols[:, None] * H3 + dd[None, :], mask=km, other=0.0)
        s = _dot(q, tl.trans(k), QKV, PREC) * scale + _block_key_bias(MASK, b, cols, L, HAS_MASK)[None, :]
        p = tl.exp(s - lse[:, None])
        dp = _dot(do, tl.trans(v), QKV, PREC)
        ds = p * (dp - delta[:, None]) * scale
        dq += _dot(ds, k, QKV, PREC)
    tl.store(DQKV + b * L * H3 + h * DH + rows[:, None] * H3 + dd[None, :], _round_to(dq, DQKV, PREC), mask=m2)


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
    pid = tl.program_id(0)
    b = (pid // NH).to(tl.int64)
    h = pid % NH
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    cmask = cols < L
    dd = tl.arange(0, DHP)
    m2 = cmask[:, None] & (dd[None, :] < DH)
    H3 = 3 * H
    qkv = QKV + b * L * H3 + h * DH
    k = tl.load(qkv + H + cols[:, None] * H3 + dd[None, :], mask=m2, other=0.0)
    v = tl.load(qkv + 2 * H + cols[:, None] * H3 + dd[None, :], mask=m2, other=0.0)
    kbias = _block_key_bias(MASK, b, cols, L, HAS_MASK)
    st = (b * NH + h) * L

    dk = tl.zeros((BK, DHP), dtype=tl.float32)
    dv = tl.zeros((BK, DHP), dtype=tl.float32)
    for q0 in range(0, L, BQ):
        rows = q0 + tl.arange(0, BQ)
        rmask = rows < L
        qm = rmask[:, None] & (dd[None, :] < DH)
        q = tl.load(qkv + rows[:, None] * H3 + dd[None, :], mask=qm, other=0.0)
        do = tl.load(DO + b * L * H + h * DH + rows[:, None] * H + dd[None, :], mask=qm, other=0.0)
        lse = tl.load(LSE + st + rows, mask=rmask, other=0.0)
        delta = tl.load(DELTA + st + rows, mask=rmask, other=0.0)
        s_t = _dot(k, tl.trans(q), QKV, PREC) * scale + kbias[:, None]  # (BK, BQ)
        p_t = tl.where(rmask[None, :], tl.exp(s_t - lse[None, :]), 0.0)
        dv += _dot(p_t, do, QKV, PREC)
        dp_t = _dot(v, tl.trans(do), QKV, PREC)
        ds_t = p_t * (dp_t - delta[None, :]) * scale
        dk += _dot(ds_t, q, QKV, PREC)
    base = DQKV + b * L * H3 + h * DH + cols[:, None] * H3 + dd[None, :]
    tl.store(base + H, _round_to(dk, DQKV, PREC), mask=m2)
    tl.store(base + 2 * H, _round_to(dv, DQKV, PREC), mask=m2)


# ----------------------------------------------------------------------------------------------------
# typed containers
# ----------------------------------------------------------------------------------------------------
class ShareWeights(NamedTuple):
    """BiShare tensors in the compute dtype (contiguous): ``down (H2, H)``, ``up (H, H2)``, ``in_proj (3H2, H2)``,
    ``out_proj (H2, H2)`` with their biases, the 1-element ``gate`` and the head count."""
    down_w: Tensor
    down_b: Tensor
    up_w: Tensor
    up_b: Tensor
    in_w: Tensor
    in_b: Tensor
    out_w: Tensor
    out_b: Tensor
    gate: Tensor
    heads: int


class MGASaved(NamedTuple):
    """What the forward saves for the backward (compute dtype unless said; empty ``(0,)`` where unused).

    ``hpre (B, L, H)`` the pre-GELU down projection; ``z1 (B, L, H)`` the output of MSA call 1 (BiShare only);
    ``z2 (B, L, H)`` the input of MSA call 2; ``ws (B, L, H2)`` the BiShare down projection; and, on the blocked
    path only, the head outputs ``o (2, B, L, H)`` of both MSA calls and ``o_s (B, L, H2)`` of MSA_s with their
    log-sum-exps ``lse (2, B, NH, L)`` / ``lse_s (B, NH2, L)`` in fp32.
    """
    hpre: Tensor
    z1: Tensor
    z2: Tensor
    ws: Tensor
    o: Tensor
    o_s: Tensor
    lse: Tensor
    lse_s: Tensor


@dataclass
class ShareGrads:
    """BiShare intermediates for its weight gradients, ``(B, L, ·)``: ``dz2`` (grad of its output = of ``z2``),
    ``z1`` (its input), ``w`` (down projection), ``dw`` (grad of ``w``), ``vs`` (input of its up projection),
    ``dqkv (B, L, 3H2)``, ``o``/``g (B, L, H2)`` (head outputs / grad of MSA_s's output), ``gate_partial (B,)``."""
    dz2: Tensor
    z1: Tensor
    w: Tensor
    dw: Tensor
    vs: Tensor
    dqkv: Tensor
    o: Tensor
    g: Tensor
    gate_partial: Tensor


@dataclass
class MGAGrads:
    """Backward intermediates, ``(B, L, ·)`` in the compute dtype: ``dx (B, L, D)`` (x's dtype), ``dpre`` (grad
    of ``hpre``), ``u`` (input of the up projection), ``z0 = GELU(hpre)``, ``z2``, ``dqkv (2, B, L, 3H)``,
    ``o (2, B, L, H)`` and ``g (2, B, L, H)`` (head outputs / grad of the MSA output; ``[0]`` the first call,
    input ``z0``, ``[1]`` the second, input ``z2``), ``gate_partial (B,)`` fp32; ``share`` with BiShare."""
    dx: Tensor
    dpre: Tensor
    u: Tensor
    z0: Tensor
    z2: Tensor
    dqkv: Tensor
    o: Tensor
    g: Tensor
    gate_partial: Tensor
    share: Optional[ShareGrads] = None


# ----------------------------------------------------------------------------------------------------
# launch plans (from the device)
# ----------------------------------------------------------------------------------------------------
MAX_HEAD_DIM = 128  # attention tiles (BQ, head dim) per program; above: registers (see why_unsupported)
SEQ_MAX_LP = 128    # padded L the per-sequence kernels may take: their (LP, LP) score tiles (see plan_mga)
SEQ_MAX_HP = 128    # padded hidden they may take: (LP, HP) activations held in registers
SEQ_STAGES = 3      # pipelining depth of their K/N loops over the model dim (Triton's CUDA default)


def _p2(n: int) -> int:
    return pad_pow2(n, 16)


def _prec(dtype: torch.dtype, device: torch.device) -> str:
    return precision(dtype)  # _launch's policy: "emulate" under the interpreter for 16-bit, ieee/tf32 for fp32


def _warps(LP: int, HP: int) -> int:
    return 4 if LP * HP <= 64 * 64 else 8


class AttnPlan(NamedTuple):
    """One blocked-attention launch set (forward or backward) of one MSA: tiles and warps."""
    BQ: int
    BK: int
    DHP: int
    num_warps: int
    num_stages: int


def _attn_smem(BQ: int, BK: int, DHP: int, nbytes: int, stages: int) -> int:
    """Shared memory estimate of the blocked attention kernels: the streamed K/V (or Q/dO) tiles, pipelined
    ``stages`` deep, plus one (BQ, BK) fp32 score tile staged for the second dot."""
    tile = max(BQ, BK) * DHP * nbytes
    # fp32 (FMA dots) also stages its (BQ, DHP) operands for layout conversions: sm_86 AOT at head dim 128,
    # 64 x 64 blocks, 1 stage: 98-147 KB, where the 16-bit kernels need 57-74 KB
    fp32_staging = 2 * max(BQ, BK) * DHP * 4 if nbytes == 4 else 0
    return smem_bytes(stages, (tile, tile), scratch=BQ * BK * 4 + fp32_staging)


def plan_attention(L: int, DH: int, dtype: torch.dtype, props) -> AttnPlan | None:
    """Tiles of the blocked attention kernels for head dim ``DH``: 64×64 blocks (flash-attention's sm_80/90
    choice for head dims ≤ 128), halved while the shared-memory estimate exceeds the device's per-block
    budget (fp32 at head dim 128 on a 99 KB sm_86: 32×32, 2 stages); ``None`` if even 16×16 does not fit.
    The block never exceeds the padded L (no work on rows that do not exist at L = 7)."""
    DHP = _p2(DH)
    nb = operand_bytes(dtype, props)  # 4 before sm_80 (FMA dots on fp32-staged operands): sized like fp32
    blk = min(64, _p2(L))
    # registers: (blk, DHP) fp32 accumulators/operands per program; fp32 at head dim 128 with 64-row blocks
    # spilled 6-13 KB/thread (AOT, sm_80/90), so fp32 keeps blk·DHP ≤ 64·64 (16-bit: ≤ 64·128, spill-free)
    while blk > 16 and blk * DHP > (64 * 64 if nb == 4 else 64 * 128):
        blk //= 2
    stages = 2 if nb == 4 or DHP > 64 else 3
    while blk >= 16:
        for st in (stages, 1):
            if _attn_smem(blk, blk, DHP, nb, st) <= props.smem_per_block:
                # 8 warps for fp32 (its FMA dots hold more per thread: 4 warps spilled 0.8-1.5 KB in the fp32
                # backward at head dim 8 on sm_86/90) and for tiles above 64 x 64
                return AttnPlan(blk, blk, DHP, 4 if nb < 4 and blk * DHP <= 64 * 64 else 8, st)
        blk //= 2
    return None


def _seq_smem(LP: int, HP: int, BD: int, nbytes: int, train: bool, stages: int) -> int:
    """Shared memory estimate of the per-sequence kernels: the K/N loop over the model dim pipelines an
    (LP, BD) activation and a (BD, HP) weight tile ``stages`` deep; the backward also stages (LP, LP) score
    tiles for its transposed dots (scratch 4·LP²·bytes). Checked against the sm_90 AOT compile (bf16): image
    LP = 64, HP = 128, BD = 64: forward 73728 B (estimate 75776), backward 94208 B (estimate 106496); text
    LP = 128, BD = 32: forward 53248 (53248), backward 155648 (180224); fp32 text backward 254-352 KB (360448)."""
    tiles = (LP * BD * nbytes, BD * HP * nbytes)
    if train:
        scratch = 4 * LP * LP * nbytes
    else:  # fp32's FMA attention stages (LP, LP) tiles: text forward LP = 128 needs 200 KB (sm_80 AOT), bf16 52 KB
        scratch = 2 * LP * LP * 4 if nbytes == 4 else (LP * LP * nbytes) // 4
    return smem_bytes(stages, tiles, scratch=scratch)


class MGAPlan(NamedTuple):
    """Launch plan of one MGA layer. ``path``: ``"sequence"`` (one program per sequence, the whole forward in
    one launch) or ``"blocked"`` (GEMMs for the projections over all B·L rows + blocked attention kernels over
    (sequence·head, query block)); ``reason`` says why. Per-sequence constants ``LP, HP, DHP, H2P, DH2P, BD,
    num_warps, num_stages``; blocked attention plans ``attn`` (hidden) / ``attn_s`` (BiShare)."""
    path: str
    reason: str
    LP: int
    HP: int
    DHP: int
    H2P: int
    DH2P: int
    BD: int
    num_warps: int
    num_stages: int
    attn: AttnPlan | None
    attn_s: AttnPlan | None


def plan_mga(L: int, D: int, H: int, NH: int, H2: int | None, NH2: int | None, dtype: torch.dtype, props,
             train: bool) -> MGAPlan:
    """Choose the per-sequence or the blocked path (and their tiles) for one layer on a device.

    The per-sequence kernel reads ``x`` once and writes ``y`` once in ONE launch, with every intermediate on
    chip; at short L that beats the blocked path's ~12 launches (≈20 with BiShare) and their (B·L, hidden)
    round trips through HBM, so it stays where it fits: padded L ≤ 128 and padded hidden ≤ 128 (beyond, its
    (LP, LP) score and (LP, HP) activation tiles spill or exceed shared memory) and the shared-memory estimate
    (:func:`_seq_smem`) within the device's budget. Training plans the backward's (larger) estimate and the
    forward follows it, so a blocked backward always finds the forward's ``o``/``lse``. Everything else takes
    the blocked path (any L; B·NH·cdiv(L, BQ) attention programs fill the GPU at small batches). The plan
    depends on feature sizes, L, dtype and device only, never on the batch (one compilation per shape).
    """
    share = H2 is not None
    DH = H // NH
    DH2 = H2 // NH2 if share else 16
    LP, HP, DHP = _p2(L), _p2(H), _p2(DH)
    H2P, DH2P = (_p2(H2), _p2(DH2)) if share else (16, 16)
    nb = operand_bytes(dtype, props)  # sm_75: 16-bit tiles staged as fp32 (AOT: 131072 B for the text forward)
    BD = 32 if HP > 128 or LP > 64 else 64
    nw = _warps(LP, HP)
    attn = plan_attention(L, DH, dtype, props)
    attn_s = plan_attention(L, DH2, dtype, props) if share else None
    def blocked(why):
        return MGAPlan("blocked", why, LP, HP, DHP, H2P, DH2P, BD, nw, 0, attn, attn_s)

    if LP > SEQ_MAX_LP:
        return blocked(f"padded L={LP} > {SEQ_MAX_LP}: (L, L) score tiles do not fit one program")
    if max(HP, H2P) > SEQ_MAX_HP:
        return blocked(f"padded hidden={max(HP, H2P)} > {SEQ_MAX_HP}: activations do not fit registers")
    for stages in (SEQ_STAGES, 2):  # 2-deep K/N pipelining where 3 does not fit (sm_86/89/120: 99 KB)
        need = _seq_smem(LP, max(HP, H2P), BD, nb, train, stages)
        if need <= props.smem_per_block:
            return MGAPlan("sequence", f"short sequence: one launch, every intermediate on chip ({stages} stages)",
                           LP, HP, DHP, H2P, DH2P, BD, nw, stages, attn, attn_s)
    return blocked(f"per-sequence {'backward' if train else 'forward'} needs ~{need // 1024} KB of shared memory "
                   f"> {props.smem_per_block // 1024} KB (sm_{props.arch})")


def why_unsupported(*, dtype: torch.dtype, props, L: int, D: int, hidden: int, heads: int,
                    share_hidden: int | None = None, share_heads: int | None = None) -> str | None:
    """None if the fused kernels run these shapes on a device with ``props``, else a one-line reason naming
    the limit (``resolve_impl(..., limits=...)``: ``impl="auto"`` goes to the reference with one warning,
    ``impl="triton"`` raises). What is left: the dtypes, and head dims above :data:`MAX_HEAD_DIM`."""
    why = arch_unsupported(dtype, props)
    if why is not None:
        return f"mga (triton): {why}"
    for name, h, nh in (("hidden", hidden, heads), ("BiShare hidden", share_hidden, share_heads)):
        if h is None:
            continue
        if h // nh > MAX_HEAD_DIM:
            return f"mga (triton): {name} head dim {h // nh} > {MAX_HEAD_DIM} (attention tiles per program)"
        if plan_attention(max(int(L), 1), h // nh, dtype, props) is None:
            return (f"mga (triton): {name} head dim {h // nh}: no attention tile fits "
                    f"{props.smem_per_block // 1024} KB of shared memory (sm_{props.arch})")
    return None


def _share_dims(share):
    return (None, None) if share is None else (int(share.down_w.shape[0]), int(share.heads))


def plan_for(x_shape, hidden, heads, share, dtype, device, train) -> MGAPlan:
    """:func:`plan_mga` for a call (the launchers and the custom op's fake use this one)."""
    _, L, D = x_shape
    H2, NH2 = _share_dims(share)
    return plan_mga(int(L), int(D), int(hidden), int(heads), H2, NH2, dtype, device_props(device), bool(train))


# ----------------------------------------------------------------------------------------------------
# launchers (plain functions: tensors in, tensors out)
# ----------------------------------------------------------------------------------------------------
_SQRT1_2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


def _gelu_f32(x):
    return 0.5 * x * (1.0 + torch.erf(x * _SQRT1_2))


def _gelu_grad_f32(x):
    return 0.5 * (1.0 + torch.erf(x * _SQRT1_2)) + x * torch.exp(-0.5 * x * x) * _INV_SQRT_2PI


def attention_forward_blocked(qkv, heads, mask_u8, o, lse, plan: AttnPlan, prec):
    """Blocked multi-head attention forward: ``qkv (B, L, 3H)`` = ``[q | k | v]`` → writes the head outputs
    ``o (B, L, H)`` (qkv's dtype) and ``lse (B, NH, L)`` fp32. One launch over (B·NH, cdiv(L, BQ))."""
    B, L, H3 = qkv.shape
    H = H3 // 3
    NH = int(heads)
    DH = H // NH
    _attn_fwd_kernel[(B * NH, triton.cdiv(L, plan.BQ))](
        **_attn_fwd_args(qkv, NH, mask_u8, o, lse, plan, prec),
        num_warps=plan.num_warps, num_stages=plan.num_stages, **LAUNCH_OPTIONS)


def _attn_fwd_args(qkv, NH, mask_u8, o, lse, plan: AttnPlan, prec) -> dict:
    B, L, H3 = qkv.shape
    H = H3 // 3
    DH = H // NH
    return dict(QKV=qkv, MASK=mask_u8 if mask_u8 is not None else lse, O=o, LSE=lse, L=L, H=H, NH=NH, DH=DH,
                scale=1.0 / math.sqrt(DH), BQ=plan.BQ, BK=plan.BK, DHP=plan.DHP, HAS_MASK=mask_u8 is not None,
                PREC=prec)


def _attn_bwd_args(qkv, do, o, lse, NH, mask_u8, dqkv, delta, plan: AttnPlan, prec) -> tuple[dict, dict]:
    """Arguments of (:func:`_attn_bwd_dq_kernel`, :func:`_attn_bwd_dkdv_kernel`)."""
    B, L, H3 = qkv.shape
    H = H3 // 3
    DH = H // NH
    common = dict(MASK=mask_u8 if mask_u8 is not None else delta, L=L, H=H, NH=NH, DH=DH, scale=1.0 / math.sqrt(DH),
                  BQ=plan.BQ, BK=plan.BK, DHP=plan.DHP, HAS_MASK=mask_u8 is not None, PREC=prec)
    dq = dict(QKV=qkv, DO=do, O=o, LSE=lse, DQKV=dqkv, DELTA=delta, **common)
    dkdv = dict(QKV=qkv, DO=do, DQKV=dqkv, LSE=lse, DELTA=delta, **common)
    return dq, dkdv


def attention_backward_blocked(qkv, do, o, lse, heads, mask_u8, dqkv, plan: AttnPlan, prec):
    """Blocked multi-head attention backward (any L, no (L, L) tile on chip).

    ``qkv (B, L, 3H)``, ``do (B, L, H)`` the gradient of the head outputs ``o (B, L, H)``, ``lse (B, NH, L)``
    from :func:`attention_forward_blocked`; writes ``dqkv (B, L, 3H)``. Two launches: query blocks (``delta``,
    ``dq``), then key blocks (``dk``, ``dv``); deterministic, no atomics."""
    B, L, H3 = qkv.shape
    H = H3 // 3
    NH = int(heads)
    DH = H // NH
    delta = torch.empty((B, NH, L), device=qkv.device, dtype=torch.float32)
    a_dq, a_kv = _attn_bwd_args(qkv, do, o, lse, NH, mask_u8, dqkv, delta, plan, prec)
    opts = dict(num_warps=plan.num_warps, num_stages=plan.num_stages, **LAUNCH_OPTIONS)
    _attn_bwd_dq_kernel[(B * NH, triton.cdiv(L, plan.BQ))](**a_dq, **opts)
    _attn_bwd_dkdv_kernel[(B * NH, triton.cdiv(L, plan.BK))](**a_kv, **opts)


def _gemm(a, w, b, out=None):
    """``a (N, K) @ wᵀ + b`` in the compute dtype (fp32 accumulation: cuBLAS / the CPU GEMM)."""
    return torch.addmm(b, a, w.t(), out=out)


def _msa_fwd_blocked(z, B, L, in_w, in_b, out_w, out_b, heads, mask_u8, o, lse, plan, prec, out=None):
    """``MSA(z)`` for ``z (B·L, H)``: in-projection GEMM, blocked attention (fills ``o (B, L, H)``,
    ``lse``), out-projection GEMM → ``(B·L, H)`` (into ``out`` if given)."""
    H = z.shape[1]
    qkv = _gemm(z, in_w, in_b).view(B, L, 3 * H)
    attention_forward_blocked(qkv, heads, mask_u8, o, lse, plan, prec)
    return _gemm(o.view(B * L, H), out_w, out_b, out=out)


def _forward_blocked(x, y, saved: MGASaved, down_weight, down_bias, up_weight, up_bias, in_w, in_b, out_w, out_b,
                     gate, heads, share, mask_u8, plan: MGAPlan, prec, save):
    """The forward on the blocked path: projections as GEMMs over the B·L rows written straight into the saved
    buffers, one element-wise kernel per gate (``lerp`` in the compute dtype with fp32 internals and one
    rounding, as eager's ``a*m + (1-a)*z`` whose 0-dim fp32 gate is taken in the tensor dtype), attention by
    :func:`attention_forward_blocked`, and up projection + bias + residual in one GEMM (x read once, y written
    once) when x is in the compute dtype."""
    B, L, D = x.shape
    H = down_weight.shape[0]
    cdt = down_weight.dtype
    f32 = torch.float32
    BL = B * L
    x2 = x.reshape(BL, D)
    new = lambda *shape, dt=cdt: x.new_empty(shape, dtype=dt)  # noqa: E731
    hpre = _gemm(x2.to(cdt), down_weight, down_bias, out=saved.hpre.view(BL, H) if save else None)
    z0 = torch.nn.functional.gelu(hpre)
    o, lse = (saved.o, saved.lse) if save else (new(2, B, L, H), new(2, B, int(heads), L, dt=f32))
    keep_z1 = save and share is not None
    z1 = _msa_fwd_blocked(z0, B, L, in_w, in_b, out_w, out_b, heads, mask_u8, o[0], lse[0], plan.attn, prec,
                          out=(saved.z1 if keep_z1 else saved.z2).view(BL, H) if save else None)
    if share is not None:
        H2 = share.down_w.shape[0]
        ws = _gemm(z1, share.down_w, share.down_b, out=saved.ws.view(BL, H2) if save else None)
        o_s, lse_s = (saved.o_s, saved.lse_s) if save else (new(B, L, H2), new(B, int(share.heads), L, dt=f32))
        ms = _msa_fwd_blocked(ws, B, L, share.in_w, share.in_b, share.out_w, share.out_b, share.heads, mask_u8,
                              o_s, lse_s, plan.attn_s, prec)
        a_s = torch.sigmoid(share.gate.to(f32).reshape(()))
        vs = torch.lerp(ws, ms, a_s.to(cdt))  # a_s·ms + (1 - a_s)·ws
        z2 = torch.add(z1, _gemm(vs, share.up_w, share.up_b), out=saved.z2.view(BL, H) if save else None)
    else:
        z2 = z1
    z3 = _msa_fwd_blocked(z2, B, L, in_w, in_b, out_w, out_b, heads, mask_u8, o[1], lse[1], plan.attn, prec)
    a = torch.sigmoid(gate.to(f32).reshape(())).to(cdt)
    if x2.dtype == cdt and y.dtype == cdt:
        # up projection, bias and residual in ONE GEMM that reads x once and writes y once: the bias rides as
        # row H of the weight against a column of ones in u (padded to H + 8 columns for aligned GEMM tiles)
        u = torch.zeros((BL, H + 8), device=x.device, dtype=cdt)
        torch.lerp(z3, z0, a, out=u[:, :H])  # a·z0 + (1 - a)·z3
        u[:, H] = 1.0
        w = torch.zeros((H + 8, D), device=x.device, dtype=cdt)
        w[:H] = up_weight.t()
        w[H] = up_bias
        torch.addmm(x2, u, w, out=y.view(BL, D))
    else:  # x in another dtype (autocast: fp32 x, 16-bit compute): y = x + (u Wuᵀ + bu) as eager rounds it
        torch.add(x2, _gemm(torch.lerp(z3, z0, a), up_weight, up_bias), out=y.view(BL, D))


def mga_forward(x, down_weight, down_bias, up_weight, up_bias, in_w, in_b, out_w, out_b, gate, heads,
                share=None, mask_u8=None, save=False):
    """Fused forward. ``x (B, L, D)`` any strides; weights contiguous in one compute dtype; ``gate`` a
    1-element tensor; ``share`` None or a :class:`ShareWeights`; ``mask_u8 (B, L)`` uint8 (1 = padded key)
    or None; ``save``: keep what the backward needs.

    Returns ``(y, saved)``: ``y (B, L, D)`` (dtype ``promote(x.dtype, weights dtype)``) and an
    :class:`MGASaved` (empty tensors when ``save`` is False). The path (per-sequence or blocked) is
    :func:`plan_mga`'s for this device; L = 0 or B = 0 gives empty outputs.
    """
    if share is not None:
        share = ShareWeights._make(share)
    B, L, D = x.shape
    H = down_weight.shape[0]
    cdt = down_weight.dtype
    dev = x.device
    NH = int(heads)
    DH = H // NH
    plan = plan_for(x.shape, H, NH, share, cdt, dev, save)
    blocked = plan.path == "blocked"
    y = torch.empty((B, L, D), device=dev, dtype=torch.promote_types(x.dtype, cdt))

    def buf(keep, *shape, dtype=cdt):  # a fresh tensor per output (custom ops' outputs must not alias)
        return x.new_empty(shape if (save and keep) else (0,), dtype=dtype)

    has_share = share is not None
    H2, NH2 = _share_dims(share)
    H2 = H2 or 16
    NH2 = NH2 or 1
    saved = MGASaved(
        hpre=buf(True, B, L, H), z1=buf(has_share, B, L, H), z2=buf(True, B, L, H), ws=buf(has_share, B, L, H2),
        o=buf(blocked, 2, B, L, H), o_s=buf(blocked and has_share, B, L, H2),
        lse=buf(blocked, 2, B, NH, L, dtype=torch.float32), lse_s=buf(blocked and has_share, B, NH2, L, dtype=torch.float32))
    if B == 0 or L == 0:
        return y, saved
    prec = _prec(cdt, dev)
    if blocked:
        _forward_blocked(x, y, saved, down_weight, down_bias, up_weight, up_bias, in_w, in_b, out_w, out_b, gate,
                         heads, share, mask_u8, plan, prec, save)
        return y, saved
    args = _seq_fwd_args(x, y, mask_u8, (down_weight, down_bias, up_weight, up_bias, in_w, in_b, out_w, out_b, gate),
                         share, saved, NH, plan, save, prec)
    _mga_fwd_kernel[(B,)](**args, num_warps=plan.num_warps, num_stages=plan.num_stages, **LAUNCH_OPTIONS)
    return y, saved




def _seq_fwd_args(x, y, mask_u8, w, share, saved: MGASaved, NH, plan: MGAPlan, save, prec) -> dict:
    """Arguments of :func:`_mga_fwd_kernel` (the launcher and :func:`aot_launches` both build them here).
    ``w`` = (down_w, down_b, up_w, up_b, in_w, in_b, out_w, out_b, gate)."""
    B, L, D = x.shape
    H = w[0].shape[0]
    DH = H // NH
    has_share = share is not None
    s = share if has_share else ShareWeights(*((w[0],) * 9), 1)
    H2, NH2 = (int(s.down_w.shape[0]), int(s.heads)) if has_share else (16, 1)
    keep = save and has_share
    return dict(
        X=x, sxb=x.stride(0), sxl=x.stride(1), sxd=x.stride(2), Y=y, MASK=mask_u8 if mask_u8 is not None else y,
        Wd=w[0], bd=w[1], Wu=w[2], bu=w[3], Win=w[4], b_in=w[5], Wo=w[6], bo=w[7], GATE=w[8],
        SWd=s.down_w, Sbd=s.down_b, SWu=s.up_w, Sbu=s.up_b, SWin=s.in_w, Sbin=s.in_b, SWo=s.out_w, Sbo=s.out_b,
        SGATE=s.gate, HPRE=saved.hpre if save else y, Z1=saved.z1 if keep else y, Z2=saved.z2 if save else y,
        WS=saved.ws if keep else y,
        L=L, D=D, H=H, NH=NH, DH=DH, H2=H2, NH2=NH2, DH2=H2 // NH2, scale=1.0 / math.sqrt(DH),
        scale2=1.0 / math.sqrt(H2 // NH2),
        LP=plan.LP, HP=plan.HP, DHP=plan.DHP, H2P=plan.H2P, DH2P=plan.DH2P, BD=plan.BD,
        HAS_MASK=mask_u8 is not None, SHARE=has_share, SAVE=bool(save), PREC=prec)


def mga_backward(dy, x_dtype, down_weight, up_weight, in_w, in_b, out_w, out_b, gate, heads,
                 saved: MGASaved, share=None, mask_u8=None) -> MGAGrads:
    """Fused backward: the ``(B, L, ·)`` intermediates of the weight gradients and ``dx`` (:class:`MGAGrads`).

    The path follows the forward's (``saved.o`` is filled on the blocked path only): per-sequence kernels
    (2 launches, 3 with BiShare, each recomputing the attention of one sequence), or the blocked path
    (GEMMs + :func:`attention_backward_blocked` per MSA call with the forward's ``o``/``lse``).
    """
    if share is not None:
        share = ShareWeights._make(share)
    B, L, D = dy.shape
    H = down_weight.shape[0]
    cdt = down_weight.dtype
    dev = dy.device
    NH = int(heads)
    DH = H // NH
    prec = _prec(cdt, dev)
    has_mask = mask_u8 is not None
    new = lambda *s: torch.empty(s, device=dev, dtype=cdt)  # noqa: E731
    dz2 = new(B, L, H) if share is not None else None
    blocked = saved.o.numel() > 0  # the head outputs (and lse) of the forward: the blocked path ran
    r = MGAGrads(dx=torch.empty((B, L, D), device=dev, dtype=x_dtype), dpre=new(B, L, H), u=new(B, L, H),
                 z0=new(B, L, H), z2=saved.z2, dqkv=new(2, B, L, 3 * H), o=saved.o if blocked else new(2, B, L, H),
                 g=new(2, B, L, H), gate_partial=torch.empty((B,), device=dev, dtype=torch.float32))
    if dz2 is None:
        dz2 = r.g[0]
    if share is not None:
        H2, NH2 = _share_dims(share)
        r.share = ShareGrads(dz2=dz2, z1=saved.z1, w=saved.ws, dw=new(B, L, H2), vs=new(B, L, H2),
                             dqkv=new(B, L, 3 * H2), o=saved.o_s if blocked else new(B, L, H2), g=new(B, L, H2),
                             gate_partial=torch.empty((B,), device=dev, dtype=torch.float32))
    if B == 0 or L == 0:
        r.gate_partial.zero_()
        if r.share is not None:
            r.share.gate_partial.zero_()
        return r
    plan = plan_for(dy.shape, H, NH, share, cdt, dev, True)
    if blocked:
        _backward_blocked(dy, r, saved, down_weight, up_weight, in_w, in_b, out_w, out_b, gate, NH, share, mask_u8,
                          plan, prec)
        return r
    du = new(B, L, H)
    a2, a_s, a1 = _seq_bwd_args(dy, mask_u8, (down_weight, up_weight, in_w, in_b, out_w, out_b, gate), share, saved,
                                r, du, NH, plan, prec)
    opts = dict(num_warps=plan.num_warps, num_stages=plan.num_stages, **LAUNCH_OPTIONS)
    _bwd_msa2_kernel[(B,)](**a2, **opts)
    if share is not None:
        _bwd_share_kernel[(B,)](**a_s, **opts)
    _bwd_msa1_kernel[(B,)](**a1, **opts)
    return r


def _seq_bwd_args(dy, mask_u8, w, share, saved: MGASaved, r: MGAGrads, du, NH, plan: MGAPlan, prec):
    """Arguments of the per-sequence backward kernels ``(msa2, share or None, msa1)`` (launcher and
    :func:`aot_launches`). ``w`` = (down_w, up_w, in_w, in_b, out_w, out_b, gate)."""
    B, L, D = dy.shape
    dw, uw, iw, ib, ow, ob, gate = w
    H = dw.shape[0]
    DH = H // NH
    has_mask = mask_u8 is not None
    mask = mask_u8 if has_mask else r.gate_partial
    scale = 1.0 / math.sqrt(DH)
    dz2 = r.share.dz2 if share is not None else r.g[0]
    common = dict(LP=plan.LP, HP=plan.HP, HAS_MASK=has_mask, PREC=prec)
    a2 = dict(DY=dy, sdb=dy.stride(0), sdl=dy.stride(1), sdd=dy.stride(2), MASK=mask, Wu=uw, Win=iw, b_in=ib, Wo=ow,
              bo=ob, GATE=gate, HPRE=saved.hpre, Z2=saved.z2, DQKV=r.dqkv[1], O=r.o[1], G=r.g[1], U=r.u, DU=du,
              DZ2=dz2, GP=r.gate_partial, L=L, D=D, H=H, NH=NH, DH=DH, scale=scale, DHP=plan.DHP, BD=plan.BD,
              **common)
    a_s = None
    if share is not None:
        s = r.share
        H2, NH2 = _share_dims(share)
        a_s = dict(DZ2=dz2, MASK=mask, SWd=share.down_w, SWu=share.up_w, SWin=share.in_w, Sbin=share.in_b,
                   SWo=share.out_w, Sbo=share.out_b, SGATE=share.gate, WS=saved.ws, DQKV=s.dqkv, O=s.o, G=s.g,
                   VS=s.vs, DW=s.dw, DZ1=r.g[0], GP=s.gate_partial, L=L, H=H, H2=H2, NH2=NH2, DH2=H2 // NH2,
                   scale2=1.0 / math.sqrt(H2 // NH2), H2P=plan.H2P, DH2P=plan.DH2P, **common)
    a1 = dict(DY=dy, sdb=dy.stride(0), sdl=dy.stride(1), sdd=dy.stride(2), DX=r.dx, MASK=mask, Wd=dw, Win=iw, b_in=ib,
              Wo=ow, bo=ob, GATE=gate, HPRE=saved.hpre, G1=r.g[0], DU=du, DQKV=r.dqkv[0], O=r.o[0], Z0=r.z0,
              DPRE=r.dpre, L=L, D=D, H=H, NH=NH, DH=DH, scale=scale, DHP=plan.DHP, BD=plan.BD, FUSE_DX=True,
              **common)
    return a2, a_s, a1


def _msa_bwd_blocked(z, g, o, lse, in_w, in_b, out_w, heads, mask_u8, dqkv, plan, prec):
    """Backward of ``MSA(z)`` on the blocked path: ``z, g`` ``(B, L, H)`` (input, grad of the output), the
    forward's ``o (B, L, H)`` / ``lse``; fills ``dqkv (B, L, 3H)``, returns ``dz (B·L, H)``."""
    B, L, H = z.shape
    qkv = _gemm(z.reshape(B * L, H), in_w, in_b).view(B, L, 3 * H)  # recomputed (cheaper than saving 3H)
    do = g.reshape(B * L, H).mm(out_w).view(B, L, H)
    attention_backward_blocked(qkv, do, o, lse, heads, mask_u8, dqkv, plan, prec)
    return dqkv.view(B * L, 3 * H).mm(in_w)


def _backward_blocked(dy, r: MGAGrads, saved: MGASaved, down_weight, up_weight, in_w, in_b, out_w, out_b, gate,
                      heads, share, mask_u8, plan: MGAPlan, prec):
    """The backward on the blocked path: attention by :func:`attention_backward_blocked` with the forward's
    ``o``/``lse``, projections as GEMMs in the compute dtype (fp32 accumulation), element-wise maths in fp32
    (stored in the compute dtype like the per-sequence kernels)."""
    B, L, D = dy.shape
    H = down_weight.shape[0]
    cdt = down_weight.dtype
    f32 = torch.float32
    BL = B * L
    a = torch.sigmoid(gate.to(f32).reshape(()))
    # MSA call 2: du = dy Wu, g2 = (1 - a) du
    du = dy.reshape(BL, D).to(cdt).mm(up_weight)
    duf = du.to(f32)
    r.g[1].view(BL, H).copy_((1.0 - a) * duf)
    dz2 = _msa_bwd_blocked(saved.z2, r.g[1], saved.o[1], saved.lse[1], in_w, in_b, out_w, heads, mask_u8, r.dqkv[1],
                           plan.attn, prec)
    z3f = _gemm(saved.o[1].reshape(BL, H), out_w, out_b).to(f32)
    hf = saved.hpre.reshape(BL, H).to(f32)
    z0f = _gelu_f32(hf)
    r.z0.view(BL, H).copy_(z0f)
    r.u.view(BL, H).copy_(a * z0f + (1.0 - a) * z3f)
    r.gate_partial.copy_((duf * (z0f - z3f)).view(B, L * H).sum(1) * (a * (1.0 - a)))
    if share is not None:
        s = r.share
        H2 = share.down_w.shape[0]
        s.dz2.view(BL, H).copy_(dz2)
        a_s = torch.sigmoid(share.gate.to(f32).reshape(()))
        dvf = dz2.mm(share.up_w).to(f32)  # (BL, H2)
        s.g.view(BL, H2).copy_(a_s * dvf)
        dwa = _msa_bwd_blocked(saved.ws, s.g, saved.o_s, saved.lse_s, share.in_w, share.in_b, share.out_w,
                               share.heads, mask_u8, s.dqkv, plan.attn_s, prec)
        msf = _gemm(saved.o_s.reshape(BL, H2), share.out_w, share.out_b).to(f32)
        wsf = saved.ws.reshape(BL, H2).to(f32)
        dw = s.dw.view(BL, H2)
        dw.copy_(dwa.to(f32) + (1.0 - a_s) * dvf)
        s.vs.view(BL, H2).copy_(a_s * msf + (1.0 - a_s) * wsf)
        s.gate_partial.copy_((dvf * (msf - wsf)).view(B, L * H2).sum(1) * (a_s * (1.0 - a_s)))
        r.g[0].view(BL, H).copy_(dz2.to(f32) + dw.mm(share.down_w).to(f32))  # dz1
    else:
        r.g[0].view(BL, H).copy_(dz2)
    # MSA call 1 (input z0)
    dza = _msa_bwd_blocked(r.z0, r.g[0], saved.o[0], saved.lse[0], in_w, in_b, out_w, heads, mask_u8, r.dqkv[0],
                           plan.attn, prec)
    dpre = r.dpre.view(BL, H)
    dpre.copy_((dza.to(f32) + a * duf) * _gelu_grad_f32(hf))
    t = dpre.mm(down_weight).reshape(B, L, D).to(r.dx.dtype)
    torch.add(dy, t, out=r.dx)


# ----------------------------------------------------------------------------------------------------
# AOT matrix (tools/aot_compile.py): every launch the plans choose at the cases below
# ----------------------------------------------------------------------------------------------------
AOT_CASES = [  # (label, B, L, D, hidden, heads, share (hidden, heads) or None, mask, edge)
    ("image L50 D768 h128/8", 214, 50, 768, 128, 8, None, False, False),            # HarMA ViT-B/32
    ("text L77 D512 h128/8 +BiShare h64/8", 214, 77, 512, 128, 8, (64, 8), True, False),
    ("ViT-B/16 L197 D768 h128/8", 64, 197, 768, 128, 8, None, False, False),
    ("ViT-L/14 L257 D1024 h128/8", 32, 257, 1024, 128, 8, None, False, False),      # RemoteCLIP / GeoRSCLIP
    ("ViT-L/14@336 L577 D1024 h128/8", 8, 577, 1024, 128, 8, None, False, False),
    ("edge L577 D1024 h512/4 +BiShare h256/2 +mask", 2, 577, 1024, 512, 4, (256, 2), True, True),  # head dim 128
    ("edge L7 D64 h16/4 +BiShare h8/2", 4, 7, 64, 16, 4, (8, 2), False, True),       # head dim 4
]


def _meta_share(H, H2, NH2, meta, gate_dt):
    return ShareWeights(meta(H2, H), meta(H2), meta(H, H2), meta(H), meta(3 * H2, H2), meta(3 * H2), meta(H2, H2),
                        meta(H2), meta(1, dt=gate_dt), NH2)


def aot_launches(props: DeviceProps, dtype: str, profile: str = "quick") -> list:
    """Every launch of :func:`mga_forward` / :func:`mga_backward` at :data:`AOT_CASES` on ``props``, as
    ``kernels._launch.AotLaunch`` records built by the launchers' own argument helpers and plans
    (:func:`plan_mga`, train and inference). ``profile="quick"``: SPEC cases, inference variants in bf16 only;
    ``"full"``: every variant and the edge cases. Launches with equal constants are listed once."""
    from ._launch import AotLaunch, aot_dtype

    tdt, prec = aot_dtype(dtype)
    quick = profile == "quick"
    f32 = torch.float32

    def meta(*shape, dt=tdt):
        return torch.empty(shape, device="meta", dtype=dt)

    out, seen = [], set()

    def add(kernel, case, args, nw, stages, edge, cfg_keys=()):
        key = (kernel, tuple(sorted((k, v) for k, v in args.items() if not isinstance(v, torch.Tensor))),
               tuple((k, str(v.dtype)) for k, v in args.items() if isinstance(v, torch.Tensor)), nw, stages)
        if key in seen:
            return
        seen.add(key)
        kw = {k: args.pop(k) for k in cfg_keys}
        out.append(AotLaunch(f"mga.{kernel}", case, args, (triton.Config(kw, num_warps=nw, num_stages=stages),),
                             False, edge))

    for label, B, L, D, H, NH, share_dims, has_mask, edge in AOT_CASES:
        if edge and quick:
            continue
        case = f"{dtype} {label}"
        H2, NH2 = share_dims or (None, None)
        mask = meta(B, L, dt=torch.uint8) if has_mask else None
        share = _meta_share(H, H2, NH2, meta, f32) if share_dims else None
        w = (meta(H, D), meta(H), meta(D, H), meta(D), meta(3 * H, H), meta(3 * H), meta(H, H), meta(H), meta(1, dt=f32))
        for train in (True, False):
            if not train and quick and dtype != "bf16":
                continue
            plan = plan_mga(L, D, H, NH, H2, NH2, tdt, props, train)
            tag = f"{case} {'train' if train else 'infer'} [{plan.path}]"
            if plan.path == "sequence":
                h2 = H2 or 16
                saved = MGASaved(meta(B, L, H), meta(B, L, H), meta(B, L, H), meta(B, L, h2), meta(0), meta(0),
                                 meta(0, dt=f32), meta(0, dt=f32))
                add("_mga_fwd_kernel", tag, _seq_fwd_args(meta(B, L, D), meta(B, L, D), mask, w, share, saved, NH,
                                                          plan, train, prec), plan.num_warps, plan.num_stages, edge)
                if train:
                    r = MGAGrads(meta(B, L, D), meta(B, L, H), meta(B, L, H), meta(B, L, H), saved.z2,
                                 meta(2, B, L, 3 * H), meta(2, B, L, H), meta(2, B, L, H), meta(B, dt=f32))
                    if share is not None:
                        r.share = ShareGrads(meta(B, L, H), saved.z1, saved.ws, meta(B, L, H2), meta(B, L, H2),
                                             meta(B, L, 3 * H2), meta(B, L, H2), meta(B, L, H2), meta(B, dt=f32))
                    bw = (w[0], w[2], w[4], w[5], w[6], w[7], w[8])
                    a2, a_s, a1 = _seq_bwd_args(meta(B, L, D), mask, bw, share, saved, r, meta(B, L, H), NH, plan, prec)
                    add("_bwd_msa2_kernel", tag, a2, plan.num_warps, plan.num_stages, edge)
                    if a_s is not None:
                        add("_bwd_share_kernel", tag, a_s, plan.num_warps, plan.num_stages, edge)
                    add("_bwd_msa1_kernel", tag, a1, plan.num_warps, plan.num_stages, edge)
                continue
            for h, nh, ap in ((H, NH, plan.attn), (H2, NH2, plan.attn_s)):
                if h is None:
                    continue
                sub = f"{tag} attn h{h}/{nh}"
                qkv, o, lse = meta(B, L, 3 * h), meta(B, L, h), meta(B, nh, L, dt=f32)
                keys = ("BQ", "BK")
                add("_attn_fwd_kernel", sub, _attn_fwd_args(qkv, nh, mask, o, lse, ap, prec), ap.num_warps,
                    ap.num_stages, edge, keys)
                if train:
                    a_dq, a_kv = _attn_bwd_args(qkv, meta(B, L, h), o, lse, nh, mask, meta(B, L, 3 * h),
                                                meta(B, nh, L, dt=f32), ap, prec)
                    add("_attn_bwd_dq_kernel", sub, a_dq, ap.num_warps, ap.num_stages, edge, keys)
                    add("_attn_bwd_dkdv_kernel", sub, a_kv, ap.num_warps, ap.num_stages, edge, keys)
    return out
