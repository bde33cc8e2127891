"""Fused Triton MGAdapter (+ BiShare): forward and every gradient against the eager reference (autograd).

On CPU the kernels run through Triton's interpreter (float32, small shapes); ``@pytest.mark.gpu`` tests
check bf16/fp16 at the SPEC shapes against a float32 reference.
"""
from __future__ import annotations

import pytest
import torch

from rspeft_fast.modules.mga import BiShareAdapter, MGAdapter
from rspeft_fast.ops.mga import mga
from rspeft_fast.reference.mga import mga_ref
from rspeft_fast.testing import assert_close, rel_err


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------
def _randomise(mod: torch.nn.Module, gate: float) -> None:
    """Non-trivial parameters: up weights/biases (zero-initialised in the modules), biases, gates."""
    with torch.no_grad():
        mod.up.weight.normal_(0.0, 0.3)
        mod.up.bias.normal_(0.0, 0.1)
        mod.down.bias.normal_(0.0, 0.1)
        mod.attn.in_proj_bias.normal_(0.0, 0.1)
        mod.attn.out_proj.bias.normal_(0.0, 0.1)
        mod.gate.fill_(gate)


def _make(dim, hidden, heads, share_heads=None, device="cpu", dtype=torch.float32):
    share = BiShareAdapter(hidden, share_heads) if share_heads else None
    m = MGAdapter(dim, hidden, heads, share=share, impl="triton")
    _randomise(m, -0.4)
    if share is not None:
        _randomise(share, 0.25)
    return m.to(device=device, dtype=dtype)


def _args(m: MGAdapter):
    attn = {
        "in_proj_weight": m.attn.in_proj_weight,
        "in_proj_bias": m.attn.in_proj_bias,
        "out_proj_weight": m.attn.out_proj.weight,
        "out_proj_bias": m.attn.out_proj.bias,
    }
    return (m.down.weight, m.down.bias, m.up.weight, m.up.bias, attn, m.gate, m.heads)


def _run(fn, m, x, mask, dy):
    """y and the gradients of x and of every parameter of ``m`` (BiShare included) for loss <y, dy>."""
    m.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    share = m.share.tensors() if m.share is not None else None
    y = fn(x, *_args(m), share=share, key_padding_mask=mask)
    y.backward(dy)
    grads = {"x": x.grad}
    grads.update({n: p.grad for n, p in m.named_parameters()})
    return y.detach(), grads


def _fp32_tol(expected: torch.Tensor):
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    return 2e-5 * (1.0 + scale), 2e-4


def _compare_fp32(m, x, mask=None):
    dy = torch.randn(x.shape, dtype=torch.float32, device=x.device)
    y, g = _run(mga, m, x, mask, dy)
    yr, gr = _run(mga_ref, m, x, mask, dy)
    assert_close(y, yr, *_fp32_tol(yr), name="y")
    assert set(g) == set(gr)
    for n in gr:
        assert gr[n] is not None, n
        assert g[n] is not None, f"no gradient for {n}"
        assert_close(g[n], gr[n], *_fp32_tol(gr[n]), name=f"grad {n}")
    return g


def _padding_mask(B, L, device="cpu"):
    lengths = torch.randint(1, L + 1, (B,))
    lengths[0] = L  # one full row
    if B > 1:
        lengths[1] = 1  # one row with a single valid key
    return torch.arange(L)[None, :] >= lengths[:, None].to(torch.arange(L).device)


# ----------------------------------------------------------------------------------------------------
# CPU (interpreter) float32 correctness
# ----------------------------------------------------------------------------------------------------
CASES = [
    # B, L, dim, hidden, heads, share_heads, mask
    pytest.param(3, 13, 48, 32, 4, None, False, id="L13-dh8"),
    pytest.param(2, 50, 96, 64, 4, None, True, id="L50-dh16-mask"),
    pytest.param(2, 77, 48, 64, 4, 2, True, id="L77-dh16-share-dh16-mask"),
    pytest.param(2, 13, 40, 32, 2, 2, False, id="L13-dh16-share-dh8"),
    pytest.param(1, 20, 32, 128, 2, 1, True, id="L20-dh64-share-dh64-mask"),
    pytest.param(2, 9, 33, 64, 2, None, False, id="L9-dh32-odd-dim"),
]


@pytest.mark.parametrize("B,L,dim,hidden,heads,share_heads,use_mask", CASES)
def test_forward_and_all_grads_fp32(device, B, L, dim, hidden, heads, share_heads, use_mask):
    m = _make(dim, hidden, heads, share_heads, device)
    x = torch.randn(B, L, dim, device=device)
    mask = _padding_mask(B, L).to(device) if use_mask else None
    _compare_fp32(m, x, mask)


# padded L > 128 (ViT-B/16's L = 197, the maximum 256): the backward takes the blocked attention path
LONG_CASES = [
    pytest.param(2, 197, 16, 16, 1, 1, True, id="L197-share-mask"),
    pytest.param(2, 197, 20, 16, 1, None, False, id="L197"),
    pytest.param(2, 256, 20, 16, 1, 1, False, id="L256-share"),
    pytest.param(2, 256, 20, 32, 2, None, True, id="L256-mask"),
]


def _spy_long_path(monkeypatch):
    """Counts the calls of the blocked attention backward (so a test knows which path ran)."""
    from rspeft_fast.kernels import mga as K

    calls = []
    real = K.attention_backward_blocked

    def spy(*a, **k):
        calls.append(a[0].shape)
        return real(*a, **k)

    monkeypatch.setattr(K, "attention_backward_blocked", spy)
    return calls


@pytest.mark.parametrize("B,L,dim,hidden,heads,share_heads,use_mask", LONG_CASES)
def test_long_sequence_forward_and_all_grads_fp32(device, monkeypatch, B, L, dim, hidden, heads, share_heads, use_mask):
    calls = _spy_long_path(monkeypatch)
    m = _make(dim, hidden, heads, share_heads, device)
    x = torch.randn(B, L, dim, device=device)
    mask = _padding_mask(B, L).to(device) if use_mask else None
    _compare_fp32(m, x, mask)
    assert len(calls) == (3 if share_heads else 2)  # MSA call 2, (BiShare MSA), MSA call 1


SHORT_AS_LONG = [
    pytest.param(2, 13, 48, 32, 4, None, True, id="L13-dh8-mask"),
    pytest.param(2, 77, 48, 64, 2, 2, True, id="L77-dh32-share-dh16-mask"),
    pytest.param(1, 20, 32, 128, 2, 1, False, id="L20-dh64-share-dh64"),
    pytest.param(3, 65, 33, 32, 2, None, False, id="L65-ragged-blocks"),
]


@pytest.mark.parametrize("B,L,dim,hidden,heads,share_heads,use_mask", SHORT_AS_LONG)
def test_blocked_backward_at_short_lengths(device, monkeypatch, B, L, dim, hidden, heads, share_heads, use_mask):
    """The blocked path forced at short L: every head dim, ragged last blocks, one and several blocks."""
    from rspeft_fast.kernels import mga as K

    monkeypatch.setattr(K, "LONG_LP", 0)
    calls = _spy_long_path(monkeypatch)
    m = _make(dim, hidden, heads, share_heads, device)
    x = torch.randn(B, L, dim, device=device)
    mask = _padding_mask(B, L).to(device) if use_mask else None
    _compare_fp32(m, x, mask)
    assert len(calls) == (3 if share_heads else 2)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_blocked_backward_fully_padded_row_nan_like_reference(device, monkeypatch):
    from rspeft_fast.kernels import mga as K

    monkeypatch.setattr(K, "LONG_LP", 0)
    m = _make(32, 32, 2, 2, device)
    x = torch.randn(2, 13, 32, device=device)
    mask = torch.zeros(2, 13, dtype=torch.bool, device=device)
    mask[1] = True
    dy = torch.randn_like(x)
    y, g = _run(mga, m, x, mask, dy)
    yr, gr = _run(mga_ref, m, x, mask, dy)
    assert torch.isnan(gr["x"][1]).all() and torch.isfinite(gr["x"][0]).all()
    assert torch.equal(torch.isnan(g["x"]), torch.isnan(gr["x"]))
    assert_close(g["x"][0], gr["x"][0], *_fp32_tol(gr["x"][0]), name="dx of the valid sequence")


def test_max_length_256_forward(device):
    m = _make(16, 16, 2, None, device)
    x = torch.randn(1, 256, 16, device=device)
    with torch.no_grad():
        assert_close(mga(x, *_args(m)), mga_ref(x, *_args(m)), *_fp32_tol(x), name="y L=256")


def test_non_contiguous_input(device):
    m = _make(48, 32, 4, 2, device)
    base = torch.randn(48, 13, 2, device=device)
    x = base.permute(2, 1, 0)  # (2, 13, 48), strides (1, 2, 26)
    assert not x.is_contiguous()
    mask = _padding_mask(2, 13).to(device)
    g = _compare_fp32(m, x, mask)
    assert g["x"].shape == x.shape


def test_module_matches_reference_and_shared_bishare(device):
    """Two adapters holding the same BiShareAdapter (text tower): module path, gradients accumulate."""
    share = BiShareAdapter(32, 2)
    _randomise(share, 0.1)
    mods = []
    for _ in range(2):
        m = MGAdapter(24, 32, 2, share=share, impl="triton")
        _randomise(m, 0.6)
        mods.append(m.to(device))
    x = torch.randn(2, 11, 24, device=device)
    mask = _padding_mask(2, 11).to(device)

    def run(impl):
        for m in mods:
            m.impl = impl
            m.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_(True)
        y = mods[1](mods[0](xx, mask), mask)
        y.square().sum().backward()
        return y.detach(), xx.grad, [p.grad.clone() for p in share.parameters()], [p.grad.clone() for p in mods[0].parameters() if p is not None]

    yt, gxt, gst, g0t = run("triton")
    yr, gxr, gsr, g0r = run("reference")
    assert_close(yt, yr, *_fp32_tol(yr), name="y")
    assert_close(gxt, gxr, *_fp32_tol(gxr), name="dx")
    for a, e in zip(gst + g0t, gsr + g0r):
        assert_close(a, e, *_fp32_tol(e), name="param grad")


def test_no_grad_forward_and_frozen_x(device):
    m = _make(48, 32, 4, 2, device)
    x = torch.randn(2, 13, 48, device=device)
    with torch.no_grad():
        y = mga(x, *_args(m), share=m.share.tensors())
        yr = mga_ref(x, *_args(m), share=m.share.tensors())
    assert_close(y, yr, *_fp32_tol(yr), name="y no_grad")
    # x without grad, parameters with grad
    m.zero_grad(set_to_none=True)
    mga(x, *_args(m), share=m.share.tensors()).sum().backward()
    gw = m.down.weight.grad.clone()
    m.zero_grad(set_to_none=True)
    mga_ref(x, *_args(m), share=m.share.tensors()).sum().backward()
    assert_close(gw, m.down.weight.grad, *_fp32_tol(gw), name="dWd")


def test_backward_is_deterministic(device):
    m = _make(48, 32, 4, 2, device)
    x = torch.randn(3, 13, 48, device=device)
    dy = torch.randn_like(x)
    _, g1 = _run(mga, m, x, None, dy)
    g1 = {k: v.clone() for k, v in g1.items()}
    _, g2 = _run(mga, m, x, None, dy)
    for k in g1:
        assert torch.equal(g1[k], g2[k]), k


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy warns about the NaN
def test_fully_padded_row_gives_nan_like_reference(device):
    """A sequence whose keys are all padded: softmax over only -inf is NaN in nn.MultiheadAttention /
    msa_ref; the fused op reproduces exactly that NaN pattern (documented), other sequences stay finite."""
    m = _make(32, 32, 2, None, device)
    x = torch.randn(2, 13, 32, device=device)
    mask = torch.zeros(2, 13, dtype=torch.bool, device=device)
    mask[1] = True
    with torch.no_grad():
        y = mga(x, *_args(m), key_padding_mask=mask)
        yr = mga_ref(x, *_args(m), key_padding_mask=mask)
    assert torch.isnan(yr[1]).all() and torch.isfinite(yr[0]).all()
    assert_close(y, yr, *_fp32_tol(yr[0]), name="y with a fully padded row")


def test_autocast_cpu_bf16(device):
    """Oracle: the reference under the same autocast (loose), and the float32 reference (the fused error may
    be at most 2x the error eager autocast itself makes, flash-attention's rule)."""
    if device != "cpu":
        pytest.skip("CPU autocast check (GPU dtypes are covered by the gpu tests)")
    m = _make(48, 64, 4, 4, device)
    x = torch.randn(2, 13, 48, device=device)
    dy = torch.randn_like(x)
    mask = _padding_mask(2, 13)
    y32, g32 = _run(mga_ref, m, x, mask, dy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, g = _run(mga, m, x, mask, dy)
        yr, gr = _run(mga_ref, m, x, mask, dy)
    assert y.dtype == yr.dtype == torch.float32
    assert rel_err(y, yr) < 1e-2, rel_err(y, yr)
    assert rel_err(y, y32) <= 2 * rel_err(yr, y32) + 1e-3
    for n in gr:
        assert g[n].dtype == gr[n].dtype, n
        if g[n].numel() > 1:  # the scalar gate gradients are sums with cancellation: fp32 rule only
            assert rel_err(g[n], gr[n]) < 3e-2, (n, rel_err(g[n], gr[n]))
        assert rel_err(g[n], g32[n]) <= 2 * rel_err(gr[n], g32[n]) + 2e-3, (n, rel_err(g[n], g32[n]), rel_err(gr[n], g32[n]))


def test_torch_compile_aot_eager_no_graph_break(device):
    m = _make(48, 32, 4, 2, device)
    x = torch.randn(2, 13, 48, device=device)
    mask = _padding_mask(2, 13).to(device)
    dy = torch.randn_like(x)
    share = m.share.tensors()

    def f(x, mask):
        return mga(x, *_args(m), share=share, key_padding_mask=mask)

    cf = torch.compile(f, backend="aot_eager", fullgraph=True)
    xc = x.clone().requires_grad_(True)
    yc = cf(xc, mask)
    yc.backward(dy)
    gc = {"x": xc.grad.clone(), **{n: p.grad.clone() for n, p in m.named_parameters()}}
    y, g = _run(lambda *a, **k: mga(*a, **k), m, x, mask, dy)
    assert_close(yc, y, *_fp32_tol(y), name="compiled y")
    for n in g:
        assert_close(gc[n], g[n], *_fp32_tol(g[n]), name=f"compiled grad {n}")


def test_opcheck(device):
    """torch.library.opcheck: schema, fake tensor impl and autograd registration of the forward op."""
    m = _make(16, 16, 2, None, device)
    x = torch.randn(1, 5, 16, device=device, requires_grad=True)
    w = [t.detach().clone().requires_grad_(True) for t in (m.down.weight, m.down.bias, m.up.weight, m.up.bias,
                                                          m.attn.in_proj_weight, m.attn.in_proj_bias,
                                                          m.attn.out_proj.weight, m.attn.out_proj.bias, m.gate)]
    args = (x, *w[:9], 2, *([None] * 9), 0, None, True)
    torch.library.opcheck(torch.ops.rspeft_fast.mga_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


# ----------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------
def test_errors(device):
    m = _make(32, 32, 4, None, device)
    x = torch.randn(2, 5, 32, device=device)
    with pytest.raises(ValueError, match="last dimension"):
        mga(torch.randn(2, 5, 31, device=device), *_args(m))
    with pytest.raises(TypeError, match="floating"):
        mga(torch.ones(2, 5, 32, dtype=torch.int32, device=device), *_args(m))
    with pytest.raises(ValueError, match=r"\(B, L, d\)"):
        mga(torch.randn(5, 32, device=device), *_args(m))
    with pytest.raises(TypeError, match="float64"):
        mga(x.double(), *_args(m))
    with pytest.raises(ValueError, match="sequence length"):
        mga(torch.randn(1, 300, 32, device=device), *_args(m))
    with pytest.raises(TypeError, match="bool"):
        mga(x, *_args(m), key_padding_mask=torch.zeros(2, 5, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match="key_padding_mask"):
        mga(x, *_args(m), key_padding_mask=torch.zeros(2, 6, dtype=torch.bool, device=device))
    with pytest.raises(RuntimeError, match="one device"):
        mga(x.to("meta"), *_args(m))
    m12 = _make(32, 48, 4, None, device)  # head dim 12
    with pytest.raises(ValueError, match="head dim"):
        mga(x, *_args(m12))
    with pytest.raises(ValueError, match="heads"):
        MGAdapter(32, 30, 4)


# ----------------------------------------------------------------------------------------------------
# GPU: 16-bit dtypes at the SPEC shapes against a float32 reference
# ----------------------------------------------------------------------------------------------------
def _lowp_check(dim, L, share_heads, dtype, use_mask, B=214):
    torch.manual_seed(0)
    m32 = _make(dim, 128, 8, share_heads, "cuda", torch.float32)
    mlp = _make(dim, 128, 8, share_heads, "cuda", torch.float32)
    mlp.load_state_dict(m32.state_dict())
    if share_heads:
        mlp.share.load_state_dict(m32.share.state_dict())
    mlp = mlp.to(dtype)
    x = torch.randn(B, L, dim, device="cuda")
    dy = torch.randn(B, L, dim, device="cuda")
    mask = _padding_mask(B, L, "cuda").cuda() if use_mask else None
    y32, g32 = _run(mga_ref, m32, x, mask, dy)
    ye, ge = _run(mga_ref, mlp, x.to(dtype), mask, dy.to(dtype))
    yf, gf = _run(mga, mlp, x.to(dtype), mask, dy.to(dtype))
    assert yf.dtype == dtype
    assert torch.isfinite(yf).all()
    # the fused error may be at most 2x eager's own error in the same dtype (+ a floor)
    assert rel_err(yf, y32) <= 2 * rel_err(ye, y32) + 1e-3, (rel_err(yf, y32), rel_err(ye, y32))
    for n in g32:
        ef, ee = rel_err(gf[n], g32[n]), rel_err(ge[n], g32[n])
        assert ef <= 2 * ee + 2e-3, (n, ef, ee)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_image_tower_spec_shape(dtype):
    _lowp_check(768, 50, None, dtype, use_mask=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_text_tower_bishare_spec_shape(dtype):
    _lowp_check(512, 77, 8, dtype, use_mask=True)


@pytest.mark.gpu
def test_gpu_fp32_and_vit_b16_length():
    m = _make(768, 128, 8, None, "cuda")
    x = torch.randn(8, 197, 768, device="cuda")
    _compare_fp32(m, x)


@pytest.mark.gpu
@pytest.mark.parametrize("L", [197, 256])
def test_gpu_bf16_long_sequence_bishare(L):
    """Padded L = 256 (blocked backward): bf16 against the float32 reference, as the SPEC-shape checks."""
    _lowp_check(512, L, 8, torch.bfloat16, use_mask=True, B=16)


@pytest.mark.gpu
def test_gpu_auto_uses_triton_and_autocast():
    m = _make(512, 128, 8, 8, "cuda")
    m.impl = "auto"
    x = torch.randn(4, 77, 512, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = m(x)
        m.impl = "reference"
        yr = m(x)
    assert y.dtype == yr.dtype
    assert rel_err(y, yr) < 2e-2
