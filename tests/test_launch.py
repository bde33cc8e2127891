"""The shared launch / numerics policy (kernels/_launch.py) and the launch plans of kernels/{mufa,qlinear}.py.

In-process tests run under Triton's interpreter (conftest.py sets TRITON_INTERPRET=1): the numerics helpers
(``cast`` rounds float32 → bfloat16 to nearest even like the GPU, ``dot`` widens 16-bit operands exactly), the
precision policy, device properties, pruning and splits. The plans for real GPUs are checked in a subprocess
without the interpreter (the kernel files choose their GPU config lists at import): every launch at every
SPEC §2 / edge shape gets a config whose shared-memory estimate fits each arch of ARCH_PROPS, in every dtype,
and on sm_90 the Q-Linear plans keep the tiles these kernels were AOT-checked with before plans existed.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from rspeft_fast.kernels import _launch as L

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- numerics
@triton.jit
def _cast_kernel(X, Y, N, PREC: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    m = i < N
    x = tl.load(X + i, mask=m, other=0.0)
    tl.store(Y + i, L.cast(x, Y.dtype.element_ty, PREC), mask=m)


@triton.jit
def _dot_kernel(A, B, C, PREC: tl.constexpr):
    i = tl.arange(0, 16)
    a = tl.load(A + i[:, None] * 16 + i[None, :])
    b = tl.load(B + i[:, None] * 16 + i[None, :])
    acc = tl.zeros((16, 16), dtype=tl.float32)
    tl.store(C + i[:, None] * 16 + i[None, :], L.dot(a, b, acc, PREC))


def _rounding_cases():
    """Random values plus the bf16/fp16 rounding edge cases: exact ties (to even, both parities), values just
    above / below a tie, the largest finite values, overflow to inf, subnormals, ±0, ±inf, NaN."""
    g = torch.Generator().manual_seed(0)
    rnd = torch.randn(900, generator=g) * torch.logspace(-6, 6, 900)
    one_bits = torch.tensor([1.0], dtype=torch.float32).view(torch.int32)
    ties = [(one_bits + (k << 16) + 0x8000).view(torch.float32) for k in range(4)]  # 1 + (k + 1/2) ulp(bf16)
    near = [(one_bits + 0x8000 + d).view(torch.float32) for d in (-1, 1)]
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 3.3895e38, 3.4e38, 1e-40, -1e-40, 65504.0,
                            65520.0, 5.96e-8, 1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11])
    return torch.cat([rnd, *ties, *near, special, torch.tensor([float("nan")])])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cast_rounds_to_nearest_even_like_torch(dtype):
    """Under the interpreter ``cast`` gives exactly torch's float32 → 16-bit conversion (round to nearest
    even, overflow to inf, NaN kept); a plain ``.to(bfloat16)`` there truncates (why the emulation exists)."""
    x = _rounding_cases()
    prec = L.precision(dtype)
    assert prec == "emulate"  # interpreter + 16-bit operands
    y = torch.empty(x.shape, dtype=dtype)
    _cast_kernel[(1,)](x, y, x.numel(), PREC=prec, BLOCK=triton.next_power_of_2(x.numel()))
    want = x.to(dtype)
    assert torch.equal(y.isnan(), want.isnan())
    assert torch.equal(y[~want.isnan()].view(torch.int16), want[~want.isnan()].view(torch.int16)), (
        f"{int((y[~want.isnan()].float() != want[~want.isnan()].float()).sum())} values rounded differently")


def test_plain_bf16_cast_truncates_in_the_interpreter():
    """The bug the emulation works around is still there (else ``cast``'s bit trick could go): truncation."""
    x = _rounding_cases()
    y = torch.empty(x.shape, dtype=torch.bfloat16)
    _cast_kernel[(1,)](x, y, x.numel(), PREC="ieee", BLOCK=triton.next_power_of_2(x.numel()))
    finite = x.isfinite() & (x.abs() < 3e38)
    assert not torch.equal(y[finite].float(), x[finite].to(torch.bfloat16).float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dot_policy_is_exact_for_16bit_operands(dtype):
    """``dot`` under the policy's PREC: 16-bit operands multiplied exactly (widened) with fp32 accumulation —
    within fp32 summation error of the float64 product; fp32 operands in IEEE precision."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(16, 16, generator=g).to(dtype)
    b = torch.randn(16, 16, generator=g).to(dtype)
    c = torch.empty(16, 16)
    _dot_kernel[(1,)](a, b, c, PREC=L.precision(dtype))
    ref = a.double() @ b.double()
    bound = 16 * 2.0 ** -23 * (a.double().abs() @ b.double().abs())  # 16 fp32 roundings of the partial sums
    assert ((c.double() - ref).abs() <= bound).all()


def test_precision_policy(monkeypatch):
    assert L.precision(torch.float32, tf32=False) == "ieee"
    assert L.precision(torch.float32, tf32=True) == "tf32"
    assert L.precision(torch.bfloat16, interpret=False) == "tf32"
    assert L.precision(torch.float16, interpret=True) == "emulate"
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert L.precision(torch.float32) == "tf32"
        torch.set_float32_matmul_precision("highest")
        assert L.precision(torch.float32) == "ieee"
    finally:
        torch.set_float32_matmul_precision(old)
    with pytest.raises(TypeError, match="float64"):
        L.precision(torch.float64)


# ------------------------------------------------------------------------------------ device / sizes
def test_arch_table_matches_the_cuda_guide():
    """Max opt-in shared memory per block (CUDA programming guide, compute capabilities table)."""
    want = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024,
            120: 99 * 1024}
    assert {a: p.smem_per_block for a, p in L.ARCH_PROPS.items()} == want
    assert all(p.arch == a and p.sm_count > 0 for a, p in L.ARCH_PROPS.items())
    assert L.props_for_arch(86) is L.ARCH_PROPS[86]
    with pytest.raises(ValueError, match="sm_70"):
        L.props_for_arch(70)


def test_device_props_cpu_is_the_nominal_sm90():
    p = L.device_props("cpu")
    assert p == L.INTERPRETER_PROPS
    assert (p.arch, p.smem_per_block) == (90, L.ARCH_PROPS[90].smem_per_block)
    assert L.device_props(torch.device("cpu")) is p


def test_device_props_reads_cuda_once(monkeypatch):
    """A CUDA device: major/minor, shared_memory_per_block_optin and multi_processor_count, cached per index."""
    calls = []

    class FakeProps:
        major, minor, shared_memory_per_block_optin, multi_processor_count = 8, 6, 101376, 82

    def fake(index):
        calls.append(index)
        return FakeProps()

    monkeypatch.setattr(torch.cuda, "get_device_properties", fake)
    monkeypatch.setattr(L, "_PROPS_CACHE", {})
    p = L.device_props(torch.device("cuda", 3))
    assert p == L.DeviceProps(86, 101376, 82)
    assert L.device_props("cuda:3") is p and calls == [3]


def test_device_props_without_optin_attribute(monkeypatch):
    """Older torch builds without ``shared_memory_per_block_optin``: the nominal value of the arch (or of the
    closest older known one)."""

    class FakeProps:
        major, minor, multi_processor_count = 8, 7, 16  # sm_87 (Jetson Orin): not in ARCH_PROPS

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: FakeProps())
    monkeypatch.setattr(L, "_PROPS_CACHE", {})
    assert L.device_props(0) == L.DeviceProps(87, L.ARCH_PROPS[86].smem_per_block, 16)


def test_prune_configs_keeps_at_least_one():
    cfgs = [triton.Config({"B": b}) for b in (64, 128, 256)]
    props = L.DeviceProps(86, 1000, 10)
    est = lambda c: c.kwargs["B"] * 8  # noqa: E731  512, 1024, 2048 bytes
    assert [c.kwargs["B"] for c in L.prune_configs(cfgs, est, props)] == [64]
    assert [c.kwargs["B"] for c in L.prune_configs(cfgs, est, L.DeviceProps(90, 5000, 10))] == [64, 128, 256]
    assert [c.kwargs["B"] for c in L.prune_configs(cfgs, est, L.DeviceProps(75, 100, 10))] == [64]  # none fit
    with pytest.raises(ValueError):
        L.prune_configs([], est, props)


def test_autotune_pruner_reads_the_launch_device():
    cfgs = [triton.Config({"B": b}) for b in (64, 128)]
    prune = L.autotune_pruner(lambda c, args: c.kwargs["B"] * args["N"])
    out = prune(cfgs, {}, x=torch.empty(1), N=1000)  # CPU tensor -> nominal sm_90 (232448 B)
    assert [c.kwargs["B"] for c in out] == [64, 128]
    out = prune(cfgs, {}, x=torch.empty(1), N=3000)
    assert [c.kwargs["B"] for c in out] == [64]


@pytest.mark.parametrize("n,lo,hi,want", [(1, 16, None, 16), (17, 16, None, 32), (200, 16, 128, 128), (3, 1, 16, 4)])
def test_pad_pow2(n, lo, hi, want):
    assert L.pad_pow2(n, lo, hi) == want


@pytest.mark.parametrize("n_rows,tiles,granule", [(12608, 12, 128), (3136, 1, 256), (1, 4, 128), (200704, 2, 64)])
def test_split_rows_covers_every_row_once(n_rows, tiles, granule):
    for props in L.ARCH_PROPS.values():
        rows, splits = L.split_rows(n_rows, tiles, props, granule)
        assert rows % granule == 0 and splits >= 1
        assert (splits - 1) * rows < n_rows <= splits * rows  # every split non-empty, all rows covered
        assert splits <= max(1, 2 * props.sm_count // tiles)


def test_arch_unsupported_reasons():
    ok = L.ARCH_PROPS[86]
    assert L.arch_unsupported(torch.bfloat16, ok) is None
    assert "float64" in L.arch_unsupported(torch.float64, ok)
    assert "sm_70" in L.arch_unsupported(torch.float16, L.DeviceProps(70, 98304, 80))
    assert "bfloat16" in L.arch_unsupported(torch.bfloat16, L.ARCH_PROPS[75])
    assert L.arch_unsupported(torch.bfloat16, L.ARCH_PROPS[75], bf16_min_arch=0) is None


@pytest.mark.parametrize("mod", ["mufa", "qlinear"])
def test_why_unsupported(mod):
    import importlib

    K = importlib.import_module(f"rspeft_fast.kernels.{mod}")
    assert K.why_unsupported(dtype=torch.bfloat16, props=L.ARCH_PROPS[86], n=13, d=96) is None
    assert "sm_70" in K.why_unsupported(dtype=torch.float32, props=L.DeviceProps(70, 98304, 80))
    assert "float64" in K.why_unsupported(dtype=torch.float64, props=L.ARCH_PROPS[90])


# ------------------------------------------------------------------------------ plans (GPU config lists)
_PLAN_CHECK = r"""
import json, torch
from rspeft_fast.kernels import _launch as L, mufa as M, qlinear as Q
out = dict(checked=0, problems=[], sm90_qlinear={})
for arch, props in L.ARCH_PROPS.items():
    for dt in ("bf16", "fp16", "fp32", "tf32"):
        tdt, _ = L.aot_dtype(dt)
        for la in M.aot_launches(props, dt, "full"):
            a = la.args
            if la.kernel.endswith(("_bwd_finalize_kernel", "_bwd_gate_kernel")):
                continue  # no tile parameters to plan; their shared memory is checked by the AOT compile (test_aot)
            if la.kernel.endswith("_atb_splitk_kernel"):
                est = lambda c: M._atb_smem(c, a["a_ptr"].dtype, a["b_ptr"].dtype, props)
            else:
                est = lambda c: M._row_smem(c, a["D"], a["R"], tdt, "bwd" in la.kernel, props)
            out["checked"] += 1
            if not la.configs or est(la.configs[0]) > props.smem_per_block:
                out["problems"].append(f"sm_{arch} {la.kernel} [{la.case}]: no config fits")
        for label, k, n, m, gelu, _ in Q.AOT_CASES:
            plans = dict(fwd=Q.plan_fwd(m, n, k, tdt, props), dx=Q.plan_bwd_dx(m, n, k, tdt, props, gelu=gelu),
                         dw=Q.plan_bwd_dw(m, n, k, tdt, props).tiles)
            for name, p in plans.items():
                out["checked"] += 1
                if p.smem > props.smem_per_block:
                    out["problems"].append(f"sm_{arch} qlinear {name} [{dt} {label}]: {p.smem} B")
            if arch == 90:
                out["sm90_qlinear"][f"{dt} {label}"] = {k_: list(v[:5]) for k_, v in plans.items()}
print(json.dumps(out))
"""


def test_plans_fit_every_arch_and_keep_the_sm90_tiles():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    p = subprocess.run([sys.executable, "-c", _PLAN_CHECK], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["checked"] > 500, res["checked"]
    assert not res["problems"], "\n".join(res["problems"])
    # the tiles the Q-Linear launchers used before plans (sm_90 AOT-checked): (BM, BN, BK, warps, stages)
    pow2 = lambda n, lo, hi: max(lo, min(hi, triton.next_power_of_2(n)))  # noqa: E731
    from rspeft_fast.kernels.qlinear import AOT_CASES

    for label, k, n, m, gelu, _ in AOT_CASES:
        for dt in ("bf16", "fp32"):
            got = res["sm90_qlinear"][f"{dt} {label}"]
            bm = 128 if m >= 128 else pow2(m, 16, 128)
            bn, bk = pow2(n, 16, 128), pow2(k, 16, 64)
            assert got["fwd"] == [bm, bn, bk, 8 if bm * bn >= 128 * 128 else 4, 3], (dt, label, got)
            bk, bn = pow2(k, 16, 128), pow2(n, 16, 64)
            # fp32 dX had 2 stages everywhere (3 were over sm_90 at 1024->256 with GELU); the plan keeps 3 where
            # its estimate fits
            assert got["dx"][:4] == [bm, bn, bk, 8 if bm * bk >= 128 * 128 else 4], (dt, label, got)
            assert got["dx"][4] == 3 or (dt == "fp32" and got["dx"][4] == 2), (dt, label, got)
            bn, bk = pow2(n, 16, 128), pow2(k, 16, 128)
            assert got["dw"] == [64, bn, bk, 8 if bn * bk >= 128 * 128 else 4, 3], (dt, label, got)


def test_sm75_plans_size_16bit_operands_as_fp32():
    """Before sm_80 the dots are FMAs on fp32-staged operands (no tensor cores): the plans size 16-bit tiles as
    fp32 ones. Found by the full AOT profile on sm_75: the MGA text+BiShare per-sequence forward planned for
    bf16 needed 131072 B and the L 577 head-dim-128 attention backward 98304 B, over sm_75's 65536 B."""
    from rspeft_fast.kernels import attention as A, mga as G

    sm75, sm86 = L.ARCH_PROPS[75], L.ARCH_PROPS[86]
    assert L.operand_bytes(torch.bfloat16, sm75) == L.operand_bytes(torch.float16, sm75) == 4
    assert L.operand_bytes(torch.bfloat16, sm86) == 2 and L.operand_bytes(torch.float32, sm86) == 4
    for dt in (torch.float16, torch.bfloat16):
        assert A.plan_attention(577, 128, dt, sm75) == A.plan_attention(577, 128, torch.float32, sm75)
        text = G.plan_mga(77, 512, 128, 8, 64, 8, dt, sm75, train=False)
        assert text == G.plan_mga(77, 512, 128, 8, 64, 8, torch.float32, sm75, train=False)
        assert A.plan_attention(577, 128, dt, sm86) != A.plan_attention(577, 128, torch.float32, sm86)
