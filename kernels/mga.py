"""HarMA's gated multimodal adapter (MGA) with the optional BiShare adapter: the per-sequence Triton kernels.

Maths (SPEC §1)::

    z0 = GELU(x Wdᵀ + bd);  z1 = MSA(z0);  z2 = z1 + up_s(a_s MSA_s(w) + (1 - a_s) w), w = down_s(z1)  (share)
    z2 = z1 (no share);  z3 = MSA(z2);  u = a z0 + (1 - a) z3;  y = x + u Wuᵀ + bu

with ``a = sigmoid(gate)``, MSA the ``nn.MultiheadAttention`` maths (in-projection, softmax attention over
the sequence, out-projection), the same weights for both MSA calls.

One design: one program per sequence (short L: padded L ≤ 128, padded hidden ≤ 128, shared-memory estimate
within the device). A sequence's low-dimensional activations ``(L, hidden)`` stay in registers (padded to
powers of two ≥ 16, masked), the attention is computed head by head from registers (``q_h = z Wq_hᵀ``,
``S = q kᵀ``, max-subtracted softmax in fp32, ``o_h = P v``, and the out-projection is accumulated head by
head: ``out += o_h Wo[:, h]ᵀ``), so the whole forward is ONE launch that reads ``x`` and the weights once and
writes ``y`` (plus, when autograd needs them, the small ``(B, L, hidden)`` activations ``hpre``, ``z1``,
``z2``, ``w``). Backward, one program per sequence again, in reverse order, recomputing the attention:

* ``_bwd_msa2_kernel``: ``du = dy Wu``, MSA backward of the 2nd call (recomputing ``z3``), writes
  ``u``, ``du``, ``dz2``, the per-program gate partial, and ``dqkv``/``o``/``g`` of that call;
* ``_bwd_share_kernel`` (BiShare only): ``dv = dz2 Wu_s``, MSA_s backward, writes ``dw``, ``v_s``, ``dz1``;
* ``_bwd_msa1_kernel``: MSA backward of the 1st call, ``dpre = (dz0 + a du) GELU'(hpre)``,
  ``dx = dy + dpre Wd``.

:func:`plan_mga` decides per layer, from the device (``kernels/_launch.device_props``), the dtype, the feature
sizes and L (never the batch), whether these kernels run it; where they do not (long sequences, wide hidden,
shared memory) the op (``rspeft_fast.ops.mga``) runs the blocked path of ``rspeft_fast/ops/_mga_blocked.py``:
GEMMs over the B·L rows and the flash-style kernels of ``kernels/attention.py``, whose tiles the plan carries
too (``attn``, ``attn_s``). :func:`why_unsupported` names what neither runs (head dims above
``attention.MAX_HEAD_DIM``, dtypes/archs of ``_launch.arch_unsupported``). Both paths fill the same
:class:`MGASaved` / :class:`MGAGrads` buffers (:func:`saved_buffers`, :func:`grad_buffers`).

Weight gradients are plain deterministic GEMMs / row sums over the ``B·L`` rows of the ``(B, L, ·)``
intermediates (done by the caller, ``rspeft_fast.ops.mga``); the gate gradients are per-sequence partials
summed afterwards. No atomics: bitwise deterministic.

Key padding mask: True (nonzero) = padded key, excluded by a ``-inf`` score. A query whose keys are all
padded gets ``0/0 = NaN``, exactly as ``nn.MultiheadAttention``/``msa_ref`` (documented, not hidden).

``tl.dot`` needs every dimension ≥ 16: L, hidden and head dim are padded to powers of two ≥ 16 with masks
(checked at compile time: ``_launch.static_assert_tile``). Numerics are ``kernels/_launch.py``'s one policy
(``precision``, ``dot``, ``cast``): operands of every dot in the compute dtype (the dtype of the weights),
fp32 accumulation, fp32 softmax statistics; fp32 dots "ieee" unless TF32 is allowed in torch; under the
interpreter 16-bit rounding is emulated.
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
from ._launch import (LAUNCH_OPTIONS, DeviceProps, arch_unsupported, device_props, dot_as, operand_bytes, pad_pow2,
                      precision, round_to, smem_bytes, static_assert_tile)
from .attention import MAX_HEAD_DIM, AttnPlan, key_bias, plan_attention


# ----------------------------------------------------------------------------------------------------
# jit helpers
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _sequence(MASK, L, LP: tl.constexpr, HP: tl.constexpr, HAS_MASK: tl.constexpr):
    """The preamble of every kernel here: sequence ``b = program_id(0)``, its padded rows and their mask, the
    padded hidden columns and the (LP,) key bias of the sequence's padding mask."""
    static_assert_tile(LP)
    static_assert_tile(HP)
    b = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, LP)
    return b, rows, rows < L, tl.arange(0, HP), key_bias(MASK, b, rows, L, HAS_MASK)


@triton.jit
def _model_dim_in(A, sal, sad, W, swd, swh, rows, rmask, hc, D, H, LP: tl.constexpr, HP: tl.constexpr,
                  BD: tl.constexpr, PREC: tl.constexpr):
    """(LP, HP) fp32 ``A[rows, :D] @ Wt`` with ``Wt[d, h] = W[d·swd + h·swh]``: a projection from the model dim
    into the hidden one, a K-loop over ``D`` in ``BD`` chunks (``A`` row stride ``sal``, column stride ``sad``)."""
    static_assert_tile(BD)
    acc = tl.zeros((LP, HP), dtype=tl.float32)
    for k0 in range(0, D, BD):
        kc = k0 + tl.arange(0, BD)
        a = tl.load(A + rows[:, None] * sal + kc[None, :] * sad, mask=rmask[:, None] & (kc[None, :] < D), other=0.0)
        w = tl.load(W + kc[:, None] * swd + hc[None, :] * swh, mask=(kc[:, None] < D) & (hc[None, :] < H), other=0.0)
        acc += dot_as(a, w, W, PREC)
    return acc


@triton.jit
def _load_tile(P, rows, cols, L, N, stride_l):
    """(LP, NP) fp32 tile of a row-major ``(L, N)`` block (rows/cols padded with zeros)."""
    m = (rows[:, None] < L) & (cols[None, :] < N)
    return tl.load(P + rows[:, None] * stride_l + cols[None, :], mask=m, other=0.0).to(tl.float32)


@triton.jit
def _store_tile(P, t, rows, cols, L, N, stride_l, PREC: tl.constexpr):
    m = (rows[:, None] < L) & (cols[None, :] < N)
    tl.store(P + rows[:, None] * stride_l + cols[None, :], round_to(t, P, PREC), mask=m)


@triton.jit
def _linear(a, W, bias, K, N, KP: tl.constexpr, NP: tl.constexpr, PREC: tl.constexpr):
    """``a (LP, KP) @ Wᵀ + b`` for an nn.Linear weight ``W (N, K)`` → (LP, NP)."""
    kk = tl.arange(0, KP)
    nn = tl.arange(0, NP)
    w = tl.load(W + nn[None, :] * K + kk[:, None], mask=(kk[:, None] < K) & (nn[None, :] < N), other=0.0)
    b = tl.load(bias + nn, mask=nn < N, other=0.0).to(tl.float32)
    return dot_as(a, w, W, PREC) + b[None, :]


@triton.jit
def _linear_t(g, W, K, N, KP: tl.constexpr, NP: tl.constexpr, PREC: tl.constexpr):
    """``g (LP, NP) @ W`` for an nn.Linear weight ``W (N, K)`` (the input gradient) → (LP, KP)."""
    kk = tl.arange(0, KP)
    nn = tl.arange(0, NP)
    w = tl.load(W + nn[:, None] * K + kk[None, :], mask=(nn[:, None] < N) & (kk[None, :] < K), other=0.0)
    return dot_as(g, w, W, PREC)


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
def _head_attention(z, kbias, Win, b_in, h, H, DH, scale, HP: tl.constexpr, DHP: tl.constexpr, PREC: tl.constexpr):
    """Head ``h`` of the attention of one sequence held in registers, ``z (LP, HP)``: its in-projection
    weights (HP, DHP), ``q, k, v`` (LP, DHP), the max-subtracted softmax ``p`` (LP, LP) in fp32 (a row of only
    -inf gives NaN, as torch) and the head output ``o = p v``."""
    static_assert_tile(DHP)
    wq, wk, wv, bq, bk, bv = _head_weights(Win, b_in, h, H, DH, HP, DHP)
    q = dot_as(z, wq, Win, PREC) + bq[None, :]
    k = dot_as(z, wk, Win, PREC) + bk[None, :]
    v = dot_as(z, wv, Win, PREC) + bv[None, :]
    s = dot_as(q, tl.trans(k), Win, PREC) * scale + kbias[None, :]
    e = tl.exp(s - tl.max(s, 1)[:, None])
    p = e / tl.sum(e, 1)[:, None]
    return wq, wk, wv, q, k, v, p, dot_as(p, v, Win, PREC)


@triton.jit
def _out_bias(acc, bout, H, HP: tl.constexpr):
    kk = tl.arange(0, HP)
    return acc + tl.load(bout + kk, mask=kk < H, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _msa_fwd(z, kbias, Win, b_in, Wout, bout, H, DH, NH, scale,
             LP: tl.constexpr, HP: tl.constexpr, DHP: tl.constexpr, PREC: tl.constexpr):
    """nn.MultiheadAttention self-attention of one sequence held in registers: z (LP, HP) → (LP, HP)."""
    acc = tl.zeros((LP, HP), dtype=tl.float32)
    for h in range(NH):
        _, _, _, _, _, _, _, o = _head_attention(z, kbias, Win, b_in, h, H, DH, scale, HP, DHP, PREC)
        acc += dot_as(o, _head_out_weight(Wout, h, H, DH, HP, DHP), Wout, PREC)
    return _out_bias(acc, bout, H, HP)


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
        wq, wk, wv, q, k, v, p, o = _head_attention(z, kbias, Win, b_in, h, H, DH, scale, HP, DHP, PREC)
        wo = _head_out_weight(Wout, h, H, DH, HP, DHP)  # (DHP, HP)
        if NEED_OUT:
            out += dot_as(o, wo, Wout, PREC)
        do = dot_as(g, tl.trans(wo), Wout, PREC)  # (LP, DHP)
        dp = dot_as(do, tl.trans(v), Win, PREC)  # (LP, LP)
        delta = tl.sum(do * o, 1)
        ds = p * (dp - delta[:, None]) * scale
        dv = dot_as(tl.trans(p), do, Win, PREC)
        dq = dot_as(ds, k, Win, PREC)
        dk = dot_as(tl.trans(ds), q, Win, PREC)
        dz += dot_as(dq, tl.trans(wq), Win, PREC)
        dz += dot_as(dk, tl.trans(wk), Win, PREC)
        dz += dot_as(dv, tl.trans(wv), Win, PREC)
        c = h * DH + dd
        m = (rows[:, None] < L) & (dd[None, :] < DH)
        base = DQKV + rows[:, None] * (3 * H) + c[None, :]
        tl.store(base, round_to(dq, DQKV, PREC), mask=m)
        tl.store(base + H, round_to(dk, DQKV, PREC), mask=m)
        tl.store(base + 2 * H, round_to(dv, DQKV, PREC), mask=m)
        tl.store(O + rows[:, None] * H + c[None, :], round_to(o, O, PREC), mask=m)
    if NEED_OUT:
        out = _out_bias(out, bout, H, HP)
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
    static_assert_tile(BD)
    b, rows, rmask, hc, kbias = _sequence(MASK, L, LP, HP, HAS_MASK)
    Xb = X + b * sxb

    # down-projection + GELU (Wd: (H, D))
    bdv = tl.load(bd + hc, mask=hc < H, other=0.0).to(tl.float32)
    hpre = _model_dim_in(Xb, sxl, sxd, Wd, 1, D, rows, rmask, hc, D, H, LP, HP, BD, PREC) + bdv[None, :]
    z0 = gelu(hpre)
    if SAVE:
        _store_tile(HPRE + b * L * H, hpre, rows, hc, L, H, H, PREC)

    z1 = _msa_fwd(z0, kbias, Win, b_in, Wo, bo, H, DH, NH, scale, LP, HP, DHP, PREC)
    if SHARE:
        static_assert_tile(H2P)
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
        t = round_to(dot_as(u, w, Wu, PREC) + bun[None, :], Wu, PREC).to(tl.float32)
        xt = tl.load(Xb + rows[:, None] * sxl + nc[None, :] * sxd, mask=m, other=0.0).to(tl.float32)
        tl.store(Yb + rows[:, None] * D + nc[None, :], round_to(xt + t, Y, PREC), mask=m)


@triton.jit
def _bwd_msa2_kernel(
    DY, sdb, sdl, sdd, MASK, Wu, Win, b_in, Wo, bo, GATE,
    HPRE, Z2, DQKV, O, G, U, DU, DZ2, GP,
    L, D, H, NH, DH, scale,
    LP: tl.constexpr, HP: tl.constexpr, DHP: tl.constexpr, BD: tl.constexpr,
    HAS_MASK: tl.constexpr, PREC: tl.constexpr,
):
    static_assert_tile(BD)
    b, rows, rmask, hc, kbias = _sequence(MASK, L, LP, HP, HAS_MASK)
    DYb = DY + b * sdb

    # du = dy Wu  (Wu: (D, H))
    du = _model_dim_in(DYb, sdl, sdd, Wu, H, 1, rows, rmask, hc, D, H, LP, HP, BD, PREC)
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
    static_assert_tile(H2P)
    b, rows, _, hc, kbias = _sequence(MASK, L, LP, HP, HAS_MASK)
    h2c = tl.arange(0, H2P)
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
    HAS_MASK: tl.constexpr, PREC: tl.constexpr,
):
    static_assert_tile(BD)
    b, rows, rmask, hc, kbias = _sequence(MASK, L, LP, HP, HAS_MASK)
    off = b * L * H

    z0 = gelu(_load_tile(HPRE + off, rows, hc, L, H, H))
    _store_tile(Z0 + off, z0, rows, hc, L, H, H, PREC)
    g = _load_tile(G1 + off, rows, hc, L, H, H)
    dza, _ = _msa_bwd(z0, g, kbias, Win, b_in, Wo, bo, DQKV + b * L * 3 * H, O + off, L, H, DH, NH, scale,
                      LP, HP, DHP, False, PREC)
    hpre = _load_tile(HPRE + off, rows, hc, L, H, H)  # read again, not held across the attention (spills)
    a = tl.sigmoid(tl.load(GATE).to(tl.float32))
    dz0 = dza + a * _load_tile(DU + off, rows, hc, L, H, H)
    dpre = dz0 * gelu_grad(hpre)
    _store_tile(DPRE + off, dpre, rows, hc, L, H, H, PREC)

    # dx = dy + dpre Wd  (Wd: (H, D)), N-loop over the model dim
    DYb = DY + b * sdb
    DXb = DX + b * L * D
    for n0 in range(0, D, BD):
        nc = n0 + tl.arange(0, BD)
        m = rmask[:, None] & (nc[None, :] < D)
        w = tl.load(Wd + hc[:, None] * D + nc[None, :], mask=(hc[:, None] < H) & (nc[None, :] < D), other=0.0)
        t = round_to(dot_as(dpre, w, Wd, PREC), Wd, PREC).to(tl.float32)
        dyt = tl.load(DYb + rows[:, None] * sdl + nc[None, :] * sdd, mask=m, other=0.0).to(tl.float32)
        tl.store(DXb + rows[:, None] * D + nc[None, :], round_to(dyt + t, DX, PREC), mask=m)


# ----------------------------------------------------------------------------------------------------
# typed containers and their buffers
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


def _share_dims(share) -> tuple[int, int] | None:
    """``(hidden, heads)`` of a :class:`ShareWeights`, None without BiShare."""
    return None if share is None else (int(share.down_w.shape[0]), int(share.heads))


def saved_buffers(x, hidden: int, heads: int, share, dtype: torch.dtype, blocked: bool, save: bool,
                  none: Tensor | None = None) -> MGASaved:
    """The :class:`MGASaved` a forward of ``x (B, L, ·)`` fills (``blocked``: the path that also saves ``o``,
    ``lse``), fresh tensors of ``dtype`` (``lse`` fp32) made with ``x.new_empty``: ``(0,)`` for what this call
    does not save (custom ops' outputs must not alias). The launchers of both paths and the fake
    implementation of ``rspeft_fast::mga_fwd`` take their shapes from here. ``none``: an empty tensor to stand for
    every field not saved (the eager hot path, where outputs may alias; not the custom op)."""
    B, L = x.shape[0], x.shape[1]
    H, NH = int(hidden), int(heads)
    dims = _share_dims(share)
    has = dims is not None
    H2, NH2 = dims or (0, 0)

    def buf(keep, *shape, dt=dtype):
        if none is not None and not (save and keep):
            return none
        return x.new_empty(shape if (save and keep) else (0,), dtype=dt)

    f32 = torch.float32
    return MGASaved(hpre=buf(True, B, L, H), z1=buf(has, B, L, H), z2=buf(True, B, L, H), ws=buf(has, B, L, H2),
                    o=buf(blocked, 2, B, L, H), o_s=buf(blocked and has, B, L, H2),
                    lse=buf(blocked, 2, B, NH, L, dt=f32), lse_s=buf(blocked and has, B, NH2, L, dt=f32))


def grad_buffers(dy, x_dtype: torch.dtype, hidden: int, share, dtype: torch.dtype, saved: MGASaved) -> MGAGrads:
    """The :class:`MGAGrads` a backward fills (both paths): fresh ``(B, L, ·)`` tensors of ``dtype`` (``dx`` of
    ``x_dtype``), ``z2``/``z1``/``w`` and, after a blocked forward (``saved.o`` filled), the head outputs taken
    from ``saved``; the gate partials start at zero (what an empty batch or sequence returns)."""
    B, L, D = dy.shape
    H = int(hidden)
    dev = dy.device

    def new(*shape):
        return torch.empty(shape, device=dev, dtype=dtype)

    def partials():
        return torch.zeros((B,), device=dev, dtype=torch.float32)

    blocked = saved.o.numel() > 0
    r = MGAGrads(dx=torch.empty((B, L, D), device=dev, dtype=x_dtype), dpre=new(B, L, H), u=new(B, L, H),
                 z0=new(B, L, H), z2=saved.z2, dqkv=new(2, B, L, 3 * H), o=saved.o if blocked else new(2, B, L, H),
                 g=new(2, B, L, H), gate_partial=partials())
    dims = _share_dims(share)
    if dims is not None:
        H2 = dims[0]
        r.share = ShareGrads(dz2=new(B, L, H), z1=saved.z1, w=saved.ws, dw=new(B, L, H2), vs=new(B, L, H2),
                             dqkv=new(B, L, 3 * H2), o=saved.o_s if blocked else new(B, L, H2), g=new(B, L, H2),
                             gate_partial=partials())
    return r


# ----------------------------------------------------------------------------------------------------
# launch plan (from the device)
# ----------------------------------------------------------------------------------------------------
SEQ_MAX_LP = 128    # padded L the per-sequence kernels may take: their (LP, LP) score tiles (see plan_mga)
SEQ_MAX_HP = 128    # padded hidden they may take: (LP, HP) activations held in registers
SEQ_STAGES = 3      # pipelining depth of their K/N loops over the model dim (Triton's CUDA default)
NO_SHARE = (16, 1)  # (hidden, heads) the BiShare constexprs and placeholders take in a layer without BiShare


def _p2(n: int) -> int:
    return pad_pow2(n, 16)


def _warps(LP: int, HP: int) -> int:
    return 4 if LP * HP <= 64 * 64 else 8


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
    """Launch plan of one MGA layer. ``path``: ``"sequence"`` (the kernels here: one program per sequence, the
    whole forward in one launch) or ``"blocked"`` (``rspeft_fast.ops._mga_blocked``: GEMMs for the projections
    over all B·L rows + the attention kernels of ``kernels/attention.py``); ``reason`` says why. Per-sequence
    constants ``LP, HP, DHP, H2P, DH2P, BD, num_warps, num_stages``; attention plans ``attn`` (hidden) /
    ``attn_s`` (BiShare)."""
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
    H2s, NH2s = (H2, NH2) if share else NO_SHARE
    LP, HP, DHP = _p2(L), _p2(H), _p2(H // NH)
    H2P, DH2P = _p2(H2s), _p2(H2s // NH2s)
    nb = operand_bytes(dtype, props)  # sm_75: 16-bit tiles staged as fp32 (AOT: 131072 B for the text forward)
    BD = 32 if HP > 128 or LP > 64 else 64
    nw = _warps(LP, HP)
    attn = plan_attention(L, H // NH, dtype, props)
    attn_s = plan_attention(L, H2 // NH2, dtype, props) if share else None

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


def plan_for(x_shape, hidden, heads, share, dtype, device, train) -> MGAPlan:
    """:func:`plan_mga` for a call (the op's dispatch, the launchers and the custom op's fake use this one)."""
    _, L, D = x_shape
    H2, NH2 = _share_dims(share) or (None, None)
    return plan_mga(int(L), int(D), int(hidden), int(heads), H2, NH2, dtype, device_props(device), bool(train))


# ----------------------------------------------------------------------------------------------------
# launchers (plain functions: tensors in, tensors out)
# ----------------------------------------------------------------------------------------------------
def _sequence_plan(plan: MGAPlan | None, shape, hidden, heads, share, dtype, device, train) -> MGAPlan:
    plan = plan or plan_for(shape, hidden, heads, share, dtype, device, train)
    if plan.path != "sequence":
        raise ValueError(f"mga: the per-sequence kernels do not run this layer ({plan.reason}); "
                         "rspeft_fast.ops.mga runs it on the blocked path")
    return plan


def mga_forward(x, down_weight, down_bias, up_weight, up_bias, in_w, in_b, out_w, out_b, gate, heads,
                share=None, mask_u8=None, save=False, plan: MGAPlan | None = None, none: Tensor | None = None):
    """Fused forward, ONE launch. ``x (B, L, D)`` any strides; weights contiguous in one compute dtype; ``gate`` a
    1-element tensor; ``share`` None or a :class:`ShareWeights`; ``mask_u8 (B, L)`` uint8 (1 = padded key)
    or None; ``save``: keep what the backward needs; ``plan`` (default :func:`plan_for`) must be a
    ``"sequence"`` plan (ValueError otherwise).

    Returns ``(y, saved)``: ``y (B, L, D)`` (dtype ``promote(x.dtype, weights dtype)``) and an
    :class:`MGASaved` (empty tensors when ``save`` is False, ``none`` for each when given: see
    :func:`saved_buffers`); L = 0 or B = 0 gives empty outputs.
    """
    if share is not None:
        share = ShareWeights._make(share)
    B, L, D = x.shape
    H = down_weight.shape[0]
    cdt = down_weight.dtype
    plan = _sequence_plan(plan, x.shape, H, heads, share, cdt, x.device, save)
    y = torch.empty((B, L, D), device=x.device, dtype=torch.promote_types(x.dtype, cdt))
    saved = saved_buffers(x, H, heads, share, cdt, False, save, none)
    if B == 0 or L == 0:
        return y, saved
    args = _seq_fwd_args(x, y, mask_u8, (down_weight, down_bias, up_weight, up_bias, in_w, in_b, out_w, out_b, gate),
                         share, saved, int(heads), plan, save, precision(cdt))
    _mga_fwd_kernel[(B,)](**args, num_warps=plan.num_warps, num_stages=plan.num_stages, **LAUNCH_OPTIONS)
    return y, saved


def _seq_fwd_args(x, y, mask_u8, w, share, saved: MGASaved, NH, plan: MGAPlan, save, prec) -> dict:
    """Arguments of :func:`_mga_fwd_kernel` (the launcher and :func:`aot_launches` both build them here).
    ``w`` = (down_w, down_b, up_w, up_b, in_w, in_b, out_w, out_b, gate)."""
    _, L, D = x.shape
    H = w[0].shape[0]
    DH = H // NH
    has_share = share is not None
    s = share if has_share else ShareWeights(*((w[0],) * 9), NO_SHARE[1])
    H2, NH2 = _share_dims(share) or NO_SHARE
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
                 saved: MGASaved, share=None, mask_u8=None, plan: MGAPlan | None = None) -> MGAGrads:
    """Fused backward of :func:`mga_forward`: the ``(B, L, ·)`` intermediates of the weight gradients and ``dx``
    (:class:`MGAGrads`). Two launches (three with BiShare), each recomputing the attention of one sequence;
    ``plan`` (default :func:`plan_for`, training) must be a ``"sequence"`` plan."""
    if share is not None:
        share = ShareWeights._make(share)
    B, L, _ = dy.shape
    H = down_weight.shape[0]
    cdt = down_weight.dtype
    r = grad_buffers(dy, x_dtype, H, share, cdt, saved)
    plan = _sequence_plan(plan, dy.shape, H, heads, share, cdt, dy.device, True)
    if B == 0 or L == 0:
        return r
    du = torch.empty((B, L, H), device=dy.device, dtype=cdt)
    a2, a_s, a1 = _seq_bwd_args(dy, mask_u8, (down_weight, up_weight, in_w, in_b, out_w, out_b, gate), share, saved,
                                r, du, int(heads), plan, precision(cdt))
    opts = dict(num_warps=plan.num_warps, num_stages=plan.num_stages, **LAUNCH_OPTIONS)
    _bwd_msa2_kernel[(B,)](**a2, **opts)
    if share is not None:
        _bwd_share_kernel[(B,)](**a_s, **opts)
    _bwd_msa1_kernel[(B,)](**a1, **opts)
    return r


def _seq_bwd_args(dy, mask_u8, w, share, saved: MGASaved, r: MGAGrads, du, NH, plan: MGAPlan, prec):
    """Arguments of the per-sequence backward kernels ``(msa2, share or None, msa1)`` (launcher and
    :func:`aot_launches`). ``w`` = (down_w, up_w, in_w, in_b, out_w, out_b, gate)."""
    _, L, D = dy.shape
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
              DPRE=r.dpre, L=L, D=D, H=H, NH=NH, DH=DH, scale=scale, DHP=plan.DHP, BD=plan.BD, **common)
    return a2, a_s, a1


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
    """Every launch of an MGA layer at :data:`AOT_CASES` on ``props``, as ``kernels._launch.AotLaunch`` records
    built by the launchers' own argument helpers and plans (:func:`plan_mga`, train and inference): the
    per-sequence kernels here, or on the blocked path the attention kernels (``kernels/attention.py``; its
    GEMMs are cuBLAS). ``profile``: ``_launch.aot_profile``'s names. Launches with equal constants are
    listed once."""
    from . import attention
    from ._launch import AotLaunch, aot_dtype, aot_profile

    tdt, prec = aot_dtype(dtype)
    prof = aot_profile(profile)
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
        out.append(AotLaunch(kernel, case, args, (triton.Config(kw, num_warps=nw, num_stages=stages),), False, edge))

    for label, B, L, D, H, NH, share_dims, has_mask, edge in AOT_CASES:
        if edge and prof.lean:
            continue
        case = f"{dtype} {label}"
        H2, NH2 = share_dims or (None, None)
        mask = meta(B, L, dt=torch.uint8) if has_mask else None
        share = _meta_share(H, H2, NH2, meta, f32) if share_dims else None
        w = (meta(H, D), meta(H), meta(D, H), meta(D), meta(3 * H, H), meta(3 * H), meta(H, H), meta(H), meta(1, dt=f32))
        x = meta(B, L, D)
        for train in (True, False):
            if not train and prof.lean and dtype != "bf16":
                continue
            plan = plan_mga(L, D, H, NH, H2, NH2, tdt, props, train)
            tag = f"{case} {'train' if train else 'infer'} [{plan.path}]"
            if plan.path == "sequence":
                saved = saved_buffers(x, H, NH, share, tdt, False, True)
                add("mga._mga_fwd_kernel", tag, _seq_fwd_args(x, meta(B, L, D), mask, w, share, saved, NH, plan, train,
                                                              prec), plan.num_warps, plan.num_stages, edge)
                if train:
                    r = grad_buffers(x, tdt, H, share, tdt, saved)
                    bw = (w[0], w[2], w[4], w[5], w[6], w[7], w[8])
                    a2, a_s, a1 = _seq_bwd_args(x, mask, bw, share, saved, r, meta(B, L, H), NH, plan, prec)
                    add("mga._bwd_msa2_kernel", tag, a2, plan.num_warps, plan.num_stages, edge)
                    if a_s is not None:
                        add("mga._bwd_share_kernel", tag, a_s, plan.num_warps, plan.num_stages, edge)
                    add("mga._bwd_msa1_kernel", tag, a1, plan.num_warps, plan.num_stages, edge)
                continue
            for h, nh, ap in ((H, NH, plan.attn), (H2, NH2, plan.attn_s)):
                if h is None:
                    continue
                sub = f"{tag} attn h{h}/{nh}"
                qkv, o, lse = meta(B, L, 3 * h), meta(B, L, h), meta(B, nh, L, dt=f32)
                keys = ("BQ", "BK")
                add("attention._attn_fwd_kernel", sub, attention.fwd_args(qkv, nh, mask, o, lse, ap, prec),
                    ap.num_warps, ap.num_stages, edge, keys)
                if train:
                    a_dq, a_kv = attention.bwd_args(qkv, meta(B, L, h), o, lse, nh, mask, meta(B, L, 3 * h),
                                                    meta(B, nh, L, dt=f32), ap, prec)
                    add("attention._attn_bwd_dq_kernel", sub, a_dq, ap.num_warps, ap.num_stages, edge, keys)
                    add("attention._attn_bwd_dkdv_kernel", sub, a_kv, ap.num_warps, ap.num_stages, edge, keys)
    return out
