"""The test contract itself (``rspeft_fast.testing``): the fused rule catches errors and the runner is faithful."""
import pytest
import torch

from rspeft_fast.testing import AbsTerms, assert_fused_close, run_fwd_bwd, ulp


def _matmul_case(dtype, n=37, k=29, m=13):
    a, b = torch.randn(n, k), torch.randn(k, m)
    ref = a.to(dtype).double() @ b.to(dtype).double()
    eager = a.to(dtype) @ b.to(dtype)
    return a, b, ref, eager


def test_ulp_values():
    assert ulp(torch.bfloat16) == 2.0 ** -7 and ulp(torch.float16) == 2.0 ** -10
    assert ulp(torch.float32) == 2.0 ** -23 and ulp(torch.float64) == 2.0 ** -52
    with pytest.raises(TypeError):
        ulp(torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rule_passes_eager_itself_and_fails_a_wrong_result(dtype):
    a, b, ref, eager = _matmul_case(dtype)
    assert_fused_close(eager, eager.clone(), ref, name="same")
    # a fused result off by 3x eager's own error everywhere, in the worst direction, must fail
    err = float((eager.double() - ref).abs().max())
    bad = (ref + 8 * max(err, ulp(dtype) * float(ref.abs().max()))).to(dtype)
    with pytest.raises(AssertionError, match="max\\|fused-ref\\|"):
        assert_fused_close(bad, eager, ref, name="bad")
    # a single flipped element is enough to fail
    one = eager.clone()
    one[3, 4] = -one[3, 4] + 1
    with pytest.raises(AssertionError, match="1/"):
        assert_fused_close(one, eager, ref, name="one")


def test_rule_structures_none_and_nonfinite():
    a, b, ref, eager = _matmul_case(torch.float16)
    assert_fused_close({"y": eager, "g": [eager, None]}, {"y": eager, "g": [eager, None]}, {"y": ref, "g": [ref, None]})
    with pytest.raises(AssertionError, match="missing"):
        assert_fused_close([eager, None], [eager, eager], [ref, ref])
    with pytest.raises(AssertionError, match="structures differ"):
        assert_fused_close([eager], [eager, eager], [ref, ref])
    with pytest.raises(AssertionError, match="same low dtype"):
        assert_fused_close(eager.float(), eager, ref)
    nan = eager.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(AssertionError, match="non-finite"):
        assert_fused_close(nan, eager, ref)
    assert_fused_close(nan, nan.clone(), ref)  # NaN where eager has it: excluded from the error


def test_run_fwd_bwd_grads_of_inputs_and_module_params_and_restores_grads():
    lin = torch.nn.Linear(6, 5)
    sentinel = torch.full_like(lin.weight, 7.0)
    lin.weight.grad = sentinel
    x = torch.randn(4, 6)
    ids = torch.arange(4)
    out, grads = run_fwd_bwd(lambda t, i: lin(t)[i], x, ids, module=lin, seed=3)
    assert len(grads) == 3 and not out.requires_grad
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(grads[0], dy @ lin.weight.detach())
    torch.testing.assert_close(grads[1], dy.T @ x)
    torch.testing.assert_close(grads[2], dy.sum(0))
    assert lin.weight.grad is sentinel and x.grad is None
    out2, grads2 = run_fwd_bwd(lin, x, seed=3)  # a module as fn: its parameters are collected too
    torch.testing.assert_close(out2, out)
    assert all(torch.equal(g, h) for g, h in zip(grads, grads2))
    _, g_other = run_fwd_bwd(lin, x, seed=4)
    assert not torch.equal(g_other[0], grads[0])


def test_rule_floor_in_the_compute_dtype():
    """float32 results of a bf16 computation: the floor counts ulps of ``dtype`` (bf16), not of float32."""
    ref = torch.linspace(1, 2, 9, dtype=torch.float64)
    eager = ref.float()
    fused = (ref + 2.0 ** -8).float()  # half a bf16 ulp off, 2^15 fp32 ulps
    with pytest.raises(AssertionError):
        assert_fused_close(fused, eager, ref, floor_ulps=1)
    assert_fused_close(fused, eager, ref, floor_ulps=1, dtype=torch.bfloat16)


# ---------------------------------------------------------------- reductions: the floor scales with Σ|terms|
def _gate_gradient(n=8192, seed=0):
    """A scalar gate's gradient ``Σ_i x_i dy_i`` over ``n`` rows whose terms cancel: float64 reference, its
    Σ|terms| recorded by :class:`AbsTerms` through autograd, and the float32 terms."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    dy = torch.randn(n, generator=g, dtype=torch.float64)
    dy -= (x * dy).sum() / (x * x).sum() * x  # the result cancels to ~1e-14 of its terms
    x, dy = x.float().double(), dy.float().double()  # the float32 inputs every implementation sees
    gate = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    with AbsTerms() as m:
        (gate * x).backward(dy)
    return gate.grad, m.of(gate.grad), (x * dy).float()


def test_abs_terms_through_autograd_is_the_sum_of_absolute_terms():
    ref, terms, t = _gate_gradient()
    torch.testing.assert_close(terms, t.double().abs().sum(), rtol=1e-6, atol=0)
    assert float(terms) > 1e6 * abs(float(ref))  # the terms cancel: |ref| says nothing about the rounding
    # a linear layer: |dy|ᵀ|x| for the weight, Σ|dy| over rows for the bias, through the real autograd graph
    lin = torch.nn.Linear(7, 5).double()
    x = torch.randn(33, 7, dtype=torch.float64)
    dy = torch.randn(33, 5, dtype=torch.float64)
    with AbsTerms() as m:
        lin(x).backward(dy)
    torch.testing.assert_close(m.of(lin.weight.grad), dy.abs().T @ x.abs())
    torch.testing.assert_close(m.of(lin.bias.grad), dy.abs().sum(0))
    # a tensor computed outside: its magnitude is itself
    assert torch.equal(m.of(x), x.abs()) and m.of(None) is None


def test_reduction_floor_accepts_a_reordered_fp32_sum_and_rejects_a_dropped_term_or_a_bf16_sum():
    ref, terms, t = _gate_gradient()
    eager = ref.float()  # an eager float32 sum that lands on the correctly rounded result (as DINOv3's MGA gate did)
    blocked = t.view(64, -1).sum(1).flip(0).cumsum(0)[-1]                   # float32, another order (a kernel's)
    big = int(t.abs().argmax())
    dropped = torch.cat([t[:big], t[big + 1:]]).sum()                        # one term missing
    bf16 = torch.zeros((), dtype=torch.bfloat16)                            # accumulated in bf16, stored in fp32
    for v in t.view(-1, 256).to(torch.bfloat16):
        bf16 = bf16 + v.sum()
    bf16 = bf16.float()
    # without terms= the rule is wrong for this reduction: the reordered float32 sum fails on rounding alone
    with pytest.raises(AssertionError):
        assert_fused_close(blocked, eager, ref, name="gate")
    assert_fused_close(blocked, eager, ref, name="gate", terms=terms)
    for bad, what in ((dropped, "a dropped term"), (bf16, "a bf16-accumulated sum")):
        with pytest.raises(AssertionError, match="Σ\\|terms\\|"):
            assert_fused_close(bad, eager, ref, name=what, terms=terms)


def test_reduction_floor_is_per_element_and_checks_its_shape():
    ref = torch.tensor([1.0, 1e-9], dtype=torch.float64)
    terms = torch.tensor([1.0, 1.0], dtype=torch.float64)
    eager = ref.float()
    ok = (ref + torch.tensor([0.0, 3 * ulp(torch.float32)], dtype=torch.float64)).float()
    assert_fused_close(ok, eager, ref, terms=terms)
    bad = (ref + torch.tensor([0.0, 16 * ulp(torch.float32)], dtype=torch.float64)).float()
    with pytest.raises(AssertionError, match="1/2 elements over"):
        assert_fused_close(bad, eager, ref, terms=terms)
    with pytest.raises(AssertionError, match="terms shape"):
        assert_fused_close(ok, eager, ref, terms=terms[:1])
    with pytest.raises(AssertionError, match="leaves"):
        assert_fused_close([ok], [eager], [ref], terms=[terms, terms])
