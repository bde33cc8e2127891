"""Property-based tests (hypothesis) of every fused op against its eager reference (issue 9, item 5).

Random shapes (ragged feature sizes, leading shapes incl. none, 0 and 1 rows), strides (contiguous,
transposed views, strided slices, stride-0 expansions), dtypes (float32 mostly, float16 / bfloat16),
and each op's options; forward AND every gradient (gradients flow back through the views to the
tensors they were taken from). float32 is compared elementwise with fp32 tolerances; 16-bit results are
compared with a float32 reference on the same (rounded) values and may be off by at most a small multiple
of what eager PyTorch in that dtype gets wrong (the flash-attention rule) plus a floor.

Deterministic (``derandomize=True``) so CI is reproducible; few examples per op (the Triton interpreter
is slow). Each test asserts how many examples it ran and prints it (``pytest -s``); run with
``--hypothesis-show-statistics`` for the per-example ``event`` tallies (dtype, layout, sizes).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, event, example, given, settings
from hypothesis import strategies as st

import _helpers as H
from rspeft_fast.testing import TOLERANCES, assert_fused_close

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPES = st.sampled_from([F32, F32, F32, F16, BF16])
LAYOUTS = st.sampled_from(["contig", "transposed", "strided", "rowstep", "expanded"])


def _settings(n):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    phases=(Phase.explicit, Phase.generate),  # no shrinking: the interpreter is slow
                    suppress_health_check=list(HealthCheck))


# ----------------------------------------------------------------------------------------- layouts
def make_input(shape, layout, seed, scale=1.0):
    """``(src, view)``: ``view(src)`` has ``shape`` and the requested memory layout; ``src`` is the leaf
    that receives the gradient."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(shape)
    nd = len(shape)
    if layout == "transposed" and nd >= 2:
        sw = shape[:-2] + (shape[-1], shape[-2])
        return torch.randn(sw, generator=g) * scale, lambda s: s.transpose(-1, -2)
    if layout == "strided" and nd >= 1:  # last-dim stride 2
        return torch.randn(shape[:-1] + (2 * shape[-1],), generator=g) * scale, lambda s: s[..., ::2]
    if layout == "rowstep" and nd >= 2:  # every other row of a taller tensor
        return torch.randn((2 * shape[0],) + shape[1:], generator=g) * scale, lambda s: s[::2]
    if layout == "expanded" and nd >= 2:  # stride 0 over the first axis
        return torch.randn((1,) + shape[1:], generator=g) * scale, lambda s: s.expand(shape)
    return torch.randn(shape, generator=g) * scale, lambda s: s


def run(fn, srcs_views, params, dtype, dy_seed=7):
    """Forward + backward of ``fn(*views, *params)`` with leaves cast to ``dtype``; returns (y, grads of
    the sources and params)."""
    srcs = [s.detach().to(dtype).requires_grad_() for s, _ in srcs_views]
    xs = [v(s) for s, (_, v) in zip(srcs, srcs_views)]
    ps = [None if p is None else p.detach().to(dtype).requires_grad_() for p in params]
    y = fn(*xs, *ps)
    g = torch.Generator().manual_seed(dy_seed)
    dy = torch.randn(y.shape, generator=g).to(y.dtype)
    y.backward(dy)
    return y.detach(), [t.grad for t in srcs + ps if t is not None]


def fused_eager_ref32(fused, ref, srcs_views, params, dtype):
    """``(fused, eager, ref32)`` results of :func:`run`: the fused op and the eager reference in ``dtype``, and
    the reference in float32 on the same (``dtype``-rounded) values (eager itself when ``dtype`` is float32)."""
    out_f = run(fused, srcs_views, params, dtype)
    out_e = run(ref, srcs_views, params, dtype)
    if dtype == F32:
        return out_f, out_e, out_e
    rounded = [(s.to(dtype).float(), v) for s, v in srcs_views]
    return out_f, out_e, run(ref, rounded, [None if p is None else p.to(dtype).float() for p in params], F32)


def compare(fused, eager, ref32, dtype, what, factor=3.0):
    """``fused``/``eager`` (y, grads) in ``dtype``; ``ref32`` the float32 reference on the same values.

    float32: elementwise against eager (4x the fp32 tolerances, scaled by magnitude); 16-bit: the
    flash-attention rule of :func:`rspeft_fast.testing.assert_fused_close` (``factor`` x eager's error
    + 1 ulp of |ref|; the interpreter rounds to bf16/fp16 as the GPU does, ``kernels/_launch.py``)."""
    (y, g), (ye, ge), (yr, gr) = fused, eager, ref32
    pairs = [("y", y, ye, yr)] + [(f"grad {i}", a, e, r) for i, (a, e, r) in enumerate(zip(g, ge, gr))]
    assert len(g) == len(ge) == len(gr), what
    for name, a, e, r in pairs:
        assert a is not None and e is not None, f"{what} {name}: missing"
        assert a.shape == e.shape and a.dtype == e.dtype, f"{what} {name}: {a.shape} {a.dtype} vs {e.shape} {e.dtype}"
        assert torch.isfinite(a).all(), f"{what} {name}: non-finite"
        if a.numel() == 0:
            continue
        if dtype in (F32, torch.float64):
            atol, rtol = TOLERANCES[dtype]
            H.magnitude_close(a, e, 4 * atol, 4 * rtol, f"{what} {name}")
            continue
        assert_fused_close(a, e, r, factor=factor, floor_ulps=1, name=f"{what} {name}")


def _count(name, counter, minimum):
    print(f"[hypothesis] {name}: {len(counter)} examples")
    assert len(counter) >= minimum, f"{name}: only {len(counter)} examples ran"


def _lead(draw, max_rows):
    """A leading shape: none, (n,), or (a, b), with 0 and 1 rows likely."""
    kind = draw(st.sampled_from(["none", "1d", "1d", "2d"]))
    if kind == "none":
        return ()
    n = draw(st.one_of(st.sampled_from([0, 1, 2]), st.integers(0, max_rows)))
    if kind == "1d":
        return (n,)
    return (draw(st.integers(0, 4)), max(n // 4, 1))


# ========================================================================================== MuFA
@st.composite
def mufa_cases(draw):
    d = draw(st.sampled_from([8, 12, 20, 24, 36, 40, 48, 72, 96]))
    rates = draw(st.lists(st.sampled_from([r for r in (2, 3, 4, 6, 8, 12) if d % r == 0]), min_size=1,
                          max_size=3, unique=True))
    return dict(d=d, rates=tuple(rates), lead=_lead(draw, 90), layout=draw(LAYOUTS), dtype=draw(DTYPES),
                scale=draw(st.sampled_from([1.0, 0.5, -2.0])), base=draw(st.booleans()),
                save_pre=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


def test_mufa_properties():
    from rspeft_fast.ops.mufa import mufa
    from rspeft_fast.reference.mufa import branch_sizes, mufa_ref

    ran = []

    @_settings(25)
    @given(c=mufa_cases())
    @example(c=dict(d=24, rates=(4, 8), lead=(0,), layout="contig", dtype=F32, scale=1.0, base=True, save_pre=True, seed=1))
    @example(c=dict(d=40, rates=(8,), lead=(1,), layout="strided", dtype=F16, scale=0.5, base=False, save_pre=False, seed=2))
    @example(c=dict(d=48, rates=(4, 8, 12), lead=(3, 7), layout="transposed", dtype=BF16, scale=1.0, base=True, save_pre=True, seed=3))
    @example(c=dict(d=36, rates=(3,), lead=(70,), layout="expanded", dtype=F32, scale=-2.0, base=False, save_pre=True, seed=4))
    def check(c):
        ran.append(1)
        d, dtype = c["d"], c["dtype"]
        sizes = branch_sizes(d, c["rates"])
        r = sum(sizes)
        shape = c["lead"] + (d,)
        event(f"dtype={dtype}"), event(f"layout={c['layout']}"), event(f"rows={math.prod(c['lead'])}")
        torch.manual_seed(c["seed"])
        params = [torch.randn(r, d) * d ** -0.5, torch.randn(r) * 0.3, torch.randn(d, r) * r ** -0.5,
                  torch.randn(d) * 0.3, torch.rand(len(sizes)) * 1.5 - 0.3]
        inputs = [make_input(shape, c["layout"], c["seed"])]
        if c["base"]:
            inputs.append(make_input(shape, "contig", c["seed"] + 1))
        sc, sp = c["scale"], c["save_pre"]

        def fused(x, *rest):
            base = rest[0] if c["base"] else None
            ps = rest[1:] if c["base"] else rest
            return mufa(x, *ps, sizes, sc, base, sp)

        def ref(x, *rest):
            base = rest[0] if c["base"] else None
            ps = rest[1:] if c["base"] else rest
            return mufa_ref(x, *ps, sizes, sc, base)

        compare(*fused_eager_ref32(fused, ref, inputs, params, dtype), dtype, f"mufa {c}")

    check()
    _count("mufa", ran, 25)


# ========================================================================================== QLinear
@st.composite
def qlinear_cases(draw):
    return dict(fin=draw(st.integers(1, 80)), fout=draw(st.integers(1, 72)), bits=draw(st.integers(2, 8)),
                bias=draw(st.booleans()), gelu=draw(st.booleans()), lead=_lead(draw, 150), layout=draw(LAYOUTS),
                dtype=draw(DTYPES), seed=draw(st.integers(0, 2**16)))


def test_qlinear_properties():
    from rspeft_fast.ops.qlinear import qlinear
    from rspeft_fast.reference.qlinear import qlinear_ref

    ran = []

    @_settings(25)
    @given(c=qlinear_cases())
    @example(c=dict(fin=13, fout=7, bits=4, bias=True, gelu=True, lead=(0,), layout="contig", dtype=F32, seed=1))
    @example(c=dict(fin=1, fout=1, bits=2, bias=False, gelu=False, lead=(1,), layout="transposed", dtype=F32, seed=2))
    @example(c=dict(fin=77, fout=33, bits=8, bias=True, gelu=True, lead=(2, 65), layout="strided", dtype=BF16, seed=3))
    @example(c=dict(fin=40, fout=24, bits=3, bias=True, gelu=False, lead=(129,), layout="expanded", dtype=F16, seed=4))
    def check(c):
        ran.append(1)
        dtype = c["dtype"]
        event(f"dtype={dtype}"), event(f"layout={c['layout']}"), event(f"bits={c['bits']}")
        torch.manual_seed(c["seed"])
        params = [torch.randn(c["fout"], c["fin"]) * c["fin"] ** -0.5, torch.randn(c["fout"]) * 0.3 if c["bias"] else None]
        inputs = [make_input(c["lead"] + (c["fin"],), c["layout"], c["seed"])]
        bits, gelu = c["bits"], c["gelu"]

        def fused(x, w, b=None):
            return qlinear(x, w, b, bits, gelu)

        def ref(x, w, b=None):
            y = qlinear_ref(x, w, b, bits)
            return F.gelu(y) if gelu else y

        compare(*fused_eager_ref32(fused, ref, inputs, params, dtype), dtype, f"qlinear {c}")

    check()
    _count("qlinear", ran, 25)


# ========================================================================================== EQAM
@st.composite
def eqam_cases(draw):
    return dict(d=draw(st.integers(2, 96)), r=draw(st.integers(1, 40)), bits=draw(st.integers(2, 8)),
                down_bias=draw(st.booleans()), up_bias=draw(st.booleans()), lead=_lead(draw, 120),
                layout=draw(LAYOUTS), dtype=draw(DTYPES), seed=draw(st.integers(0, 2**16)))


def test_eqam_properties():
    from rspeft_fast.ops.qlinear import eqam
    from rspeft_fast.reference.qlinear import eqam_ref

    ran = []

    @_settings(20)
    @given(c=eqam_cases())
    @example(c=dict(d=64, r=16, bits=8, down_bias=True, up_bias=True, lead=(0,), layout="contig", dtype=F32, seed=1))
    @example(c=dict(d=13, r=3, bits=4, down_bias=False, up_bias=True, lead=(1,), layout="transposed", dtype=F32, seed=2))
    @example(c=dict(d=96, r=24, bits=8, down_bias=True, up_bias=False, lead=(3, 11), layout="strided", dtype=BF16, seed=3))
    def check(c):
        ran.append(1)
        dtype, d, r = c["dtype"], c["d"], c["r"]
        event(f"dtype={dtype}"), event(f"layout={c['layout']}")
        torch.manual_seed(c["seed"])
        params = [torch.randn(r, d) * d ** -0.5, torch.randn(r) * 0.3 if c["down_bias"] else None,
                  torch.randn(d, r) * r ** -0.5, torch.randn(d) * 0.3 if c["up_bias"] else None]
        inputs = [make_input(c["lead"] + (d,), c["layout"], c["seed"])]
        bits = c["bits"]
        mask = [p is not None for p in params]

        def unflatten(ps):
            it = iter(ps)
            return [next(it) if keep else None for keep in mask]

        def fused(x, *ps):
            return eqam(x, *unflatten(ps), bits)

        def ref(x, *ps):
            return eqam_ref(x, *unflatten(ps), bits)

        present = [p for p in params if p is not None]
        compare(*fused_eager_ref32(fused, ref, inputs, present, dtype), dtype, f"eqam {c}")

    check()
    _count("eqam", ran, 20)


# ========================================================================================== MGA
_MGA_HEADS = {16: [1, 2], 32: [1, 2, 4]}  # head dims 8, 16, 32
_SHARE_HEADS = {16: [1], 32: [1, 2]}  # BiShare hidden/2 = 8 or 16


@st.composite
def mga_cases(draw):
    hidden = draw(st.sampled_from([16, 32]))
    share = draw(st.booleans())
    L = draw(st.one_of(st.integers(1, 9), st.sampled_from([1, 17, 33])))
    B = draw(st.sampled_from([0, 1, 1, 2, 3]))
    mask = draw(st.booleans()) and L > 1 and B > 0
    return dict(B=B, L=L, D=draw(st.integers(4, 56)), hidden=hidden, heads=draw(st.sampled_from(_MGA_HEADS[hidden])),
                share=share, share_heads=draw(st.sampled_from(_SHARE_HEADS[hidden])), mask=mask,
                layout=draw(LAYOUTS), dtype=draw(DTYPES), seed=draw(st.integers(0, 2**16)))


def _mga_params(c):
    hidden, D = c["hidden"], c["D"]
    h2 = hidden // 2

    def lin(o, i):
        return [torch.randn(o, i) * i ** -0.5, torch.randn(o) * 0.3]

    ps = lin(hidden, D) + lin(D, hidden) + lin(3 * hidden, hidden) + lin(hidden, hidden) + [torch.rand(()) * 2 - 1]
    if c["share"]:
        ps += lin(h2, hidden) + lin(hidden, h2) + lin(3 * h2, h2) + lin(h2, h2) + [torch.rand(()) * 2 - 1]
    return ps


def _mga_call(fn, c, mask):
    def call(x, *ps):
        dw, db, uw, ub, iw, ib, ow, ob, gate = ps[:9]
        attn = dict(in_proj_weight=iw, in_proj_bias=ib, out_proj_weight=ow, out_proj_bias=ob)
        share = None
        if c["share"]:
            sdw, sdb, suw, sub, siw, sib, sow, sob, sg = ps[9:]
            share = dict(down_weight=sdw, down_bias=sdb, up_weight=suw, up_bias=sub, gate=sg, heads=c["share_heads"],
                         attn=dict(in_proj_weight=siw, in_proj_bias=sib, out_proj_weight=sow, out_proj_bias=sob))
        return fn(x, dw, db, uw, ub, attn, gate, c["heads"], share=share, key_padding_mask=mask)
    return call


def test_mga_properties():
    from rspeft_fast.ops.mga import mga
    from rspeft_fast.reference.mga import mga_ref

    ran = []

    @_settings(15)
    @given(c=mga_cases())
    @example(c=dict(B=0, L=5, D=24, hidden=16, heads=2, share=True, share_heads=1, mask=False, layout="contig", dtype=F32, seed=1))
    @example(c=dict(B=1, L=1, D=9, hidden=32, heads=4, share=False, share_heads=1, mask=False, layout="transposed", dtype=F32, seed=2))
    @example(c=dict(B=2, L=7, D=40, hidden=32, heads=2, share=True, share_heads=2, mask=True, layout="strided", dtype=BF16, seed=3))
    @example(c=dict(B=3, L=6, D=17, hidden=16, heads=1, share=True, share_heads=1, mask=True, layout="expanded", dtype=F16, seed=4))
    def check(c):
        ran.append(1)
        dtype = c["dtype"]
        event(f"dtype={dtype}"), event(f"layout={c['layout']}"), event(f"B={c['B']}"), event(f"share={c['share']}")
        torch.manual_seed(c["seed"])
        params = _mga_params(c)
        mask = None
        if c["mask"]:
            mask = torch.rand(c["B"], c["L"]) < 0.3
            mask[:, 0] = False  # at least one valid key per sequence (all-padded rows are NaN by definition)
        inputs = [make_input((c["B"], c["L"], c["D"]), c["layout"], c["seed"])]
        compare(*fused_eager_ref32(_mga_call(mga, c, mask), _mga_call(mga_ref, c, mask), inputs, params, dtype),
                dtype, f"mga {c}")

    check()
    _count("mga", ran, 15)


# ========================================================================================== triplet
@st.composite
def triplet_cases(draw):
    B = draw(st.one_of(st.sampled_from([1, 2]), st.integers(1, 40)))
    return dict(B=B, D=draw(st.integers(1, 40)), margin=draw(st.sampled_from([0.0, 0.2, 0.5])),
                gamma=draw(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0])), max_violation=draw(st.booleans()),
                ids=draw(st.booleans()), layout=draw(st.sampled_from(["contig", "transposed", "strided", "rowstep"])),
                dtype=draw(st.sampled_from([F32, F32, torch.float64, F16, BF16])), seed=draw(st.integers(0, 2**16)))


def test_triplet_properties():
    from rspeft_fast.ops.triplet import weighted_triplet_loss

    impl = H.require_triplet_fused()
    ran = []

    @_settings(25)
    @given(c=triplet_cases())
    @example(c=dict(B=1, D=8, margin=0.2, gamma=2.0, max_violation=True, ids=False, layout="contig", dtype=F32, seed=1))
    @example(c=dict(B=33, D=5, margin=0.5, gamma=0.5, max_violation=False, ids=True, layout="transposed", dtype=BF16, seed=2))
    @example(c=dict(B=17, D=40, margin=0.2, gamma=2.0, max_violation=True, ids=True, layout="strided", dtype=F16, seed=3))
    def check(c):
        ran.append(1)
        dtype = c["dtype"]
        event(f"dtype={dtype}"), event(f"max_violation={c['max_violation']}"), event(f"layout={c['layout']}")
        torch.manual_seed(c["seed"])
        ids = torch.randint(0, max(1, c["B"] // 2), (c["B"],)) if c["ids"] else None
        shape = (c["B"], c["D"])

        # features of norm ~1 (the caller L2-normalises; any scale is valid input for the maths)
        inputs = [make_input(shape, c["layout"], c["seed"] + k, scale=c["D"] ** -0.5) for k in (0, 1)]
        kw = dict(margin=c["margin"], gamma=c["gamma"], max_violation=c["max_violation"], ids=ids)

        def fused(img, txt):
            return weighted_triplet_loss(img, txt, impl=impl, **kw)

        def ref(img, txt):
            return weighted_triplet_loss(img, txt, impl="reference", **kw)

        out_f = run(fused, inputs, [], dtype)
        out_e = run(ref, inputs, [], dtype)
        # both upcast to float32 (float64 for float64 input), so eager is the fp32-accumulated oracle
        (y, g), (ye, ge) = out_f, out_e
        assert y.dtype == ye.dtype
        acc = torch.float64 if dtype == torch.float64 else F32
        atol, rtol = TOLERANCES[acc]
        H.magnitude_close(y, ye, 10 * atol, 10 * rtol, f"triplet loss {c}")
        for i, (a, e) in enumerate(zip(g, ge)):
            assert a.dtype == e.dtype == dtype
            if dtype in (F16, BF16):  # one rounding of an fp32-accumulated gradient
                H.magnitude_close(a, e, TOLERANCES[dtype][0], TOLERANCES[dtype][1], f"triplet grad {i} {c}")
            else:
                H.magnitude_close(a, e, 10 * atol, 10 * rtol, f"triplet grad {i} {c}")

    check()
    _count("triplet", ran, 25)
