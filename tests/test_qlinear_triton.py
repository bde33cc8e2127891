"""Fused Q-Linear / EQAM (Triton; CPU runs go through the interpreter) against the eager reference."""
import pytest
import torch
import torch.nn.functional as F

import rspeft_fast
from rspeft_fast.kernels import qlinear as K
from rspeft_fast.ops import qlinear as Q
from rspeft_fast.reference.qlinear import eqam_ref, qlinear_ref, quantize_weight
from rspeft_fast.testing import AbsTerms, assert_close, assert_fused_close, run_fwd_bwd, tolerances

BITS = list(range(2, 9))
SHAPES = [(13, 96, 37), (96, 192, 130), (192, 13, 1)]  # (in, out, rows)


def _inputs(din, dout, rows, device, dtype=torch.float32, lead=None):
    shape = (rows, din) if lead is None else (*lead, din)
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(dout, din, device=device) * 0.2).requires_grad_()
    b = torch.randn(dout, device=device).requires_grad_()
    return x, w, b


def _grads(y, inputs, g):
    want = [t for t in inputs if t is not None and t.requires_grad]
    return torch.autograd.grad(y, want, g)


def _compare(fused, ref, inputs, dtype=torch.float32, names=("x", "weight", "bias"), atol=None, rtol=None):
    y = fused(*inputs)
    yr = ref(*inputs)
    a, r = tolerances(dtype)
    atol, rtol = atol or a, rtol or r
    assert y.dtype == yr.dtype and y.shape == yr.shape
    assert_close(y, yr, atol, rtol, name="y")
    g = torch.randn_like(yr)
    live = [n for n, t in zip(names, inputs) if t is not None and t.requires_grad]
    for name, ga, gr in zip(live, _grads(y, inputs, g), _grads(yr, inputs, g)):
        assert ga.dtype == gr.dtype, name
        assert_close(ga, gr, atol, rtol * 2, name=f"d{name}")


# ----------------------------------------------------------------------------- quantiser exactness


@pytest.mark.parametrize("bits", BITS)
def test_ties_round_half_to_even(bits, device):
    """Weights that land exactly on k + 0.5 after scaling must round to even (as torch.round)."""
    qmax = 2 ** (bits - 1) - 1
    s = 2.0 ** -3
    halves = [k + 0.5 for k in range(-qmax, qmax)]  # every tie inside the range (|W / s| <= qmax by construction)
    row = [qmax * s] + [h * s for h in halves] + [0.0, -0.0, 1.0 * s]
    w = torch.tensor([row, [-v for v in row]], device=device)
    scale = K.row_scales(w, bits)
    assert torch.equal(scale.cpu(), torch.full((2,), s))
    q_ref, s_ref = quantize_weight(w, bits)
    codes = torch.round(w.cpu().double() / s).clamp(-qmax - 1, qmax)
    assert torch.equal(q_ref.cpu().double(), codes)
    # ties go to the even neighbour
    tie_codes = q_ref[0, 1 : 1 + len(halves)].cpu()
    assert torch.all(torch.remainder(tie_codes, 2) == 0)
    assert torch.equal(tie_codes, torch.tensor([2 * round(h / 2) for h in halves], dtype=tie_codes.dtype))
    wq = (q_ref * s_ref[:, None]).cpu()
    # materialising kernel, forward matmul kernel (x = identity) and dX kernel (dy = identity) all see the same Wq
    assert torch.equal(K.weight_values(w, scale, torch.float32, bits).cpu(), wq)
    wq1, s1 = K.fake_quant(w, bits, torch.float32)
    assert torch.equal(wq1.cpu(), wq) and torch.equal(s1.cpu(), s_ref.cpu())
    eye = torch.eye(w.shape[1], device=device)
    y, _ = K.qlinear_fwd(eye, w, scale, None, bits)
    assert torch.equal(y.t().cpu(), wq)
    dx, _, _ = K.qlinear_bwd(torch.eye(2, device=device), eye[:2], w, scale, None, bits, has_bias=False, needs_dw=False)
    assert torch.equal(dx.cpu(), wq)


@pytest.mark.parametrize("bits", [2, 5, 8])
def test_row_scales_bitwise(bits, device):
    w = torch.randn(37, 130, device=device) * 3
    w[5] = 0.0  # all-zero row: scale clamped to 1e-8
    q_ref, s_ref = quantize_weight(w, bits)
    s = K.row_scales(w, bits)
    assert torch.equal(s, s_ref)
    assert torch.equal(K.weight_values(w, s, torch.float32, bits), q_ref * s_ref[:, None])
    wq1, s1 = K.fake_quant(w, bits, torch.float32)
    assert torch.equal(wq1, q_ref * s_ref[:, None]) and torch.equal(s1, s_ref)


# ----------------------------------------------------------------------------- Q-Linear forward / STE backward


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bits", BITS)
def test_qlinear_matches_reference(bits, shape, device):
    x, w, b = _inputs(*shape, device)
    _compare(lambda *a: Q.qlinear(*a, bits), lambda *a: qlinear_ref(*a, bits), (x, w, b))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bits", [3, 8])
def test_qlinear_gelu_epilogue(bits, shape, device):
    x, w, b = _inputs(*shape, device)
    _compare(lambda *a: Q.qlinear(*a, bits, gelu=True), lambda *a: F.gelu(qlinear_ref(*a, bits)), (x, w, b))


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("which", ["weight_only", "x_only", "no_bias"])
def test_qlinear_partial_grads(which, gelu, device):
    x, w, b = _inputs(96, 40, 70, device)
    if which == "weight_only":
        x.requires_grad_(False)
    elif which == "x_only":
        w.requires_grad_(False)
        b.requires_grad_(False)
    else:
        b = None
    act = F.gelu if gelu else (lambda t: t)
    _compare(lambda *a: Q.qlinear(*a, 6, gelu=gelu), lambda *a: act(qlinear_ref(*a, 6)), (x, w, b))


def test_qlinear_any_leading_shape_noncontiguous(device):
    x = torch.randn(3, 17, 96, device=device).transpose(0, 1).requires_grad_()  # (17, 3, 96), not contiguous
    w = (torch.randn(40, 96, device=device) * 0.2).requires_grad_()
    b = torch.randn(40, device=device).requires_grad_()
    assert not x.is_contiguous()
    _compare(lambda *a: Q.qlinear(*a, 4), lambda *a: qlinear_ref(*a, 4), (x, w, b))
    w_t = torch.randn(96, 40, device=device).t().requires_grad_()  # non-contiguous weight
    _compare(lambda *a: Q.qlinear(*a, 5, gelu=True), lambda *a: F.gelu(qlinear_ref(*a, 5)), (x, w_t, b))


@pytest.mark.parametrize("split", [2, 3])
def test_dw_split_reduction(split, device):
    m, k, n, bits = 200, 40, 24, 4
    x = torch.randn(m, k, device=device)
    w = torch.randn(n, k, device=device)
    dy = torch.randn(m, n, device=device)
    pre = torch.randn(m, n, device=device)
    s = K.row_scales(w, bits)
    dx, dw, db = K.qlinear_bwd(dy, x, w, s, pre, bits, gelu=True, split=split)
    g = torch.ops.aten.gelu_backward(dy, pre)
    q, sr = quantize_weight(w, bits)
    assert_close(dx, g @ (q * sr[:, None]), name="dx")
    assert_close(dw, g.t() @ x, name="dw")
    assert_close(db, g.sum(0), name="db")


def _fused_eager_ref(fused, eager, inputs, dtype):
    """(fused, eager) on the 16-bit ``inputs`` and the float32 reference on the same (rounded) values: outputs and
    the gradients of every floating input, for :func:`rspeft_fast.testing.assert_fused_close`."""
    lo = [t.detach().to(dtype) if isinstance(t, torch.Tensor) else t for t in inputs]
    hi = [t.float() if isinstance(t, torch.Tensor) else t for t in lo]
    terms = AbsTerms()  # weight and bias gradients are sums over the rows: their floor scales with Σ|terms|
    ref = run_fwd_bwd(eager, *hi, seed=3, terms=terms)
    return run_fwd_bwd(fused, *lo, seed=3), run_fwd_bwd(eager, *lo, seed=3), ref, [None, *terms.of(ref[1])]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits,gelu", [(8, False), (4, True)])
def test_qlinear_half_inputs(dtype, bits, gelu, device):
    """16-bit activations and master weight (outside autocast they must match, as for F.linear: a float32
    master weight with 16-bit x raises, tests/test_hardening_ops.py). The interpreter emulates the GPU's 16-bit
    rounding (kernels/_launch.py), so the fused output and gradients are held to the shared rule: within 2x the
    error eager PyTorch makes in the same dtype, against the float32 reference on the same rounded inputs."""
    x, w, b = _inputs(96, 40, 37, device)
    act = F.gelu if gelu else (lambda t: t)
    (yf, gf), (ye, ge), (yr, gr), terms = _fused_eager_ref(lambda *a: Q.qlinear(*a, bits, gelu=gelu),
                                                          lambda *a: act(qlinear_ref(*a, bits)), (x, w, b), dtype)
    assert yf.dtype == ye.dtype == dtype and all(g.dtype == dtype for g in gf)
    assert_fused_close([yf, *gf], [ye, *ge], [yr, *gr], name=f"qlinear {dtype} bits{bits}", terms=terms)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_eqam_half_inputs(dtype, device):
    """The fused EQAM bottleneck (MuFA's kernels with fake-quantised weights) in 16-bit, same rule."""
    inputs = _eqam_inputs(96, 16, 37, device)
    got = _fused_eager_ref(lambda *a: Q.eqam(*a, 8), lambda *a: eqam_ref(*a, 8), inputs, dtype)
    (yf, gf), (ye, ge), (yr, gr), terms = got
    assert yf.dtype == dtype
    assert_fused_close([yf, *gf], [ye, *ge], [yr, *gr], name=f"eqam {dtype}", terms=terms)


def _compare_autocast(fused, ref, inputs, device, names=("x", "weight", "bias"), dtype=torch.bfloat16):
    """flash-attention's rule (``assert_fused_close``): under autocast, the fused result's error against the
    float32 reference is at most 2x the eager autocast reference's own error (plus a floor of a few ulps), for the
    output and every gradient."""

    def ac(fn):
        def run(*a):
            with torch.autocast(device, dtype=dtype):
                return fn(*a)

        return run

    (y, gy), (yl, gl), (y32, g32) = (run_fwd_bwd(f, *inputs, seed=5) for f in (ac(fused), ac(ref), ref))
    assert y.dtype == yl.dtype == dtype
    assert [g.dtype for g in gy] == [g.dtype for g in gl]
    assert_fused_close([y, *gy], [yl, *gl], [y32, *g32], name=f"autocast {dtype}")


def test_qlinear_autocast_bf16(device):
    x, w, b = _inputs(96, 40, 37, device)
    _compare_autocast(lambda *a: Q.qlinear(*a, 4), lambda *a: qlinear_ref(*a, 4), (x, w, b), device)
    _compare_autocast(lambda *a: Q.qlinear(*a, 7, gelu=True), lambda *a: F.gelu(qlinear_ref(*a, 7)), (x, w, b), device)


# ----------------------------------------------------------------------------- EQAM


def _eqam_inputs(d, r, rows, device, lead=None):
    x = torch.randn((rows, d) if lead is None else (*lead, d), device=device, requires_grad=True)
    wd = (torch.randn(r, d, device=device) * 0.2).requires_grad_()
    bd = (torch.randn(r, device=device) * 0.5).requires_grad_()
    wu = (torch.randn(d, r, device=device) * 0.2).requires_grad_()
    bu = torch.randn(d, device=device).requires_grad_()
    return x, wd, bd, wu, bu


EQAM_NAMES = ("x", "down_w", "down_b", "up_w", "up_b")


@pytest.mark.parametrize("d,r,rows", [(13, 5, 37), (96, 24, 130), (128, 32, 1)])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_eqam_fused_matches_reference(bits, d, r, rows, device):
    inputs = _eqam_inputs(d, r, rows, device)
    _compare(lambda *a: Q.eqam(*a, bits), lambda *a: eqam_ref(*a, bits), inputs, names=EQAM_NAMES)


def test_eqam_two_launch_path(monkeypatch, device):
    """Bottlenecks wider than FUSED_MAX_RANK use two Q-Linear launches (forced here on a small one)."""
    monkeypatch.setattr(Q, "FUSED_MAX_RANK", 8)
    inputs = _eqam_inputs(96, 24, 50, device, lead=None)
    _compare(lambda *a: Q.eqam(*a, 3), lambda *a: eqam_ref(*a, 3), inputs, names=EQAM_NAMES)


def test_eqam_leading_shape_no_bias_autocast(device):
    x, wd, _, wu, _ = _eqam_inputs(32, 8, 0, device, lead=(2, 3, 5))
    inputs = (x.transpose(0, 1), wd, None, wu, None)
    _compare(lambda *a: Q.eqam(*a, 5), lambda *a: eqam_ref(*a, 5), inputs, names=EQAM_NAMES)

    inputs = _eqam_inputs(32, 8, 40, device)
    _compare_autocast(lambda *a: Q.eqam(*a, 8), lambda *a: eqam_ref(*a, 8), inputs, device, names=EQAM_NAMES)


@pytest.mark.parametrize("bits", [3, 8])
def test_modules_triton_vs_reference(bits, device):
    torch.manual_seed(1)
    m = rspeft_fast.QLinear(96, 13, bits=bits, impl="triton").to(device)
    r = rspeft_fast.QLinear(96, 13, bits=bits, impl="reference").to(device)
    r.load_state_dict(m.state_dict())
    x = torch.randn(4, 9, 96, device=device)
    assert_close(m(x), r(x), name="QLinear")
    e = rspeft_fast.EQAM(64, reduction=4, bits=bits, impl="triton").to(device)
    torch.nn.init.normal_(e.up.weight, std=0.2)
    torch.nn.init.normal_(e.up.bias)
    er = rspeft_fast.EQAM(64, reduction=4, bits=bits, impl="reference").to(device)
    er.load_state_dict(e.state_dict())
    x = torch.randn(2, 7, 7, 64, device=device, requires_grad=True)
    y, yr = e(x), er(x)
    assert_close(y, yr, name="EQAM")
    g = torch.randn_like(y)
    y.backward(g)
    yr.backward(g)
    for (n, p), (_, pr) in zip(e.named_parameters(), er.named_parameters()):
        assert_close(p.grad, pr.grad, name=f"d{n}")


# ----------------------------------------------------------------------------- torch.compile / custom ops


# ----------------------------------------------------------------------------- bad inputs


def test_bad_inputs(device):
    x = torch.randn(5, 16, device=device)
    w = torch.randn(8, 16, device=device)
    for bits in (1, 9, 4.0, True):
        with pytest.raises(ValueError, match="bits"):
            Q.qlinear(x, w, None, bits)
        with pytest.raises(ValueError, match="bits"):
            rspeft_fast.QLinear(16, 8, bits=bits)
    with pytest.raises(ValueError, match="last dimension"):
        Q.qlinear(torch.randn(5, 15, device=device), w, None, 4)
    with pytest.raises(TypeError, match="floating"):
        Q.qlinear(torch.ones(5, 16, dtype=torch.int32, device=device), w, None, 4)
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        Q.qlinear(x.double(), w.double(), None, 4)
    with pytest.raises(ValueError, match="bias"):
        Q.qlinear(x, w, torch.randn(7, device=device), 4)
    with pytest.raises(RuntimeError, match="one device"):
        Q.qlinear(x, w.to("meta"), None, 4)
    with pytest.raises(ValueError, match="up_w"):
        Q.eqam(x, w, None, torch.randn(16, 7, device=device), None, 4)
    with pytest.raises(ValueError, match="last dimension"):
        rspeft_fast.EQAM(16, impl="triton")(torch.randn(3, 12, device=device))


# ----------------------------------------------------------------------------- GPU only: 16-bit at the SPEC shapes


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d,r,rows", [(128, 32, 64 * 56 * 56 // 4), (1024, 256, 64 * 7 * 7)])
def test_gpu_spec_shapes_16bit(d, r, rows, dtype):
    torch.manual_seed(0)
    x, wd, bd, wu, bu = _eqam_inputs(d, r, rows, "cuda")
    inputs = (x.detach().to(dtype).float().requires_grad_(), wd, bd, wu, bu)  # 16-bit-exact values, autocast casts
    _compare_autocast(lambda *a: Q.eqam(*a, 8), lambda *a: eqam_ref(*a, 8), inputs, "cuda", names=EQAM_NAMES, dtype=dtype)
    _compare_autocast(lambda *a: Q.qlinear(*a[:3], 4), lambda *a: qlinear_ref(*a[:3], 4), inputs[:3], "cuda", dtype=dtype)
