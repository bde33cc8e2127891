"""HarMA's gated multimodal adapter (MGA) with the optional BiShare adapter: fused Triton kernels.

Maths (SPEC §1)::

    z0 = GELU(x Wdᵀ + bd);  z1 = MSA(z0);  z2 = z1 + up_s(a_s MSA_s(w) + (1 - a_s) w), w = down_s(z1)  (share)
    z2 = z1 (no share);  z3 = MSA(z2);  u = a z0 + (1 - a) z3;  y = x + u Wuᵀ + bu

with ``a = sigmoid(gate)``, MSA the ``nn.MultiheadAttention`` maths (in-projection, softmax attention over
the sequence, out-projection), the same weights for both MSA calls.

Design: one program per sequence. A sequence's low-dimensional activations ``(L, hidden)`` stay in
registers (padded to powers of two, masked), the attention is computed head by head from registers
(``q_h = z Wq_hᵀ``, ``S = q kᵀ``, max-subtracted softmax in fp32, ``o_h = P v``, and the out-projection is
accumulated head by head: ``out += o_h Wo[:, h]ᵀ``), so the whole forward is ONE launch that reads ``x``
and the weights once and writes ``y`` (plus, when autograd needs them, the small ``(B, L, hidden)``
activations ``hpre``, ``z1``, ``z2``, ``w``).

Backward, one program per sequence again, in reverse order, recomputing the attention probabilities:

* ``_bwd_msa2_kernel``: ``du = dy Wu``, MSA backward of the 2nd call (recomputing ``z3``), writes
  ``u``, ``du``, ``dz2``, the per-program gate partial, and ``dqkv``/``o``/``g`` of that call;
* ``_bwd_share_kernel`` (BiShare only): ``dv = dz2 Wu_s``, MSA_s backward, writes ``dw``, ``v_s``, ``dz1``;
* ``_bwd_msa1_kernel``: MSA backward of the 1st call, ``dpre = (dz0 + a du) GELU'(hpre)``,
  ``dx = dy + dpre Wd``.

Weight gradients are then plain deterministic GEMMs / row sums over the ``B·L`` rows of those
``(B, L, ·)`` intermediates (done by the caller, ``rspeft_fast.ops.mga``); the gate gradients are per-program
partials summed afterwards. No atomics.

Key padding mask: True (nonzero) = padded key, excluded by a ``-inf`` score. A query whose keys are all
padded gets ``0/0 = NaN``, exactly as ``nn.MultiheadAttention``/``msa_ref`` (documented, not hidden).

``tl.dot`` needs every dimension ≥ 16: L, hidden and head dim are padded to powers of two ≥ 16 with masks.
Operands of every ``tl.dot`` are cast to the compute dtype (the dtype of the weights), accumulation is fp32;
in fp32 the dots use ``input_precision`` "ieee" unless TF32 matmuls are allowed in torch.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import gelu, gelu_grad

MAX_L = 256
SUPPORTED_HEAD_DIMS = (8, 16, 32, 64)


# ----------------------------------------------------------------------------------------------------
# jit helpers
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _round_to(x, P, PREC: tl.constexpr):
    """``x`` cast to the element type of pointer ``P`` with round-to-nearest-even.

    Triton's CPU interpreter truncates float32 → bfloat16; under it (``PREC == "emulate"``) the rounding is
    done by hand on the float32 bits so CPU checks see the rounding the GPU does.
    """
    if PREC == "emulate":
        if P.dtype.element_ty == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(P.dtype.element_ty)


@triton.jit
def _dot(a, b, W, PREC: tl.constexpr):
    """fp32-accumulated ``a @ b`` with both operands cast to the element type of pointer ``W``.

    ``PREC == "emulate"`` (Triton's CPU interpreter with 16-bit weights, whose 16-bit ``tl.dot`` is wrong):
    operands are rounded to the 16-bit type, then multiplied in fp32.
    """
    if PREC == "emulate":
        return tl.dot(_round_to(a, W, PREC).to(tl.float32), _round_to(b, W, PREC).to(tl.float32),
                      input_precision="ieee")
    else:
        return tl.dot(a.to(W.dtype.element_ty), b.to(W.dtype.element_ty), input_precision=PREC)


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
def _head_weights(Win, bin, h, H, DH, HP: tl.constexpr, DHP: tl.constexpr):
    """Wq_hᵀ, Wk_hᵀ, Wv_hᵀ (HP, DHP) and their biases (DHP,) of head ``h``."""
    kk = tl.arange(0, HP)
    dd = tl.arange(0, DHP)
    c = h * DH + dd
    m = (kk[:, None] < H) & (dd[None, :] < DH)
    wq = tl.load(Win + c[None, :] * H + kk[:, None], mask=m, other=0.0)
    wk = tl.load(Win + (H + c)[None, :] * H + kk[:, None], mask=m, other=0.0)
    wv = tl.load(Win + (2 * H + c)[None, :] * H + kk[:, None], mask=m, other=0.0)
    dm = dd < DH
    bq = tl.load(bin + c, mask=dm, other=0.0).to(tl.float32)
    bk = tl.load(bin + H + c, mask=dm, other=0.0).to(tl.float32)
    bv = tl.load(bin + 2 * H + c, mask=dm, other=0.0).to(tl.float32)
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
def _msa_fwd(z, kbias, Win, bin, Wout, bout, H, DH, NH, scale,
             LP: tl.constexpr, HP: tl.constexpr, DHP: tl.constexpr, PREC: tl.constexpr):
    """nn.MultiheadAttention self-attention of one sequence held in registers: z (LP, HP) → (LP, HP)."""
    acc = tl.zeros((LP, HP), dtype=tl.float32)
    for h in range(NH):
        wq, wk, wv, bq, bk, bv = _head_weights(Win, bin, h, H, DH, HP, DHP)
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
def _msa_bwd(z, g, kbias, Win, bin, Wout, bout, DQKV, O, L, H, DH, NH, scale,
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
        wq, wk, wv, bq, bk, bv = _head_weights(Win, bin, h, H, DH, HP, DHP)
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
    Wd, bd, Wu, bu, Win, bin, Wo, bo, GATE,
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

    z1 = _msa_fwd(z0, kbias, Win, bin, Wo, bo, H, DH, NH, scale, LP, HP, DHP, PREC)
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
    z3 = _msa_fwd(z2, kbias, Win, bin, Wo, bo, H, DH, NH, scale, LP, HP, DHP, PREC)

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
    DY, sdb, sdl, sdd, MASK, Wu, Win, bin, Wo, bo, GATE,
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
    dz2, z3 = _msa_bwd(z2, g, kbias, Win, bin, Wo, bo, DQKV + b * L * 3 * H, O + off, L, H, DH, NH, scale,
                       LP, HP, DHP, True, PREC)
    _store_tile(DZ2 + off, dz2, rows, hc, L, H, H, PREC)
    z0 = gelu(_load_tile(HPRE + off, rows, hc, L, H, H))
    u = a * z0 + (1.0 - a) * z3
    _store_tile(U + off, u, rows, hc, L, H, H, PREC)
    tl.debug_barrier()  # the DU tile was written by other threads of this program
    du = _load_tile(DU + off, rows, hc, L, H, H)
    gp = tl.sum(tl.sum(du * (z0 - z3), axis=1), axis=0) * a * (1.0 - a)
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
    gp = tl.sum(tl.sum(dv * (ms - w_s), axis=1), axis=0) * a_s * (1.0 - a_s)
    tl.store(GP + b, gp)
    dz1 = dz2 + _linear_t(dw, SWd, H, H2, HP, H2P, PREC)  # SWd: (H2, H)
    _store_tile(DZ1 + off, dz1, rows, hc, L, H, H, PREC)


@triton.jit
def _bwd_msa1_kernel(
    DY, sdb, sdl, sdd, DX, MASK, Wd, Win, bin, Wo, bo, GATE,
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
    dza, _unused = _msa_bwd(z0, g, kbias, Win, bin, Wo, bo, DQKV + b * L * 3 * H, O + off, L, H, DH, NH, scale,
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
# long sequences (padded L > 128): flash-attention-style attention backward, one (sequence, head, block)
# per program, so no (L, L) tile is ever whole on chip
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
def _attn_bwd_dq_kernel(
    QKV, DO, MASK, DQKV, O, STATS,
    L, H, NH, DH, scale,
    BQ: tl.constexpr, BK: tl.constexpr, DHP: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr,
):
    """Query block ``program_id(1)`` of head ``h`` of sequence ``b`` (``program_id(0) = b·NH + h``).

    ``QKV (B, L, 3H)`` the in-projection ``[q | k | v]`` of the attention input, ``DO (B, L, H)`` the gradient
    of the concatenated head outputs (``g Wo``). Pass 1 over the key blocks: online softmax → ``o`` (stored
    at ``O (B, L, H)``), ``lse``; ``delta = rowsum(do ∘ o)``; pass 2: ``dq = Σ_keys dS k`` (stored in the q
    columns of ``DQKV``). ``lse`` and ``delta`` go to ``STATS (B, NH, 2, L)`` fp32 for the key-block kernel.
    A query with every key padded gets NaN (``0/0``), as ``msa_ref``.
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
    q = tl.load(qkv + rows[:, None] * H3 + dd[None, :], mask=m2, other=0.0).to(tl.float32)
    do = tl.load(DO + b * L * H + h * DH + rows[:, None] * H + dd[None, :], mask=m2, other=0.0).to(tl.float32)

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
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key seen yet: keep exp() finite
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p, v, QKV, PREC)
        m_i = m_new
    o = acc / l_i[:, None]
    lse = tl.where(m_i == float("-inf"), 0.0, m_i) + tl.log(l_i)  # -inf for a fully padded row → NaN grads
    o_st = _round_to(o, O, PREC)
    delta = tl.sum(do * o_st.to(tl.float32), 1)

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
    tl.store(O + b * L * H + h * DH + rows[:, None] * H + dd[None, :], o_st, mask=m2)
    st = STATS + (b * NH + h) * 2 * L + rows
    tl.store(st, lse, mask=rmask)
    tl.store(st + L, delta, mask=rmask)


@triton.jit
def _attn_bwd_dkdv_kernel(
    QKV, DO, MASK, DQKV, STATS,
    L, H, NH, DH, scale,
    BQ: tl.constexpr, BK: tl.constexpr, DHP: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr,
):
    """Key block ``program_id(1)`` of head ``h`` of sequence ``b``: ``dv = Σ_queries Pᵀ do``,
    ``dk = Σ_queries dSᵀ q`` (the transposed scores are computed directly: no transpose of a big tile),
    from ``lse``/``delta`` of :func:`_attn_bwd_dq_kernel`; stored in the k/v columns of ``DQKV``."""
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
    st = STATS + (b * NH + h) * 2 * L

    dk = tl.zeros((BK, DHP), dtype=tl.float32)
    dv = tl.zeros((BK, DHP), dtype=tl.float32)
    for q0 in range(0, L, BQ):
        rows = q0 + tl.arange(0, BQ)
        rmask = rows < L
        qm = rmask[:, None] & (dd[None, :] < DH)
        q = tl.load(qkv + rows[:, None] * H3 + dd[None, :], mask=qm, other=0.0)
        do = tl.load(DO + b * L * H + h * DH + rows[:, None] * H + dd[None, :], mask=qm, other=0.0)
        lse = tl.load(st + rows, mask=rmask, other=0.0)
        delta = tl.load(st + L + rows, mask=rmask, other=0.0)
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
# launchers (plain functions: tensors in, tensors out)
# ----------------------------------------------------------------------------------------------------
def _p2(n: int) -> int:
    return max(16, triton.next_power_of_2(int(n)))


def _prec(dtype: torch.dtype, device: torch.device) -> str:
    if device.type == "cpu" and dtype != torch.float32:
        return "emulate"  # the interpreter's 16-bit tl.dot gives garbage (triton 3.8)
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _warps(LP: int, HP: int) -> int:
    return 4 if LP * HP <= 64 * 64 else 8


def check_shapes(L: int, hidden: int, heads: int, share_hidden: int | None = None, share_heads: int | None = None) -> None:
    """Raise ValueError for shapes the kernels do not support."""
    if L < 1 or L > MAX_L:
        raise ValueError(f"mga (triton): sequence length L={L} must be in [1, {MAX_L}] (one sequence per program)")
    for name, h, nh in (("hidden", hidden, heads), ("BiShare hidden", share_hidden, share_heads)):
        if h is None:
            continue
        if nh < 1 or h % nh:
            raise ValueError(f"mga (triton): {name}={h} must be divisible by heads={nh}")
        if h > 256:
            raise ValueError(f"mga (triton): {name}={h} > 256 is not supported (activations are held on chip)")
        if h // nh not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"mga (triton): {name} head dim {h // nh} must be one of {SUPPORTED_HEAD_DIMS}")


def mga_forward(x, down_weight, down_bias, up_weight, up_bias, in_w, in_b, out_w, out_b, gate, heads,
                share=None, mask_u8=None, save=False):
    """Fused forward. ``x (B, L, D)`` any strides; weights contiguous in one compute dtype; ``gate`` a
    1-element tensor; ``share`` None or a tuple ``(down_w, down_b, up_w, up_b, in_w, in_b, out_w, out_b, gate,
    heads)``; ``mask_u8 (B, L)`` uint8 (1 = padded key) or None.

    Returns ``y (B, L, D)`` (dtype ``promote(x.dtype, weights dtype)``) and the saved activations
    ``(hpre, z1, z2, w)`` (``(B, L, H)``/``(B, L, H/2)`` in the compute dtype; empty when ``save`` is False
    or, for ``z1``/``w``, without share).
    """
    B, L, D = x.shape
    H = down_weight.shape[0]
    cdt = down_weight.dtype
    dev = x.device
    NH = int(heads)
    DH = H // NH
    y = torch.empty((B, L, D), device=dev, dtype=torch.promote_types(x.dtype, cdt))
    def buf(*shape):  # a fresh tensor per output (custom ops' outputs must not alias each other)
        return x.new_empty(shape if save else (0,), dtype=cdt)

    hpre, z2 = buf(B, L, H), buf(B, L, H)
    if share is not None:
        sdw, sdb, suw, sub, siw, sib, sow, sob, sgate, sheads = share
        H2, NH2 = sdw.shape[0], int(sheads)
        z1, ws = buf(B, L, H), buf(B, L, H2)
    else:
        sdw, sdb, suw, sub, siw, sib, sow, sob, sgate = (down_weight,) * 9
        H2, NH2 = 16, 1
        z1, ws = x.new_empty(0, dtype=cdt), x.new_empty(0, dtype=cdt)
    DH2 = H2 // NH2
    LP, HP, DHP, H2P, DH2P = _p2(L), _p2(H), _p2(DH), _p2(H2), _p2(DH2)
    if B == 0:
        return y, hpre, z1, z2, ws
    mask = mask_u8 if mask_u8 is not None else y
    _mga_fwd_kernel[(B,)](
        x, x.stride(0), x.stride(1), x.stride(2), y, mask,
        down_weight, down_bias, up_weight, up_bias, in_w, in_b, out_w, out_b, gate,
        sdw, sdb, suw, sub, siw, sib, sow, sob, sgate,
        hpre if save else y, z1 if (save and share is not None) else y, z2 if save else y, ws if (save and share is not None) else y,
        L, D, H, NH, DH, H2, NH2, DH2, 1.0 / math.sqrt(DH), 1.0 / math.sqrt(DH2),
        LP=LP, HP=HP, DHP=DHP, H2P=H2P, DH2P=DH2P, BD=32 if HP > 128 or LP > 64 else 64,
        HAS_MASK=mask_u8 is not None, SHARE=share is not None, SAVE=bool(save), PREC=_prec(cdt, dev),
        num_warps=_warps(LP, HP),
    )
    return y, hpre, z1, z2, ws


def mga_backward(dy, x_dtype, down_weight, up_weight, in_w, in_b, out_w, out_b, gate, heads,
                 hpre, z1, z2, ws, share=None, mask_u8=None):
    """Fused backward kernels. Returns a dict of ``(B, L, ·)`` intermediates for the weight gradients and
    ``dx``: ``dx, dpre, u, z0, z2, dqkv (2, B, L, 3H), o (2, B, L, H), g (2, B, L, H), gate_partial (B,)``
    and, with share, ``s_dz2, s_z1, s_w, s_dw, s_vs, s_dqkv, s_o, s_g, s_gate_partial``.

    ``dqkv[0]/o[0]/g[0]`` belong to the first MSA call (input ``z0``), ``[1]`` to the second (input ``z2``).
    """
    B, L, D = dy.shape
    H = down_weight.shape[0]
    cdt = down_weight.dtype
    dev = dy.device
    NH = int(heads)
    DH = H // NH
    LP, HP, DHP = _p2(L), _p2(H), _p2(DH)
    prec = _prec(cdt, dev)
    nw = _warps(LP, HP)
    BD = 32 if HP > 128 or LP > 64 else 64
    has_mask = mask_u8 is not None
    # above LONG_LP padded rows the attention backward is blocked (_mga_backward_long); the per-sequence
    # kernels below always fuse the dx epilogue (FUSE_DX=False is kept for callers of the kernel)
    fuse_dx = True
    new = lambda *s: torch.empty(s, device=dev, dtype=cdt)  # noqa: E731
    dqkv, o, g = new(2, B, L, 3 * H), new(2, B, L, H), new(2, B, L, H)
    u, du, z0, dpre = new(B, L, H), new(B, L, H), new(B, L, H), new(B, L, H)
    dz2 = new(B, L, H) if share is not None else g[0]
    dx = torch.empty((B, L, D), device=dev, dtype=x_dtype)
    gp = torch.empty((B,), device=dev, dtype=torch.float32)
    res = dict(dx=dx, dpre=dpre, u=u, z0=z0, z2=z2, dqkv=dqkv, o=o, g=g, gate_partial=gp)
    mask = mask_u8 if has_mask else gp
    scale = 1.0 / math.sqrt(DH)
    if share is not None:
        sdw, sdb, suw, sub, siw, sib, sow, sob, sgate, sheads = share
        H2, NH2 = sdw.shape[0], int(sheads)
        DH2 = H2 // NH2
        res.update(s_dz2=dz2, s_z1=z1, s_w=ws, s_dw=new(B, L, H2), s_vs=new(B, L, H2), s_dqkv=new(B, L, 3 * H2),
                   s_o=new(B, L, H2), s_g=new(B, L, H2), s_gate_partial=torch.empty((B,), device=dev, dtype=torch.float32))
    if B == 0:
        return res
    if LP > LONG_LP:
        _mga_backward_long(dy, res, du, down_weight, up_weight, in_w, in_b, out_w, out_b, gate, NH, hpre, z2, share,
                           mask_u8, prec)
        return res
    _bwd_msa2_kernel[(B,)](
        dy, dy.stride(0), dy.stride(1), dy.stride(2), mask, up_weight, in_w, in_b, out_w, out_b, gate,
        hpre, z2, dqkv[1], o[1], g[1], u, du, dz2, gp,
        L, D, H, NH, DH, scale,
        LP=LP, HP=HP, DHP=DHP, BD=BD, HAS_MASK=has_mask, PREC=prec, num_warps=nw,
    )
    if share is not None:
        _bwd_share_kernel[(B,)](
            dz2, mask, sdw, suw, siw, sib, sow, sob, sgate,
            ws, res["s_dqkv"], res["s_o"], res["s_g"], res["s_vs"], res["s_dw"], g[0], res["s_gate_partial"],
            L, H, H2, NH2, DH2, 1.0 / math.sqrt(DH2),
            LP=LP, HP=HP, H2P=_p2(H2), DH2P=_p2(DH2), HAS_MASK=has_mask, PREC=prec, num_warps=nw,
        )
    _bwd_msa1_kernel[(B,)](
        dy, dy.stride(0), dy.stride(1), dy.stride(2), dx, mask, down_weight, in_w, in_b, out_w, out_b, gate,
        hpre, g[0], du, dqkv[0], o[0], z0, dpre,
        L, D, H, NH, DH, scale,
        LP=LP, HP=HP, DHP=DHP, BD=BD, HAS_MASK=has_mask, FUSE_DX=fuse_dx, PREC=prec, num_warps=nw,
    )
    return res


# ----------------------------------------------------------------------------------------------------
# long sequences: blocked attention backward + plain GEMMs / element-wise maths
# ----------------------------------------------------------------------------------------------------
LONG_LP = 128  # padded L above which the backward takes the blocked path (the per-sequence kernels need
#                > 227 KB of shared memory at LP = 256 on sm_90: (L, L) tiles transposed through shared memory)
LONG_BQ = 64
LONG_BK = 64
_SQRT1_2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


def _gelu_f32(x):
    return 0.5 * x * (1.0 + torch.erf(x * _SQRT1_2))


def _gelu_grad_f32(x):
    return 0.5 * (1.0 + torch.erf(x * _SQRT1_2)) + x * torch.exp(-0.5 * x * x) * _INV_SQRT_2PI


def attention_backward_blocked(qkv, do, heads, mask_u8, dqkv, o, prec):
    """Blocked multi-head attention backward of one batch of sequences (any L, no (L, L) tile on chip).

    ``qkv (B, L, 3H)`` = ``[q | k | v]`` (the in-projection of the attention input), ``do (B, L, H)`` the
    gradient of the concatenated head outputs; writes ``dqkv (B, L, 3H)`` and the head outputs ``o (B, L, H)``
    (all contiguous, one dtype). Two launches: query blocks (``o``, ``lse``, ``delta``, ``dq``), then key
    blocks (``dk``, ``dv``); deterministic, no atomics.
    """
    B, L, H3 = qkv.shape
    H = H3 // 3
    NH = int(heads)
    DH = H // NH
    stats = torch.empty((B, NH, 2, L), device=qkv.device, dtype=torch.float32)
    mask = mask_u8 if mask_u8 is not None else stats
    common = dict(BQ=LONG_BQ, BK=LONG_BK, DHP=_p2(DH), HAS_MASK=mask_u8 is not None, PREC=prec, num_warps=4)
    scale = 1.0 / math.sqrt(DH)
    _attn_bwd_dq_kernel[(B * NH, triton.cdiv(L, LONG_BQ))](
        qkv, do, mask, dqkv, o, stats, L, H, NH, DH, scale, **common)
    _attn_bwd_dkdv_kernel[(B * NH, triton.cdiv(L, LONG_BK))](
        qkv, do, mask, dqkv, stats, L, H, NH, DH, scale, **common)


def _msa_backward_long(z, g, in_w, in_b, out_w, out_b, heads, mask_u8, dqkv, o, prec, need_out):
    """Backward of ``out = MSA(z)`` (``z``, ``g = d out`` ``(B, L, H)`` in the compute dtype): returns ``dz``
    (and ``out`` when ``need_out``) as ``(B·L, H)``; fills ``dqkv``/``o`` for the weight gradients."""
    B, L, H = z.shape
    z2d = z.reshape(B * L, H)
    qkv = torch.addmm(in_b, z2d, in_w.t()).reshape(B, L, 3 * H)
    do = g.reshape(B * L, H).mm(out_w).reshape(B, L, H)
    attention_backward_blocked(qkv, do, heads, mask_u8, dqkv, o, prec)
    dz = dqkv.reshape(B * L, 3 * H).mm(in_w)
    out = torch.addmm(out_b, o.reshape(B * L, H), out_w.t()) if need_out else None
    return dz, out


def _mga_backward_long(dy, res, du_buf, down_weight, up_weight, in_w, in_b, out_w, out_b, gate, heads, hpre, z2,
                       share, mask_u8, prec):
    """The three backward stages of :func:`mga_backward` for long sequences: the attention parts by
    :func:`attention_backward_blocked`, the projections as GEMMs in the compute dtype (fp32 accumulation),
    the element-wise maths in fp32 (stored in the compute dtype like the per-sequence kernels)."""
    B, L, D = dy.shape
    H = down_weight.shape[0]
    cdt = down_weight.dtype
    f32 = torch.float32
    BL = B * L
    dqkv, o, g = res["dqkv"], res["o"], res["g"]
    a = torch.sigmoid(gate.to(f32).reshape(()))
    # stage 2 (second MSA call): du = dy Wu, g2 = (1 - a) du
    du = du_buf.view(BL, H)
    torch.mm(dy.reshape(BL, D).to(cdt), up_weight, out=du)
    duf = du.to(f32)
    g[1].view(BL, H).copy_((1.0 - a) * duf)
    dz2, z3 = _msa_backward_long(z2, g[1], in_w, in_b, out_w, out_b, heads, mask_u8, dqkv[1], o[1], prec, True)
    hf = hpre.reshape(BL, H).to(f32)
    z0f = _gelu_f32(hf)
    z3f = z3.to(f32)
    res["u"].view(BL, H).copy_(a * z0f + (1.0 - a) * z3f)
    res["gate_partial"].copy_((duf * (z0f - z3f)).view(B, L * H).sum(1) * (a * (1.0 - a)))
    if share is not None:
        sdw, _sdb, suw, _sub, siw, sib, sow, sob, sgate, sheads = share
        H2 = sdw.shape[0]
        res["s_dz2"].view(BL, H).copy_(dz2)
        a_s = torch.sigmoid(sgate.to(f32).reshape(()))
        dvf = dz2.mm(suw).to(f32)  # (BL, H2)
        res["s_g"].view(BL, H2).copy_(a_s * dvf)
        ws = res["s_w"]
        dwa, ms = _msa_backward_long(ws, res["s_g"], siw, sib, sow, sob, sheads, mask_u8, res["s_dqkv"],
                                     res["s_o"], prec, True)
        wsf, msf = ws.reshape(BL, H2).to(f32), ms.to(f32)
        dw = res["s_dw"].view(BL, H2)
        dw.copy_(dwa.to(f32) + (1.0 - a_s) * dvf)
        res["s_vs"].view(BL, H2).copy_(a_s * msf + (1.0 - a_s) * wsf)
        res["s_gate_partial"].copy_((dvf * (msf - wsf)).view(B, L * H2).sum(1) * (a_s * (1.0 - a_s)))
        g[0].view(BL, H).copy_(dz2.to(f32) + dw.mm(sdw).to(f32))  # dz1
    else:
        g[0].view(BL, H).copy_(dz2)
    # stage 1 (first MSA call)
    z0 = res["z0"]
    z0.view(BL, H).copy_(z0f)
    dza, _ = _msa_backward_long(z0, g[0], in_w, in_b, out_w, out_b, heads, mask_u8, dqkv[0], o[0], prec, False)
    dpre = res["dpre"].view(BL, H)
    dpre.copy_((dza.to(f32) + a * duf) * _gelu_grad_f32(hf))
    t = dpre.mm(down_weight).reshape(B, L, D).to(res["dx"].dtype)
    torch.add(dy, t, out=res["dx"])
