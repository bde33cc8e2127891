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
Written for triton >= 3.0 (GPU machines have 3.6, CI's interpreter 3.8).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._common import gelu, gelu_grad

SCALE_EPS = 1e-8

# weight tile modes
FLOAT = 0  # float master weight, fake-quantised in registers
INT8 = 1  # int8 codes
INT4 = 2  # two int4 codes per uint8


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
    if W_MODE == 0:
        w = tl.load(W + n2 * stride_wn + k2 * stride_wk, mask=mask, other=0.0).to(tl.float32)
        q = round_half_even(tl.math.div_rn(w, s2))
        q = tl.minimum(tl.maximum(q, -QMAX - 1.0), QMAX * 1.0)
    elif W_MODE == 1:
        q = tl.load(W + n2 * stride_wn + k2 * stride_wk, mask=mask, other=0).to(tl.float32)
    else:
        byte = tl.load(W + n2 * stride_wn + (k2 // 2) * stride_wk, mask=mask, other=0).to(tl.int32)
        nib = (byte >> ((k2 % 2) * 4)) & 15
        q = (nib - ((nib >> 3) << 4)).to(tl.float32)
    return q * s2


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    """``acc + a @ b``; ``PRECISION="upcast"`` multiplies in float32 (the interpreter's bfloat16 dot is broken
    in triton 3.8: it returns garbage; bfloat16 products are exact in float32, so this is the same maths)."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _row_scale_kernel(W, S, N, K, stride_wn, stride_wk, QMAX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    amax = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        m = nmask[:, None] & (offs_k[None, :] < K)
        w = tl.load(W + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk, mask=m, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(w))
    s = tl.math.div_rn(tl.max(amax, axis=1), tl.full([BLOCK_N], QMAX, tl.float32))
    s = tl.maximum(s, 1e-8)
    tl.store(S + offs_n, s, mask=nmask)


@triton.jit
def _weight_kernel(W, S, Q, N, K, stride_wn, stride_wk, stride_qn, W_MODE: tl.constexpr, QMAX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``Q[n, k] = q * s`` in Q's dtype (for small weights only)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    nmask = offs_n < N
    mask = nmask[:, None] & (offs_k[None, :] < K)
    s = tl.load(S + offs_n, mask=nmask, other=1.0)
    wq = _weight_tile(W, offs_n[:, None], offs_k[None, :], mask, s[:, None], stride_wn, stride_wk, W_MODE, QMAX)
    tl.store(Q + offs_n[:, None] * stride_qn + offs_k[None, :], wq.to(Q.dtype.element_ty), mask=mask)


@triton.jit
def _quantize_rows_kernel(W, Q, S, N, K, stride_wn, stride_wk, stride_qn, QMAX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Scales and ``Wq = q * s`` of ``BLOCK_N`` whole rows in one program (two passes over each row)."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    amax = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        m = nmask[:, None] & (offs_k[None, :] < K)
        w = tl.load(W + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk, mask=m, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(w))
    s = tl.math.div_rn(tl.max(amax, axis=1), tl.full([BLOCK_N], QMAX, tl.float32))
    s = tl.maximum(s, 1e-8)
    tl.store(S + offs_n, s, mask=nmask)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        m = nmask[:, None] & (offs_k[None, :] < K)
        wq = _weight_tile(W, offs_n[:, None], offs_k[None, :], m, s[:, None], stride_wn, stride_wk, 0, QMAX)
        tl.store(Q + offs_n[:, None] * stride_qn + offs_k[None, :], wq.to(Q.dtype.element_ty), mask=m)


@triton.jit
def _fwd_kernel(
    X, W, S, B, Y, PRE,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym,
    W_MODE: tl.constexpr, QMAX: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, SAVE_PRE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
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
        acc = _dot(x, wt.to(x.dtype), acc, PRECISION)
    if HAS_BIAS:
        acc += tl.load(B + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    omask = mmask[:, None] & nmask[None, :]
    optr = offs_m[:, None] * stride_ym + offs_n[None, :]
    if SAVE_PRE:
        tl.store(PRE + optr, acc.to(PRE.dtype.element_ty), mask=omask)
    if GELU:
        acc = gelu(acc)
    tl.store(Y + optr, acc.to(Y.dtype.element_ty), mask=omask)


@triton.jit
def _bwd_dx_kernel(
    DY, PRE, W, S, DX, DPRE,
    M, N, K,
    stride_dym, stride_wn, stride_wk, stride_dxm,
    QMAX: tl.constexpr, GELU: tl.constexpr, WRITE_DPRE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``DX (M, K) = dPre (M, N) @ Wq (N, K)``, looping over N; ``dPre = DY * GELU'(PRE)`` if GELU."""
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
            g = (g.to(tl.float32) * gelu_grad(pre)).to(DY.dtype.element_ty)
            if WRITE_DPRE:
                tl.store(DPRE + gptr, g, mask=gmask & (pid_k == 0))
        s = tl.load(S + offs_n, mask=nmask, other=1.0)
        w = _weight_tile(W, offs_n[:, None], offs_k[None, :], nmask[:, None] & kmask[None, :], s[:, None], stride_wn, stride_wk, 0, QMAX)
        acc = _dot(g, w.to(g.dtype), acc, PRECISION)
    tl.store(DX + offs_m[:, None] * stride_dxm + offs_k[None, :], acc.to(DX.dtype.element_ty), mask=mmask[:, None] & kmask[None, :])


@triton.jit
def _bwd_dw_kernel(
    G, X, DW, DB,
    M, N, K, ROWS_PER_SPLIT,
    stride_gm, stride_xm, stride_xk, stride_dws, stride_dwn, stride_dbs,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``DW[split] (N, K) = Gᵀ X`` and ``DB[split] (N,) = Σ G`` over this split's rows (float32)."""
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
        acc = _dot(gt, x.to(gt.dtype), acc, PRECISION)
        if HAS_BIAS:
            bacc += tl.sum(gt.to(tl.float32), axis=1)
    tl.store(DW + pid_s * stride_dws + offs_n[:, None] * stride_dwn + offs_k[None, :], acc, mask=nmask[:, None] & kmask[None, :])
    if HAS_BIAS:
        tl.store(DB + pid_s * stride_dbs + offs_n, bacc, mask=nmask & (pid_k == 0))


# ----------------------------------------------------------------------------- launchers


def qmax_of(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 2..8, got {bits!r}")
    return 2 ** (bits - 1) - 1


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _precision(dtype: torch.dtype) -> str:
    """float32 activations get full IEEE float32 dots unless the user allowed TF32 for float32 matmuls
    (``torch.set_float32_matmul_precision``), as eager ``F.linear`` does (same policy as ``kernels/mufa.py``);
    bfloat16 under the interpreter is multiplied in float32 (see ``_dot``)."""
    if dtype == torch.float32:
        return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "upcast"
    return "tf32"


def _check_2d(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")


def row_scales(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-row scales ``s (out,)`` float32 of a float weight ``(out, in)``."""
    _check_2d("weight", weight)
    qmax = qmax_of(bits)
    n, k = weight.shape
    s = torch.empty(n, device=weight.device, dtype=torch.float32)
    if n == 0:
        return s
    bn = _pow2(n, 1, 16)
    bk = _pow2(k, 16, 256)
    _row_scale_kernel[(triton.cdiv(n, bn),)](weight, s, n, k, weight.stride(0), weight.stride(1), QMAX=qmax, BLOCK_N=bn, BLOCK_K=bk)
    return s


def weight_values(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, bits: int = 8, mode: int = FLOAT, in_features: int | None = None) -> torch.Tensor:
    """Materialise ``q * s`` as an ``(out, in)`` tensor of ``dtype`` (small weights only).

    ``mode=FLOAT``: fake-quantise the float ``weight`` with ``bits``; ``INT8``/``INT4``: dequantise packed codes.
    """
    _check_2d("weight", weight)
    n = weight.shape[0]
    k = in_features if in_features is not None else weight.shape[1]
    qmax = qmax_of(bits) if mode == FLOAT else 127
    out = torch.empty(n, k, device=weight.device, dtype=dtype)
    if out.numel() == 0:
        return out
    bn, bk = _pow2(n, 16, 64), _pow2(k, 16, 128)
    _weight_kernel[(triton.cdiv(n, bn), triton.cdiv(k, bk))](
        weight, scale, out, n, k, weight.stride(0), weight.stride(1), out.stride(0),
        W_MODE=mode, QMAX=qmax, BLOCK_N=bn, BLOCK_K=bk,
    )
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
    bn, bk = _pow2(n, 1, 16), _pow2(k, 16, 256)
    _quantize_rows_kernel[(triton.cdiv(n, bn),)](
        weight, out, s, n, k, weight.stride(0), weight.stride(1), out.stride(0), QMAX=qmax, BLOCK_N=bn, BLOCK_K=bk,
    )
    return out, s


def _fwd_blocks(m: int, n: int, k: int) -> tuple[int, int, int, int]:
    bm = 128 if m >= 128 else _pow2(m, 16, 128)
    bn = _pow2(n, 16, 128)
    bk = _pow2(k, 16, 64)
    num_warps = 8 if bm * bn >= 128 * 128 else 4
    return bm, bn, bk, num_warps


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
    qmax = qmax_of(bits) if mode == FLOAT else 127
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
    bm, bn, bk, nw = _fwd_blocks(m, n, k)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _fwd_kernel[grid](
        x, weight, scale, bias if bias is not None else scale, y, pre if save_pre else y,
        m, n, k,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), y.stride(0),
        W_MODE=mode, QMAX=qmax, HAS_BIAS=bias is not None, GELU=bool(gelu), SAVE_PRE=bool(save_pre),
        PRECISION=_precision(x.dtype),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=nw, num_stages=3,
    )
    return y, pre


def _dw_split(m: int, tiles: int, bm: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = triton.cdiv(2 * sms, tiles)
    return max(1, min(want, triton.cdiv(m, 4 * bm)))


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
    dx = dw = db = None
    g = dy
    write_dpre = gelu and (needs_dw or needs_db)
    if needs_dx or write_dpre:
        # when only dPre is needed (no dx), one column block of programs runs and writes it
        dpre = torch.empty_like(dy) if write_dpre else None
        dx_t = torch.empty(m, k if needs_dx else 1, device=dy.device, dtype=dy.dtype)
        bm = 128 if m >= 128 else _pow2(m, 16, 128)
        bk = _pow2(k, 16, 128)
        bn = _pow2(n, 16, 64)
        grid = (triton.cdiv(m, bm), triton.cdiv(k, bk) if needs_dx else 1)
        _bwd_dx_kernel[grid](
            dy, pre if gelu else dy, weight, scale, dx_t, dpre if write_dpre else dy,
            m, n, k if needs_dx else 1,
            dy.stride(0), weight.stride(0), weight.stride(1), dx_t.stride(0),
            QMAX=qmax, GELU=bool(gelu), WRITE_DPRE=write_dpre, PRECISION=_precision(dy.dtype),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=8 if bm * bk >= 128 * 128 else 4,
            # fp32 tiles: 3 stages need 262656 B of shared memory at 1024->256 with GELU (> sm_90's 232448 B,
            # OutOfResources at launch; benchmarks/aot_compile.py); 2 stages need 164096 B
            num_stages=2 if dy.dtype == torch.float32 else 3,
        )
        if needs_dx:
            dx = dx_t
        if write_dpre:
            g = dpre
    if needs_dw or needs_db:
        bn = _pow2(n, 16, 128)
        bk = _pow2(k, 16, 128)
        bm = 64
        tiles = triton.cdiv(n, bn) * triton.cdiv(k, bk)
        nsplit = split if split is not None else _dw_split(m, tiles, bm, dy.device)
        nsplit = max(1, min(int(nsplit), triton.cdiv(m, bm)))
        rows = triton.cdiv(triton.cdiv(m, nsplit), bm) * bm
        nsplit = triton.cdiv(m, rows)
        dwp = torch.empty(nsplit, n, k, device=dy.device, dtype=torch.float32)
        dbp = torch.empty(nsplit, n, device=dy.device, dtype=torch.float32)
        grid = (triton.cdiv(n, bn), triton.cdiv(k, bk), nsplit)
        _bwd_dw_kernel[grid](
            g, x, dwp, dbp,
            m, n, k, rows,
            g.stride(0), x.stride(0), x.stride(1), dwp.stride(0), dwp.stride(1), dbp.stride(0),
            HAS_BIAS=needs_db, PRECISION=_precision(g.dtype),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=8 if bn * bk >= 128 * 128 else 4, num_stages=3,
        )
        if needs_dw:
            dw = (dwp[0] if nsplit == 1 else dwp.sum(0)).to(weight.dtype)
        if needs_db:
            db = dbp[0] if nsplit == 1 else dbp.sum(0)
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
