"""The eager hot path of the fused adapters (issue #27): checked and planned once, straight to the kernels.

* the eager path (``autograd.Function`` over planned launches) and the custom ops (what torch.compile sees) give
  bit-identical outputs and gradients;
* a fused module call runs no torch op that launches device work (only allocations and the Triton launches) and
  never synchronises with the host;
* derived tensors follow their parameters: EQAM's cached fake-quantised weights are remade after an in-place
  update; a plan follows autocast;
* FakeTensor runs (shape propagation) of the modules forward and backward go through the custom ops' fake impls.
"""
from __future__ import annotations

import pytest
import torch

from rspeft_fast.bench.host import OpCounter, stub_triton_launches
from rspeft_fast.modules.mufa import MuFAAdapter
from rspeft_fast.modules.qlinear import EQAM
from rspeft_fast.ops import mufa as OM
from rspeft_fast.ops import qlinear as OQ


def _randomised(m):
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m


def _mufa(base=False):
    return _randomised(MuFAAdapter(48, rates=(4, 8, 16), scale=0.7, impl="triton"))


def _eqam():
    return _randomised(EQAM(48, hidden=12, bits=8, impl="triton"))


def _fwd_bwd(fn, m, x, *extra):
    m.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    extra = [e.detach().requires_grad_(True) for e in extra]
    y = fn(x, *extra)
    torch.manual_seed(3)
    y.backward(torch.randn_like(y))
    return [y.detach(), x.grad, *[e.grad for e in extra]] + [p.grad for p in m.parameters()]


def _mufa_op_path(m):
    """The custom-op route of ops/mufa.py (what torch.compile records), called directly."""

    def run(x, base=None):
        cs = torch.cat([g.expand(r) for g, r in zip(m.gate.float().unbind(0), m.sizes)])
        return OM.bottleneck_fwd_op(x, m.down.weight, m.down.bias, m.up.weight, m.up.bias, cs, m.scale, base, True,
                                    x.dtype)[0]

    return run


def _eqam_op_path(m):
    def run(x):
        return OQ._eqam_fwd(x.reshape(-1, m.dim), m.down.weight, m.down.bias, m.up.weight, m.up.bias, m.bits,
                            True)[0].view(x.shape)

    return run


@pytest.mark.parametrize("with_base", [False, True])
def test_mufa_eager_path_equals_custom_op(with_base):
    m = _mufa()
    x, base = torch.randn(3, 5, 48), torch.randn(3, 5, 48)
    extra = (base,) if with_base else ()
    got = _fwd_bwd(lambda xx, *b: m(xx, *b), m, x, *extra)
    want = _fwd_bwd(_mufa_op_path(m), m, x, *extra)
    assert len(got) == len(want)
    names = ["y", "x"] + (["base"] if with_base else []) + [n for n, _ in m.named_parameters()]
    for name, g, w in zip(names, got, want):
        assert g.dtype == w.dtype, name
        if name == "gate":  # per-branch sum of the column gradients: in the gate kernel vs autograd's cat backward
            torch.testing.assert_close(g, w, atol=0, rtol=4e-7)
        else:
            assert torch.equal(g, w), f"{name}: max diff {(g - w).abs().max()}"


def test_eqam_eager_path_equals_custom_op():
    m = _eqam()
    x = torch.randn(2, 3, 3, 48)
    got = _fwd_bwd(m, m, x)
    want = _fwd_bwd(_eqam_op_path(m), m, x)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and torch.equal(g, w), f"output/grad {i}: max diff {(g - w).abs().max()}"


@pytest.mark.parametrize("make", [_mufa, _eqam], ids=["mufa", "eqam"])
@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "fwd+bwd"])
def test_fused_call_runs_no_device_torch_ops_and_no_sync(make, grad):
    m = make()
    x = torch.randn(2, 4, 48, requires_grad=grad)
    m(x)  # plans made, caches filled
    dy = torch.ones(x.shape)
    counter = OpCounter()
    with stub_triton_launches() as launches, counter:  # the interpreter's own tensor copies are not the op's
        before = launches.count
        if grad:
            y = m(x)
            y.backward(dy)
        else:
            with torch.no_grad():
                m(x)
    assert launches.count - before == (6 if grad else 1)
    s = counter.summary()
    assert s["syncs"] == 0, s
    assert s["device_ops"] == 0, s["ops"]


def test_eqam_quantised_weights_follow_in_place_updates():
    m = _eqam()
    x = torch.randn(5, 48)
    with torch.no_grad():
        y0 = m(x)
        assert torch.equal(m(x), y0)  # cached quantised weights: the same result
        m.down.weight.mul_(1.5)  # an in-place update (as an optimizer step): _version moves
        m.up.weight.add_(0.1)
        y1 = m(x)
        m.impl = "reference"
        ref = m(x)
    assert not torch.equal(y1, y0)
    torch.testing.assert_close(y1, ref, atol=1e-5, rtol=1e-4)


def test_plan_follows_autocast():
    m = _mufa()
    x = torch.randn(4, 48)
    with torch.no_grad():
        assert m(x).dtype == torch.float32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert m(x).dtype == torch.float32  # MuFA: the fp32 up bias promotes (as eager)
            assert _eqam()(x).dtype == torch.bfloat16
        assert m(x).dtype == torch.float32


@pytest.mark.parametrize("make", [_mufa, _eqam], ids=["mufa", "eqam"])
def test_fake_tensor_forward_backward(make):
    from torch._subclasses.fake_tensor import FakeTensorMode

    m = make()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        x = mode.from_tensor(torch.randn(2, 3, 48)).requires_grad_(True)
        y = m(x)
        assert y.shape == x.shape and y.dtype == torch.float32
        y.sum().backward()
        assert x.grad is not None and x.grad.shape == x.shape
