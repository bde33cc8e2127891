"""Bit-level checks of the 16-bit stores of every Triton op: round to nearest even, as a GPU rounds.

Why these exist beside the 16-bit tests of each op: the shared accuracy rule (``assert_fused_close``: at most
2x eager's error in the same dtype) cannot tell a truncating float32 → bfloat16 store from a correctly rounded
one. Truncation is off by at most 1 ulp where rounding is off by ½, and the fused kernels skip eager's
intermediate roundings, so a truncating kernel still beats 2x eager (measured on this machine, 2026-12-01:
``test_mufa_16bit_cpu[bf16, d=96]`` passes with ``cast`` replaced by the interpreter's plain ``.to(bfloat16)``,
which truncates). So the rounding itself is checked here, exactly:

* the inputs are small integers times powers of two, so every product is exact in float32 and every float32
  accumulation is exact (sums stay below 2**24 units): the only rounding left is the kernel's final store;
* the stored 16-bit tensor must then equal, bit for bit, torch's conversion of the exact (float64) value;
* and, under the interpreter, the same launch with a truncating ``cast`` must fail that comparison: the check
  has teeth (fp16's plain cast rounds correctly in the interpreter, so that counter-check is bf16 only).

One test per kernel file and store: Q-Linear ``y`` (forward), ``dx`` and ``dw`` (backward); the MuFA / EQAM
bottleneck's saved ``pre``; the MGA per-sequence kernel's saved ``hpre``. Every other 16-bit store of these
kernels goes through the same ``kernels._launch.cast`` (MGA through ``_round_to``), whose rounding is checked on
edge values in ``tests/test_launch.py``.
"""
import pytest
import torch
import triton
import triton.language as tl

from rspeft_fast.kernels import _launch as L

DTYPES = [torch.bfloat16, torch.float16]


@triton.jit
def _truncating_cast(x, DTYPE: tl.constexpr, PREC: tl.constexpr):
    """What the kernels would do without the emulation: the interpreter's plain cast (truncates to bf16)."""
    return x.to(DTYPE)


def _ints(g, lo, hi, *shape, scale=1.0):
    """Integers in [lo, hi] times ``scale`` (a power of two), float64."""
    return torch.randint(lo, hi + 1, shape, generator=g).double() * scale


def _pow2_rows(g, n, k, qmax, scale):
    """A weight whose per-row absmax is ``qmax * scale`` (so Q-Linear's row scale is exactly ``scale``) and whose
    entries are integers times ``scale``: its quantised values equal it exactly."""
    w = _ints(g, -qmax, qmax, n, k, scale=scale)
    w[torch.arange(n), torch.randint(0, k, (n,), generator=g)] = qmax * scale * torch.where(
        torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    return w


def _check_bits(got: torch.Tensor, exact: torch.Tensor, name: str) -> None:
    want = exact.to(got.dtype)
    assert got.dtype == want.dtype and got.shape == want.shape
    inexact = float((want.double() != exact).double().mean())
    assert inexact > 0.2, f"{name}: only {inexact:.0%} of the values need rounding: the check would be weak"
    same = got.view(torch.int16) == want.view(torch.int16)
    assert bool(same.all()), (
        f"{name} ({got.dtype}): {int((~same).sum())}/{same.numel()} stores differ from round-to-nearest-even "
        f"of the exact value; first: got {float(got.flatten()[~same.flatten()][0])}, "
        f"want {float(want.flatten()[~same.flatten()][0])}")


def _with_teeth(monkeypatch, module, dtype, run, check):
    """``check(run())``, then (interpreter, bf16) the same with a truncating ``cast`` in ``module`` must fail."""
    check(run())
    if not L.INTERPRET or dtype != torch.bfloat16:
        return
    with monkeypatch.context() as m:
        m.setattr(module, "cast", _truncating_cast)
        with pytest.raises(AssertionError, match="differ from round-to-nearest-even"):
            check(run())


# ------------------------------------------------------------------------------------------------ Q-Linear
def _qlinear_case(device, dtype):
    from rspeft_fast.kernels import qlinear as K

    g = torch.Generator().manual_seed(1)
    m, n, k, bits = 70, 48, 160, 8
    qmax = K.qmax_of(bits)
    x = _ints(g, -8, 8, m, k)
    w = _pow2_rows(g, n, k, qmax, 2.0 ** -4)
    b = _ints(g, -64, 64, n, scale=2.0 ** -4)
    # the STE backward: dx = dy Wq, dW = dyᵀ x (Wq = w exactly here); dy's 8-bit integers / 32 make fp16's dW
    # need rounding too (integer sums would mostly fit its 11 bits)
    dy = _ints(g, -255, 255, m, n, scale=2.0 ** -5)
    to = dict(device=device, dtype=dtype)
    args = dict(x=x.to(**to), w=w.to(**to), b=b.to(**to), dy=dy.to(**to))
    assert all(torch.equal(t.double().cpu(), s) for t, s in zip(args.values(), (x, w, b, dy)))  # inputs exact
    return K, bits, args, dict(y=x @ w.T + b, dx=dy @ w, dw=dy.T @ x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_qlinear_forward_rounds_to_nearest_even(device, dtype, monkeypatch):
    K, bits, a, exact = _qlinear_case(device, dtype)
    scale = K.row_scales(a["w"], bits)

    def run():
        return K.qlinear_fwd(a["x"], a["w"], scale, a["b"], bits=bits)[0]

    _with_teeth(monkeypatch, K, dtype, run, lambda y: _check_bits(y.cpu(), exact["y"], "qlinear y"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_qlinear_backward_rounds_to_nearest_even(device, dtype, monkeypatch):
    K, bits, a, exact = _qlinear_case(device, dtype)
    scale = K.row_scales(a["w"], bits)

    def run():
        dx, dw, _ = K.qlinear_bwd(a["dy"], a["x"], a["w"], scale, None, bits=bits)
        return dx, dw

    def check(out):
        _check_bits(out[0].cpu(), exact["dx"], "qlinear dx")
        _check_bits(out[1].cpu(), exact["dw"], "qlinear dw")

    _with_teeth(monkeypatch, K, dtype, run, check)


# ------------------------------------------------------------------------------------------- MuFA / EQAM
@pytest.mark.parametrize("dtype", DTYPES)
def test_mufa_saved_preactivation_rounds_to_nearest_even(device, dtype, monkeypatch):
    from rspeft_fast.kernels import mufa as K

    g = torch.Generator().manual_seed(2)
    n, d, r = 37, 96, 40
    x = _ints(g, -8, 8, n, d)
    wd = _ints(g, -127, 127, r, d, scale=2.0 ** -4)
    bd = _ints(g, -64, 64, r, scale=2.0 ** -4)
    to = dict(device=device, dtype=dtype)
    wu = torch.randn(d, r).to(**to)
    bu = torch.randn(d).to(**to)
    cs = torch.rand(r, device=device)

    def run():
        return K.bottleneck_fwd(x.to(**to), wd.to(**to), bd.to(**to), wu, bu, cs, 0.5, save_pre=True)[1]

    _with_teeth(monkeypatch, K, dtype, run, lambda pre: _check_bits(pre.cpu(), x @ wd.T + bd, "mufa pre"))


# -------------------------------------------------------------------------------------------------- MGA
@pytest.mark.parametrize("dtype", DTYPES)
def test_mga_saved_down_projection_rounds_to_nearest_even(device, dtype, monkeypatch):
    from rspeft_fast.kernels import mga as K

    g = torch.Generator().manual_seed(3)
    B, Lq, D, H, NH = 2, 13, 64, 32, 4
    x = _ints(g, -8, 8, B, Lq, D)
    wd = _ints(g, -127, 127, H, D, scale=2.0 ** -4)
    bd = _ints(g, -64, 64, H, scale=2.0 ** -4)
    to = dict(device=device, dtype=dtype)

    def small(*shape):
        return (torch.randn(*shape) * 0.1).to(**to)

    weights = (wd.to(**to), bd.to(**to), small(D, H), small(D), small(3 * H, H), small(3 * H), small(H, H),
               small(H), torch.zeros(1, **to))
    plan = K.plan_for(x.shape, H, NH, None, dtype, torch.device(device), True)
    assert plan.path == "sequence"  # hpre is stored by the fused per-sequence kernel (the blocked path: a GEMM)

    def run():
        return K.mga_forward(x.to(**to), *weights, NH, save=True)[1].hpre

    # the MGA kernels store through _launch.round_to, whose cast is _launch's own: the teeth go there
    _with_teeth(monkeypatch, L, dtype, run, lambda h: _check_bits(h.cpu(), x @ wd.T + bd, "mga hpre"))
