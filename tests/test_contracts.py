"""Cross-op contracts: the implementation choice (``rspeft_fast._impl``), ``impl=`` validation of every module
and functional, and the input contract every implementation shares."""
from __future__ import annotations

import warnings

import pytest
import torch

from rspeft_fast import _impl
from rspeft_fast._impl import ImplUnavailableError, check_impl, resolve_impl


# ----------------------------------------------------------------------------- resolve_impl
def test_impl_resolution(monkeypatch):
    assert resolve_impl("op", "reference", "cpu", ("triton",)) == "reference"
    assert resolve_impl("op", "auto", "cpu", ("triton",)) == "reference"  # the interpreter is never auto-picked
    with pytest.raises(ValueError, match="not one of"):
        resolve_impl("op", "cuda", "cpu", ("triton",))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ImplUnavailableError, match="TRITON_INTERPRET=1"):
        resolve_impl("op", "triton", "cpu", ("triton",))
    with pytest.raises(ImplUnavailableError, match="cuda"):
        resolve_impl("op", "cuda", "cpu", ("cuda", "cpu"))
    monkeypatch.setenv("RSPEFT_FAST_IMPL", "reference")
    assert resolve_impl("op", "auto", "cpu", ("cpu",)) == "reference"



def test_limits_auto_warns_once_per_op_and_reason(monkeypatch):
    monkeypatch.setattr(_impl, "_WARNED", set())
    monkeypatch.setattr(_impl, "available", lambda name, device: (True, ""))
    calls = []

    def too_wide():
        calls.append(1)
        return "R=512 > 256 (bottleneck too wide for one tile)"

    with pytest.warns(UserWarning, match="R=512 > 256") as rec:
        assert resolve_impl("opA", "auto", "cuda", ("triton",), limits=too_wide) == "reference"
        assert resolve_impl("opA", "auto", "cuda", ("triton",), limits=too_wide) == "reference"
        assert resolve_impl("opB", "auto", "cuda", ("triton",), limits=too_wide) == "reference"
    assert len(rec) == 2, [str(w.message) for w in rec]  # once for opA, once for opB
    assert "opA" in str(rec[0].message) and "opB" not in str(rec[0].message), str(rec[0].message)
    assert "opB" in str(rec[1].message) and "opA" not in str(rec[1].message), str(rec[1].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_impl("opA", "auto", "cuda", ("triton",), limits=lambda: None) == "triton"
    assert len(calls) == 3


def test_limits_explicit_raises_before_launch(monkeypatch):
    monkeypatch.setattr(_impl, "available", lambda name, device: (True, ""))
    with pytest.raises(ImplUnavailableError, match="shared memory 240000 B > 232448 B"):
        resolve_impl("opC", "triton", "cuda", ("triton",), limits=lambda: "shared memory 240000 B > 232448 B")
    # reference never asks the limits
    assert resolve_impl("opC", "reference", "cuda", ("triton",), limits=lambda: 1 / 0) == "reference"


def test_limits_not_consulted_when_the_implementation_cannot_run(monkeypatch):
    monkeypatch.setattr(_impl, "available", lambda name, device: (False, "no CUDA"))
    assert resolve_impl("opD", "auto", "cuda", ("triton",), limits=lambda: 1 / 0) == "reference"
    with pytest.raises(ImplUnavailableError, match="no CUDA"):
        resolve_impl("opD", "triton", "cuda", ("triton",), limits=lambda: 1 / 0)


def test_check_impl_lists_the_choices():
    assert check_impl("mufa", "triton") == "triton"
    with pytest.raises(ValueError, match=r"impl='tritn' is not one of \('auto', 'reference', 'triton'\)"):
        check_impl("mufa", "tritn")
    with pytest.raises(ValueError, match="'cuda', 'cpu'"):
        check_impl("weighted_triplet_loss", "triton")
    with pytest.raises(ValueError, match="not one of"):
        check_impl("mufa", None)


# ----------------------------------------------------------------------------- impl= validated where given
@pytest.mark.parametrize("make", [
    lambda impl: __import__("rspeft_fast").MuFAAdapter(32, rates=(8,), impl=impl),
    lambda impl: __import__("rspeft_fast").QLinear(8, 4, impl=impl),
    lambda impl: __import__("rspeft_fast").EQAM(32, impl=impl),
    lambda impl: __import__("rspeft_fast").MGAdapter(32, hidden=16, heads=2, impl=impl),
    lambda impl: __import__("rspeft_fast").WeightedTripletLoss(impl=impl),
], ids=["MuFAAdapter", "QLinear", "EQAM", "MGAdapter", "WeightedTripletLoss"])
def test_modules_validate_impl_at_construction_and_assignment(make):
    with pytest.raises(ValueError, match=r"impl='no-such-impl' is not one of \('auto', 'reference'"):
        make("no-such-impl")
    m = make("reference")
    with pytest.raises(ValueError, match="not one of"):
        m.impl = "trition"
    assert m.impl == "reference"


def test_functionals_validate_impl_at_the_call():
    from rspeft_fast.ops.mufa import mufa
    from rspeft_fast.ops.qlinear import eqam, qlinear
    from rspeft_fast.ops.triplet import weighted_triplet_loss

    x = torch.randn(3, 16)
    with pytest.raises(ValueError, match="not one of"):
        mufa(x, torch.randn(2, 16), torch.randn(2), torch.randn(16, 2), torch.randn(16), torch.ones(1), (2,), impl="x")
    with pytest.raises(ValueError, match="not one of"):
        qlinear(x, torch.randn(4, 16), None, 8, impl="x")
    with pytest.raises(ValueError, match="not one of"):
        eqam(x, torch.randn(4, 16), None, torch.randn(16, 4), None, 8, impl="x")
    with pytest.raises(ValueError, match="not one of"):
        weighted_triplet_loss(x, x, impl="triton")


def test_mga_functional_dispatches_like_the_others():
    """ops.mga.mga takes impl= with the same rule as mufa/qlinear/eqam: validated at the call, "reference"
    is mga_ref exactly, "auto" on CPU tensors runs the reference, "triton" the kernels (interpreter here)."""
    from rspeft_fast.modules import MGAdapter
    from rspeft_fast.ops.mga import mga
    from rspeft_fast.reference.mga import mga_ref

    torch.manual_seed(0)
    m = MGAdapter(24, hidden=16, heads=2)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    attn = {"in_proj_weight": m.attn.in_proj_weight, "in_proj_bias": m.attn.in_proj_bias,
            "out_proj_weight": m.attn.out_proj.weight, "out_proj_bias": m.attn.out_proj.bias}
    args = (torch.randn(2, 5, 24), m.down.weight, m.down.bias, m.up.weight, m.up.bias, attn, m.gate, 2)
    with pytest.raises(ValueError, match="not one of"):
        mga(*args, impl="x")
    want = mga_ref(*args)
    assert torch.equal(mga(*args, impl="reference"), want)
    assert torch.equal(mga(*args, impl="auto"), want)
    torch.testing.assert_close(mga(*args, impl="triton"), want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- one input contract
import _helpers as H  # noqa: E402

IMPLS_OF = {"mufa": ("reference", "triton"), "qlinear": ("reference", "triton"), "eqam": ("reference", "triton"),
            "mga": ("reference", "triton"), "triplet": ("reference", "cpu")}


def _outcome(fn):
    """``("ok", dtype, shape, grad dtypes)`` or ``("raises", exception type)`` of ``fn()``."""
    try:
        out, grads = fn()
    except (TypeError, ValueError, RuntimeError) as e:
        return ("raises", type(e).__name__, str(e).split(":")[0])
    return ("ok", out.dtype, tuple(out.shape), tuple(None if g is None else (g.dtype, tuple(g.shape)) for g in grads))


def _contract_case(op, case, impl):
    from rspeft_fast.testing import run_fwd_bwd

    m = H.make(op)
    H.set_impl(m, impl)
    rows = 0 if case in ("empty", "empty_seq") else 3
    xs = list(H.inputs(op, m, max(rows, 1) if case == "empty_seq" else rows, seq=0 if case == "empty_seq" else 4))
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if case == "autocast_bf16" else contextlib.nullcontext()
    if case == "x_fp16":
        xs = [x.half() for x in xs]
    elif case == "all_fp16":
        m.half()
        xs = [x.half() for x in xs]
    elif case == "x_int":
        xs = [(x * 10).to(torch.int32) for x in xs]
    elif case == "wrong_last_dim":
        xs = [x[..., :-1] for x in xs]
    elif case == "noncontiguous":
        xs = [torch.cat([x, x], -1)[..., ::2] for x in xs]

    def run():
        with ctx:
            return run_fwd_bwd(m, *xs)
    return _outcome(run)


import contextlib  # noqa: E402

CASES = ("fp32", "all_fp16", "x_fp16", "autocast_bf16", "empty", "empty_seq", "x_int", "wrong_last_dim", "noncontiguous")


CONTRACT_PARAMS = [pytest.param(op, case, id=f"{op}-{case}") for op in H.OPS for case in CASES
                   if case != "empty_seq" or op == "mga"]  # L = 0: MGA's sequence axis (the others: "empty")


@pytest.mark.parametrize("op,case", CONTRACT_PARAMS)
def test_every_implementation_honours_the_same_input_contract(op, case):
    """Each contract case gives the same outcome (output dtype/shape and gradient dtypes/shapes, or the same
    exception type and message head) through every implementation of the op: reference, Triton (interpreter)
    and the C++ CPU kernel. (float64 is the one documented difference: the Triton kernels raise TypeError,
    ``impl="auto"`` runs the reference.)"""
    if op == "triplet":
        H.require_triplet_fused()
    outcomes = {impl: _contract_case(op, case, impl) for impl in IMPLS_OF[op]}
    first = next(iter(outcomes.values()))
    assert all(o == first for o in outcomes.values()), outcomes
    expect_raise = {"x_fp16": "TypeError", "x_int": "TypeError", "wrong_last_dim": "ValueError"}
    if op == "triplet":  # no weights: fp16 features are fine; an empty batch has no pair
        expect_raise = {"x_int": "TypeError", "wrong_last_dim": None, "empty": "ValueError"}
    want = expect_raise.get(case)
    if want:
        assert first[:2] == ("raises", want), first
    elif case != "wrong_last_dim":
        assert first[0] == "ok", first


@pytest.mark.parametrize("op", ["mufa", "qlinear", "eqam", "mga"])
def test_float64_reference_runs_triton_refuses_with_a_type_error(op):
    """float64 everywhere (module and input): the reference computes it, an explicit ``impl="triton"``
    raises a TypeError naming the dtype before any kernel, ``impl="auto"`` on CPU runs the reference."""
    ref = _contract_outcome_f64(op, "reference")
    assert ref[:2] == ("ok", torch.float64), ref
    assert _contract_outcome_f64(op, "auto") == ref
    tri = _contract_outcome_f64(op, "triton")
    assert tri[:2] == ("raises", "TypeError"), tri


def _contract_outcome_f64(op, impl):
    from rspeft_fast.testing import run_fwd_bwd

    m = H.make(op).double()
    H.set_impl(m, impl)
    xs = [x.double() for x in H.inputs(op, m, 3)]
    return _outcome(lambda: run_fwd_bwd(m, *xs))


@pytest.mark.parametrize("op,kmod", [("mufa", "mufa"), ("qlinear", "qlinear"), ("eqam", "qlinear"), ("mga", "mga")])
def test_kernel_limits_reach_every_op(monkeypatch, op, kmod):
    """The kernel files' ``why_unsupported`` is consulted by every op: a reason makes an explicit
    ``impl="triton"`` raise ImplUnavailableError naming it before any launch."""
    import importlib

    k = importlib.import_module(f"rspeft_fast.kernels.{kmod}")
    monkeypatch.setattr(k, "why_unsupported", lambda **kw: "a test limit (shapes %s)" % sorted(kw))
    launched = []
    for name in list(vars(k)):
        if name.endswith("_kernel"):
            monkeypatch.setattr(k, name, launched)  # any launch would fail loudly (a list is not subscriptable by grid)
    m = H.make(op)
    with pytest.raises(ImplUnavailableError, match="a test limit"):
        m(*H.inputs(op, m, 3))
    assert launched == []
