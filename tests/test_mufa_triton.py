"""Fused MuFA / bottleneck kernels (kernels/mufa.py, rspeft_fast/ops/mufa.py) against the eager reference.

On CPU the kernels run through Triton's interpreter (float32, small shapes); GPU-only checks
(bf16/fp16 at the SPEC shapes, autotune cache keyed on (d, R)) are marked ``gpu``.
"""
import pytest
import torch
import torch.nn.functional as F

from rspeft_fast._impl import ImplUnavailableError
from rspeft_fast.modules.mufa import MuFAAdapter
from rspeft_fast.reference.mufa import branch_sizes, mufa_ref
from rspeft_fast.testing import TOLERANCES, AbsTerms, assert_close, assert_fused_close, rel_err, run_fwd_bwd

NAMES = ("y", "dx", "ddown_weight", "ddown_bias", "dup_weight", "dup_bias", "dgate", "dbase")


def _ops():
    from rspeft_fast.ops import mufa as ops

    return ops


def _kernels():
    from rspeft_fast.kernels import mufa as k

    return k


def _params(d, rates, device, dtype=torch.float32):
    """Random parameters (never the module's zero up-projection / uniform gate)."""
    sizes = branch_sizes(d, rates)
    r = sum(sizes)
    ps = [
        torch.randn(r, d) * d**-0.5,
        torch.randn(r) * 0.5,
        torch.randn(d, r) * r**-0.5,
        torch.randn(d) * 0.5,
        torch.rand(len(sizes)) * 1.5 + 0.2,
    ]
    return sizes, [p.to(device=device, dtype=dtype).requires_grad_() for p in ps]


def _run(fn, x, params, sizes, scale, base, dy, **kw):
    """Forward + backward; returns [y, dx, d params..., dbase] (dbase None without base)."""
    leaves = [x] + params + ([base] if base is not None else [])
    for t in leaves:
        t.grad = None
    y = fn(x, *params, sizes, scale, base, **kw)
    y.backward(dy)
    out = [y.detach(), x.grad] + [p.grad for p in params] + [base.grad if base is not None else None]
    for t in leaves:
        t.grad = None
    return out


def _close(actual, expected, name, dtype=torch.float32, factor=1.0):
    """assert_close with atol relative to the tensor's magnitude (sums over rows grow with N)."""
    atol, rtol = TOLERANCES[dtype]
    mag = float(expected.detach().abs().max()) if expected.numel() else 1.0
    assert_close(actual, expected, atol=factor * atol * max(1.0, mag), rtol=factor * rtol, name=name)


def _compare(got, want, dtype=torch.float32, factor=1.0):
    for name, a, e in zip(NAMES, got, want):
        if e is None:
            assert a is None, name
            continue
        assert a is not None, f"{name}: no gradient"
        assert a.dtype == e.dtype, f"{name}: dtype {a.dtype} != {e.dtype}"
        _close(a, e, name, dtype, factor)


# ------------------------------------------------------------------------------------- launchers
@pytest.mark.parametrize("n,d,r,save_pre,with_base", [(37, 96, 21, True, False), (130, 192, 42, False, True), (1, 40, 5, True, True)])
def test_bottleneck_launchers_match_autograd(device, n, d, r, save_pre, with_base):
    """The generic launchers (the API the EQAM adapter codes against) vs torch autograd of the formula."""
    k = _kernels()
    x = torch.randn(n, d, device=device)
    wd = torch.randn(r, d, device=device) * d**-0.5
    bd = torch.randn(r, device=device) * 0.3
    wu = torch.randn(d, r, device=device) * r**-0.5
    bu = torch.randn(d, device=device)
    cs = torch.rand(r, device=device) + 0.5
    base = torch.randn(n, d, device=device) if with_base else None
    y, pre = k.bottleneck_fwd(x, wd, bd, wu, bu, cs, 0.7, base, save_pre)

    leaves = [t.clone().requires_grad_() for t in (x, wd, bd, wu, bu, cs)]
    xx, wdd, bdd, wuu, buu, css = leaves
    pre_ref = F.linear(xx, wdd, bdd)
    y_ref = 0.7 * (F.linear(F.gelu(pre_ref) * css, wuu) + buu) + (base if with_base else 0)
    _close(y, y_ref, "y")
    if save_pre:
        assert pre.dtype == x.dtype
        _close(pre, pre_ref, "pre")
    else:
        assert pre is None
    dy = torch.randn(n, d, device=device)
    y_ref.backward(dy)
    grads = k.bottleneck_bwd(dy, x, pre, wd, bd, wu, cs, 0.7)
    for name, g, leaf in zip(("dx", "dwd", "dbd", "dwu", "dbu", "dcol_scale"), grads, leaves):
        assert g.shape == leaf.shape, name
        _close(g, leaf.grad, name)
    assert all(g.dtype == torch.float32 for g in grads[1:])


# ------------------------------------------------------------------------ functional vs reference
CASES = [  # (d, rates)
    (96, (8, 16, 32)),  # Swin-T stage-1 widths: R = 12 + 6 + 3 = 21 (padded to 32)
    (192, (8, 16, 32)),  # R = 42
    (64, (8,)),  # one branch: AdaptFormer
    (64, (8, 16, 32)),  # R = 14 (padded to 16)
]


@pytest.mark.parametrize("d,rates", CASES)
@pytest.mark.parametrize("n", [1, 37, 130])
def test_mufa_matches_reference(device, d, rates, n):
    sizes, params = _params(d, rates, device)
    x = torch.randn(n, d, device=device, requires_grad=True)
    dy = torch.randn(n, d, device=device)
    got = _run(_ops().mufa, x, params, sizes, 0.8, None, dy)
    want = _run(mufa_ref, x, params, sizes, 0.8, None, dy)
    _compare(got, want)


@pytest.mark.parametrize("save_pre", [True, False])
@pytest.mark.parametrize("d,rates,n", [(96, (8, 16, 32), 130), (64, (8,), 37), (192, (8, 16, 32), 37)])
def test_mufa_with_base_and_save_pre(device, d, rates, n, save_pre):
    sizes, params = _params(d, rates, device)
    x = torch.randn(n, d, device=device, requires_grad=True)
    base = torch.randn(n, d, device=device, requires_grad=True)
    dy = torch.randn(n, d, device=device)
    got = _run(_ops().mufa, x, params, sizes, 1.3, base, dy, save_pre=save_pre)
    want = _run(mufa_ref, x, params, sizes, 1.3, base, dy)
    _compare(got, want)


def test_mufa_noncontiguous_and_3d(device):
    """A transposed (non-contiguous) 3-D x and a non-contiguous base."""
    d, rates = 96, (8, 16, 32)
    sizes, params = _params(d, rates, device)
    x = torch.randn(13, 5, d, device=device).transpose(0, 1).requires_grad_()  # (5, 13, d), non-contiguous
    base = torch.randn(d, 13, 5, device=device).permute(2, 1, 0).requires_grad_()
    assert not x.is_contiguous() and not base.is_contiguous()
    dy = torch.randn(5, 13, d, device=device)
    got = _run(_ops().mufa, x, params, sizes, 0.5, base, dy)
    want = _run(mufa_ref, x, params, sizes, 0.5, base, dy)
    assert got[0].shape == (5, 13, d) and got[1].shape == x.shape
    _compare(got, want)


def test_mufa_4d_input_and_empty(device):
    d, rates = 64, (8, 16)
    sizes, params = _params(d, rates, device)
    x = torch.randn(2, 3, 4, d, device=device, requires_grad=True)
    dy = torch.randn(2, 3, 4, d, device=device)
    _compare(_run(_ops().mufa, x, params, sizes, 1.0, None, dy), _run(mufa_ref, x, params, sizes, 1.0, None, dy))
    x0 = torch.randn(0, 7, d, device=device, requires_grad=True)
    got = _run(_ops().mufa, x0, params, sizes, 1.0, None, torch.zeros(0, 7, d, device=device))
    assert got[0].shape == (0, 7, d)
    assert all(float(g.abs().sum()) == 0.0 for g in got[1:7])


def test_module_triton_matches_reference_module(device):
    torch.manual_seed(1)
    fused = MuFAAdapter(96, impl="triton").to(device)
    with torch.no_grad():
        fused.up.weight.normal_(0, 0.1)
        fused.up.bias.normal_(0, 0.5)
        fused.gate.uniform_(0.2, 1.5)
    ref = MuFAAdapter(96, impl="reference").to(device)
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(2, 29, 96, device=device, requires_grad=True)
    base = torch.randn(2, 29, 96, device=device)
    dy = torch.randn(2, 29, 96, device=device)
    outs = []
    for m in (fused, ref):
        x.grad = None
        y = m(x, base)
        y.backward(dy)
        outs.append([y.detach(), x.grad.clone()] + [p.grad.clone() for p in m.parameters()])
    for i, (a, e) in enumerate(zip(*outs)):
        _close(a, e, f"module output/grad {i}")


def test_backward_is_deterministic(device):
    d, rates = 96, (8, 16, 32)
    sizes, params = _params(d, rates, device)
    x = torch.randn(300, d, device=device, requires_grad=True)  # 3 split-K slices of 128 rows
    dy = torch.randn(300, d, device=device)
    a = _run(_ops().mufa, x, params, sizes, 1.0, None, dy)
    b = _run(_ops().mufa, x, params, sizes, 1.0, None, dy)
    for name, u, v in zip(NAMES, a, b):
        if u is not None:
            assert torch.equal(u, v), name


# ------------------------------------------------------------------------------------- autocast
def test_autocast_bf16_cpu():
    """Under CPU bf16 autocast: same dtypes as eager and, by the shared rule (``assert_fused_close``), no further
    from the float32 result than 2x eager bf16 itself (plus a few ulps), for the output and every gradient."""
    d, rates = 96, (8, 16, 32)
    sizes, params = _params(d, rates, "cpu")
    x = torch.randn(2, 37, d)
    base = torch.randn(2, 37, d)
    leaves = [x, *(p.detach() for p in params), base]

    def call(fn, autocast):
        def run(x, wd, bd, wu, bu, gate, base):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                return fn(x, wd, bd, wu, bu, gate, sizes, 0.9, base)

        return run

    got = run_fwd_bwd(call(_ops().mufa, True), *leaves, seed=7)
    want = run_fwd_bwd(call(mufa_ref, True), *leaves, seed=7)
    exact = run_fwd_bwd(call(mufa_ref, False), *leaves, seed=7)
    assert got[0].dtype == want[0].dtype  # (float32 here: y = base + delta with a float32 base)
    assert [g.dtype for g in got[1]] == [g.dtype for g in want[1]]
    assert_fused_close([got[0], *got[1]], [want[0], *want[1]], [exact[0], *exact[1]], name="mufa autocast bf16")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d,rates,n,with_base", [(96, (8, 16, 32), 37, True), (192, (8, 16, 32), 130, False),
                                                 (64, (8,), 13, False)])
def test_mufa_16bit_cpu(dtype, d, rates, n, with_base):
    """Module and input in 16-bit on CPU: the interpreter emulates the GPU's 16-bit rounding (bf16 casts rounded
    to nearest even, 16-bit dots exact: kernels/_launch.py), so the fused kernels are held to the shared rule
    against eager PyTorch in the same dtype and the float32 reference on the same rounded values."""
    sizes, params = _params(d, rates, "cpu")
    lo = [torch.randn(n, d).to(dtype), *(p.detach().to(dtype) for p in params),
          torch.randn(n, d).to(dtype) if with_base else None]
    hi = [t.float() if t is not None else None for t in lo]

    def call(fn):
        return lambda x, wd, bd, wu, bu, gate, base: fn(x, wd, bd, wu, bu, gate, sizes, 0.8, base)

    terms = AbsTerms()  # the weight, bias and gate gradients are sums over the n rows
    (yf, gf), (ye, ge), (yr, gr) = (run_fwd_bwd(call(f), *args, seed=11, terms=t)
                                    for f, args, t in ((_ops().mufa, lo, None), (mufa_ref, lo, None), (mufa_ref, hi, terms)))
    assert yf.dtype == ye.dtype == dtype and [g.dtype for g in gf] == [g.dtype for g in ge]
    assert_fused_close([yf, *gf], [ye, *ge], [yr, *gr], name=f"mufa {dtype}", terms=[None, *terms.of(gr)])


# ------------------------------------------------------------------------------------ bad inputs
def test_bad_inputs_raise(device):
    mufa = _ops().mufa
    d, rates = 64, (8, 16)
    sizes, params = _params(d, rates, device)
    x = torch.randn(5, d, device=device)
    with pytest.raises(ValueError, match="last dimension 64"):
        mufa(torch.randn(5, d + 1, device=device), *params, sizes)
    with pytest.raises(TypeError, match="floating"):
        mufa(torch.ones(5, d, dtype=torch.int32, device=device), *params, sizes)
    with pytest.raises(ValueError, match="sizes"):
        mufa(x, *params, (8, 5))
    with pytest.raises(ValueError, match="gate"):
        mufa(x, *params[:4], params[4][:1], sizes)
    with pytest.raises(ValueError, match="base"):
        mufa(x, *params, sizes, 1.0, torch.randn(4, d, device=device))
    with pytest.raises(RuntimeError, match="one device"):
        mufa(x, *params, sizes, 1.0, torch.randn(5, d, device="meta"))
    with pytest.raises(TypeError, match="float64"):
        mufa(x.double(), *[p.double() for p in params], sizes)
    with pytest.raises(TypeError, match="must match"):
        mufa(x.half(), *params, sizes)
    with pytest.raises(ValueError, match="x must be 2-D"):
        _kernels().bottleneck_fwd(x[None], *[p.detach() for p in params[:4]], torch.ones(sum(sizes)), 1.0)
    with pytest.raises(TypeError, match="col_scale must be float32"):
        _kernels().bottleneck_fwd(x, *[p.detach() for p in params[:4]], torch.ones(sum(sizes)).half(), 1.0)


def test_unavailable_triton_raises(monkeypatch):
    """No silent fallback: when the kernels cannot run, the functional op raises."""
    ops = _ops()
    monkeypatch.setattr(ops, "triton_available", lambda dev: (False, "no triton for this test"))
    sizes, params = _params(64, (8,), "cpu")
    with pytest.raises(ImplUnavailableError, match="no triton for this test"):
        ops.mufa(torch.randn(3, 64), *params, sizes)


# ------------------------------------------------------------------------------------- GPU only
SPEC_SHAPES = [(64 * 197, 768), (64 * 3136, 96)]  # ViT-B/16 (R = 168), Swin-T stage 1 (R = 21)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,d", SPEC_SHAPES)
def test_gpu_spec_shapes_16bit(n, d, dtype):
    """Kernel in bf16/fp16 vs a float32 reference: at most 2x eager's own error in that dtype (+ floor)."""
    rates = (8, 16, 32)
    sizes, p32 = _params(d, rates, "cuda")
    x32 = torch.randn(n, d, device="cuda", requires_grad=True)
    base32 = torch.randn(n, d, device="cuda", requires_grad=True)
    dy32 = torch.randn(n, d, device="cuda")
    exact = _run(mufa_ref, x32, p32, sizes, 1.0, base32, dy32)
    p16 = [p.detach().to(dtype).requires_grad_() for p in p32]
    x16 = x32.detach().to(dtype).requires_grad_()
    base16 = base32.detach().to(dtype).requires_grad_()
    dy16 = dy32.to(dtype)
    got = _run(_ops().mufa, x16, p16, sizes, 1.0, base16, dy16)
    eager = _run(mufa_ref, x16, p16, sizes, 1.0, base16, dy16)
    for name, a, e, f in zip(NAMES, got, eager, exact):
        assert a.dtype == e.dtype, name
        ra, re = rel_err(a.float(), f), rel_err(e.float(), f)
        assert ra <= 2 * re + 1e-3, f"{name}: kernel rel err {ra:.3e} vs eager {dtype} {re:.3e}"


@pytest.mark.gpu
def test_gpu_autotune_not_keyed_on_rows():
    k = _kernels()
    sizes, params = _params(768, (8, 16, 32), "cuda", torch.bfloat16)
    wd, bd, wu, bu = (p.detach() for p in params[:4])
    cs = torch.ones(wd.shape[0], device="cuda")
    k.bottleneck_fwd(torch.randn(1000, 768, device="cuda", dtype=torch.bfloat16), wd, bd, wu, bu, cs, 1.0)
    before = len(k._bottleneck_fwd_kernel.cache)
    for n in (999, 1234, 4097):
        k.bottleneck_fwd(torch.randn(n, 768, device="cuda", dtype=torch.bfloat16), wd, bd, wu, bu, cs, 1.0)
    assert len(k._bottleneck_fwd_kernel.cache) == before
