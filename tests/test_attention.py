"""The blocked (flash-style) attention kernels of ``kernels/attention.py`` on their own, against
``F.scaled_dot_product_attention``.

Forward (head outputs ``o``) and backward (``dqkv``) through the launchers, with and without a key padding mask,
at odd lengths (77: a ragged second block; 13: one block larger than L), head dims 4/12/16/64 (12: padded to 16),
in fp32, fp16 and bf16. The rule is ``rspeft_fast.testing.assert_fused_close``: the kernels' error against a
float64 SDPA on the same rounded inputs at most 2x eager SDPA's error in the same dtype (+ 4 ulps).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rspeft_fast.kernels import _launch
from rspeft_fast.kernels import attention as A
from rspeft_fast.testing import assert_fused_close, run_fwd_bwd

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


class _Attention(torch.autograd.Function):
    """The launchers as one differentiable function of ``qkv (B, L, 3H)`` → ``o (B, L, H)`` (test harness)."""

    @staticmethod
    def forward(ctx, qkv, heads, mask_u8):
        B, L, H3 = qkv.shape
        plan = A.plan_attention(L, H3 // 3 // heads, qkv.dtype, _launch.device_props(qkv.device))
        prec = _launch.precision(qkv.dtype)
        o = qkv.new_empty((B, L, H3 // 3))
        lse = qkv.new_empty((B, heads, L), dtype=torch.float32)
        A.attention_forward(qkv, heads, mask_u8, o, lse, plan, prec)
        ctx.save_for_backward(qkv, o, lse, mask_u8)
        ctx.heads, ctx.plan, ctx.prec = heads, plan, prec
        return o

    @staticmethod
    def backward(ctx, do):
        qkv, o, lse, mask_u8 = ctx.saved_tensors
        dqkv = torch.empty_like(qkv)
        A.attention_backward(qkv, do.contiguous(), o, lse, ctx.heads, mask_u8, dqkv, ctx.plan, ctx.prec)
        return dqkv, None, None


def _fused(heads, mask):
    mask_u8 = None if mask is None else mask.to(torch.uint8).contiguous()
    return lambda qkv: _Attention.apply(qkv, heads, mask_u8)


def _sdpa(heads, mask):
    """``nn.MultiheadAttention``'s attention of the in-projected ``qkv`` by SDPA (mask True = padded key)."""

    def f(qkv):
        B, L, H3 = qkv.shape
        q, k, v = qkv.view(B, L, 3, heads, H3 // 3 // heads).permute(2, 0, 3, 1, 4)
        keep = None if mask is None else ~mask[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2).reshape(B, L, H3 // 3)

    return f


CASES = [  # (B, L, hidden, heads, mask)
    pytest.param(2, 77, 48, 4, True, id="L77-dh12-mask"),
    pytest.param(3, 13, 32, 2, True, id="L13-dh16-mask"),
    pytest.param(1, 77, 64, 1, False, id="L77-dh64"),
    pytest.param(2, 13, 16, 4, False, id="L13-dh4"),
]


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("B,L,hidden,heads,use_mask", CASES)
def test_attention_matches_sdpa(device, B, L, hidden, heads, use_mask, dtype):
    qkv = torch.randn(B, L, 3 * hidden, device=device).to(dtype)
    mask = None
    if use_mask:  # a few padded keys per sequence, never all of them (a fully padded query row is NaN)
        mask = torch.zeros(B, L, dtype=torch.bool, device=device)
        for b in range(B):
            mask[b, L - 1 - 3 * b:] = True
    fused = run_fwd_bwd(_fused(heads, mask), qkv)
    eager = run_fwd_bwd(_sdpa(heads, mask), qkv)
    ref = run_fwd_bwd(_sdpa(heads, mask), qkv.double())
    assert_fused_close([fused[0], *fused[1]], [eager[0], *eager[1]], [ref[0], *ref[1]],
                       name=f"attention L={L} hidden={hidden}/{heads} {dtype}")


def test_plan_tiles():
    """64x64 blocks where they fit, never above the padded L, shrunk for fp32 head dim 128 on a 99 KB device,
    and every plan within the estimate's budget."""
    sm86, sm90 = _launch.ARCH_PROPS[86], _launch.ARCH_PROPS[90]
    assert A.plan_attention(577, 16, BF16, sm90).BQ == 64
    assert A.plan_attention(13, 16, BF16, sm90).BQ == 16
    a86 = A.plan_attention(577, 128, F32, sm86)
    assert (a86.BQ, a86.num_stages) != (64, 2)
    for props in _launch.ARCH_PROPS.values():
        for dt in (F32, F16, BF16):
            for dh in (4, 12, 64, 128):
                p = A.plan_attention(577, dh, dt, props)
                assert p is not None
                nb = _launch.operand_bytes(dt, props)
                assert A.attn_smem(p.BQ, p.BK, p.DHP, nb, p.num_stages) <= props.smem_per_block


def test_launch_constants_do_not_depend_on_batch(monkeypatch):
    """One compilation per shape: the kernels' non-tensor arguments (and grid-independent constants) are the
    same at every batch size."""
    log = {}

    class Rec:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def launch(*a, **k):
                log.setdefault(self.name, set()).add(tuple(sorted((n, v) for n, v in k.items()
                                                                  if not isinstance(v, torch.Tensor))))
            return launch

    for name in ("_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel"):
        monkeypatch.setattr(A, name, Rec(name))
    for b in (1, 3, 40):
        qkv = torch.randn(b, 200, 96)
        o, lse = torch.empty(b, 200, 32), torch.empty(b, 4, 200)
        plan = A.plan_attention(200, 8, F32, _launch.ARCH_PROPS[90])
        A.attention_forward(qkv, 4, None, o, lse, plan, "ieee")
        A.attention_backward(qkv, o, o, lse, 4, None, torch.empty_like(qkv), plan, "ieee")
    assert set(log) == {"_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel"}
    assert all(len(v) == 1 for v in log.values()), log
