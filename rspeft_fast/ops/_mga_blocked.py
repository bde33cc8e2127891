"""The blocked path of the MGA op (any L, hidden of any size): torch composition around the attention kernels.

``rspeft_fast.ops.mga`` runs a layer here when ``kernels.mga.plan_mga`` says the per-sequence kernels do not
fit it (long sequences, wide hidden, shared memory). The projections are GEMMs over all ``B·L`` rows (cuBLAS /
the CPU GEMM: compute dtype, fp32 accumulation) written straight into the saved buffers, the element-wise gate
maths is torch, and the attention of each MSA call is ``kernels/attention.py`` (flash-style, ``o`` and ``lse``
saved by the forward and reused by the backward). Same buffers (``kernels.mga.saved_buffers`` /
``grad_buffers``) and the same results within rounding as the per-sequence kernels; deterministic.
"""
from __future__ import annotations

import torch

from ..kernels.attention import attention_backward, attention_forward
from ..kernels.mga import MGAGrads, MGAPlan, MGASaved, grad_buffers, plan_for, saved_buffers
from ..kernels._launch import precision

_SQRT1_2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


def _gelu_f32(x):
    return 0.5 * x * (1.0 + torch.erf(x * _SQRT1_2))


def _gelu_grad_f32(x):
    return 0.5 * (1.0 + torch.erf(x * _SQRT1_2)) + x * torch.exp(-0.5 * x * x) * _INV_SQRT_2PI


def _gemm(a, w, b, out=None):
    """``a (N, K) @ wᵀ + b`` in the compute dtype (fp32 accumulation: cuBLAS / the CPU GEMM)."""
    return torch.addmm(b, a, w.t(), out=out)


def _msa_fwd(z, B, L, in_w, in_b, out_w, out_b, heads, mask_u8, o, lse, plan, prec, out=None):
    """``MSA(z)`` for ``z (B·L, H)``: in-projection GEMM, blocked attention (fills ``o (B, L, H)``,
    ``lse``), out-projection GEMM → ``(B·L, H)`` (into ``out`` if given)."""
    H = z.shape[1]
    qkv = _gemm(z, in_w, in_b).view(B, L, 3 * H)
    attention_forward(qkv, heads, mask_u8, o, lse, plan, prec)
    return _gemm(o.view(B * L, H), out_w, out_b, out=out)


def _msa_bwd(z, g, o, lse, in_w, in_b, out_w, heads, mask_u8, dqkv, plan, prec):
    """Backward of ``MSA(z)``: ``z, g`` ``(B, L, H)`` (input, grad of the output), the forward's
    ``o (B, L, H)`` / ``lse``; fills ``dqkv (B, L, 3H)``, returns ``dz (B·L, H)``."""
    B, L, H = z.shape
    qkv = _gemm(z.reshape(B * L, H), in_w, in_b).view(B, L, 3 * H)  # recomputed (cheaper than saving 3H)
    do = g.reshape(B * L, H).mm(out_w).view(B, L, H)
    attention_backward(qkv, do, o, lse, heads, mask_u8, dqkv, plan, prec)
    return dqkv.view(B * L, 3 * H).mm(in_w)


def _up_operands(scratch, BL, H, D, up_weight, up_bias, like):
    """The operands of the up projection as one GEMM: ``u (BL, H + 8)`` (column H = 1, the pad zero) and
    ``w (H + 8, D)`` (``Wuᵀ``, then ``bu`` as row H, the pad zero). With a ``scratch`` dict (the eager hot path's
    plan) both are made once and kept: ``u``'s constant columns stay, ``w`` is refilled only when the weights
    changed (storage or ``_version``); without one (the custom op) they are fresh."""
    dev, cdt = like.device, like.dtype
    if scratch is None:
        u = torch.zeros((BL, H + 8), device=dev, dtype=cdt)
        u[:, H] = 1.0
        w = torch.zeros((H + 8, D), device=dev, dtype=cdt)
        w[:H] = up_weight.t()
        w[H] = up_bias
        return u, w
    u = scratch.get("u")
    if u is None:
        u = scratch["u"] = torch.zeros((BL, H + 8), device=dev, dtype=cdt)
        u[:, H] = 1.0
        scratch["w"] = torch.zeros((H + 8, D), device=dev, dtype=cdt)
    w = scratch["w"]
    tag = (up_weight.data_ptr(), up_weight._version, up_bias.data_ptr(), up_bias._version)
    if scratch.get("w_of") != tag:
        w[:H] = up_weight.t()
        w[H] = up_bias
        scratch["w_of"] = tag
    return u, w


def mga_forward_blocked(x, down_weight, down_bias, up_weight, up_bias, in_w, in_b, out_w, out_b, gate, heads,
                        share=None, mask_u8=None, save=False, plan: MGAPlan | None = None, scratch: dict | None = None,
                        none=None):
    """The forward on the blocked path, arguments and result as ``kernels.mga.mga_forward``'s (``share`` a
    ``kernels.mga.ShareWeights`` or None): projections as
    GEMMs over the B·L rows written straight into the saved buffers, one element-wise kernel per gate
    (``lerp`` in the compute dtype with fp32 internals and one rounding, as eager's ``a*m + (1-a)*z`` whose 0-dim
    fp32 gate is taken in the tensor dtype), attention by :func:`attention_forward`, and up projection + bias +
    residual in one GEMM (x read once, y written once) when x is in the compute dtype. ``scratch``: a dict kept
    by the caller for one layer shape (the eager hot path's plan), where the GEMM's operands are kept; the
    caller guarantees one call at a time (the stream order of one device)."""
    B, L, D = x.shape
    H = down_weight.shape[0]
    cdt = down_weight.dtype
    plan = plan or plan_for(x.shape, H, heads, share, cdt, x.device, save)
    y = torch.empty((B, L, D), device=x.device, dtype=torch.promote_types(x.dtype, cdt))
    saved = saved_buffers(x, H, heads, share, cdt, True, save, none)
    if B == 0 or L == 0:
        return y, saved
    prec = precision(cdt)
    f32 = torch.float32
    BL = B * L
    x2 = x.reshape(BL, D)
    if save:
        o, lse = saved.o, saved.lse
    else:  # the attention still writes its head outputs and lse somewhere
        o, lse = x.new_empty((2, B, L, H), dtype=cdt), x.new_empty((2, B, int(heads), L), dtype=f32)
    hpre = _gemm(x2.to(cdt), down_weight, down_bias, out=saved.hpre.view(BL, H) if save else None)
    z0 = torch.nn.functional.gelu(hpre)
    keep_z1 = save and share is not None
    z1 = _msa_fwd(z0, B, L, in_w, in_b, out_w, out_b, heads, mask_u8, o[0], lse[0], plan.attn, prec,
                  out=(saved.z1 if keep_z1 else saved.z2).view(BL, H) if save else None)
    if share is not None:
        H2 = share.down_w.shape[0]
        ws = _gemm(z1, share.down_w, share.down_b, out=saved.ws.view(BL, H2) if save else None)
        if save:
            o_s, lse_s = saved.o_s, saved.lse_s
        else:
            o_s, lse_s = x.new_empty((B, L, H2), dtype=cdt), x.new_empty((B, int(share.heads), L), dtype=f32)
        ms = _msa_fwd(ws, B, L, share.in_w, share.in_b, share.out_w, share.out_b, share.heads, mask_u8, o_s, lse_s,
                      plan.attn_s, prec)
        a_s = torch.sigmoid(share.gate.to(f32).reshape(()))
        vs = torch.lerp(ws, ms, a_s.to(cdt))  # a_s·ms + (1 - a_s)·ws
        z2 = torch.add(z1, _gemm(vs, share.up_w, share.up_b), out=saved.z2.view(BL, H) if save else None)
    else:
        z2 = z1
    z3 = _msa_fwd(z2, B, L, in_w, in_b, out_w, out_b, heads, mask_u8, o[1], lse[1], plan.attn, prec)
    a = torch.sigmoid(gate.to(f32).reshape(())).to(cdt)
    if x2.dtype == cdt and y.dtype == cdt:
        # up projection, bias and residual in ONE GEMM that reads x once and writes y once: the bias rides as
        # row H of the weight against a column of ones in u (padded to H + 8 columns for aligned GEMM tiles)
        u, w = _up_operands(scratch, BL, H, D, up_weight, up_bias, z3)
        torch.lerp(z3, z0, a, out=u[:, :H])  # a·z0 + (1 - a)·z3
        torch.addmm(x2, u, w, out=y.view(BL, D))
    else:  # x in another dtype (autocast: fp32 x, 16-bit compute): y = x + (u Wuᵀ + bu) as eager rounds it
        torch.add(x2, _gemm(torch.lerp(z3, z0, a), up_weight, up_bias), out=y.view(BL, D))
    return y, saved


def mga_backward_blocked(dy, x_dtype, down_weight, up_weight, in_w, in_b, out_w, out_b, gate, heads,
                         saved: MGASaved, share=None, mask_u8=None, plan: MGAPlan | None = None) -> MGAGrads:
    """The backward on the blocked path (after :func:`mga_forward_blocked` with ``save``), arguments and result
    as ``kernels.mga.mga_backward``'s: attention by :func:`attention_backward` with the forward's ``o``/``lse``,
    projections as GEMMs in the compute dtype (fp32 accumulation), element-wise maths in fp32 (stored in the
    compute dtype like the per-sequence kernels)."""
    B, L, D = dy.shape
    H = down_weight.shape[0]
    cdt = down_weight.dtype
    r = grad_buffers(dy, x_dtype, H, share, cdt, saved)
    if B == 0 or L == 0:
        return r
    plan = plan or plan_for(dy.shape, H, heads, share, cdt, dy.device, True)
    prec = precision(cdt)
    f32 = torch.float32
    BL = B * L
    a = torch.sigmoid(gate.to(f32).reshape(()))
    # MSA call 2: du = dy Wu, g2 = (1 - a) du
    du = dy.reshape(BL, D).to(cdt).mm(up_weight)
    duf = du.to(f32)
    r.g[1].view(BL, H).copy_((1.0 - a) * duf)
    dz2 = _msa_bwd(saved.z2, r.g[1], saved.o[1], saved.lse[1], in_w, in_b, out_w, heads, mask_u8, r.dqkv[1],
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
        dwa = _msa_bwd(saved.ws, s.g, saved.o_s, saved.lse_s, share.in_w, share.in_b, share.out_w, share.heads,
                       mask_u8, s.dqkv, plan.attn_s, prec)
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
    dza = _msa_bwd(r.z0, r.g[0], saved.o[0], saved.lse[0], in_w, in_b, out_w, heads, mask_u8, r.dqkv[0],
                   plan.attn, prec)
    dpre = r.dpre.view(BL, H)
    dpre.copy_((dza.to(f32) + a * duf) * _gelu_grad_f32(hf))
    t = dpre.mm(down_weight).reshape(B, L, D).to(r.dx.dtype)
    torch.add(dy, t, out=r.dx)
    return r
