"""Weighted triplet loss (SPEC §1): the C++ extension (impl="cpu"; impl="cuda" under @gpu) against the
eager reference, forward and both gradients, sum and hard-mining modes, with and without ids."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rspeft_fast import _native
from rspeft_fast._impl import ImplUnavailableError
from rspeft_fast.modules.triplet import WeightedTripletLoss
from rspeft_fast.ops.triplet import _triplet_fwd, weighted_triplet_loss
from rspeft_fast.reference.triplet import weighted_triplet_local_ref, weighted_triplet_ref
from rspeft_fast.testing import assert_close, assert_fused_close

FLOOR_ULPS = 4



def test_extension_is_built():
    """A missing or broken ``rspeft_fast._C`` fails the suite (every test below fails too, never skips)."""
    ok, why = _native.has("cpu")
    assert ok, why


def make(B, D, dtype=torch.float32, device="cpu", ids=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=-1)
    # pull the pairs together a little so that the hinge is active for some entries and not for others
    txt = F.normalize(txt + 0.3 * img, dim=-1)
    if ids == "dup":  # repeated ids: several positives per row (HarMA: several captions per image)
        ids_t = torch.randint(0, max(1, B // 3), (B,), generator=g)
    else:
        ids_t = None
    img = img.to(dtype).to(device).requires_grad_()
    txt = txt.to(dtype).to(device).requires_grad_()
    return img, txt, None if ids_t is None else ids_t.to(device)


def _f64_leaves(*ts):
    """float64 leaves of the same values (the gold reference's inputs)."""
    return [t.detach().double().requires_grad_() for t in ts]


def loss_and_grads(fn, img, txt):
    loss = fn(img, txt)
    gi, gt = torch.autograd.grad(loss, (img, txt))
    return loss.detach(), gi, gt


def check_vs_reference(impl, B, D, mv, ids, margin=0.2, gamma=2.0, chunk=None, dtype=torch.float32, device="cpu"):
    """Kernel in `dtype` vs the float64 reference; allowed error: 2x the eager reference's own error in
    `dtype` (flash-attention's rule) plus a floor."""
    img, txt, ids_t = make(B, D, dtype, device, ids)
    kw = dict(margin=margin, gamma=gamma, max_violation=mv, ids=ids_t)
    out = loss_and_grads(lambda a, b: weighted_triplet_loss(a, b, impl=impl, chunk_elems=chunk, **kw), img, txt)
    ref = loss_and_grads(lambda a, b: weighted_triplet_ref(a, b, **kw), img, txt)
    gold = loss_and_grads(lambda a, b: weighted_triplet_ref(a, b, **kw), *_f64_leaves(img, txt))
    for name, a, r, g in zip(("loss", "grad_img", "grad_txt"), out, ref, gold):
        assert a.dtype == r.dtype, f"{name}: dtype {a.dtype} != reference {r.dtype}"
    assert_fused_close(list(out), list(ref), list(gold), factor=2.0, floor_ulps=FLOOR_ULPS, name=f"triplet {impl}")
    return out, ref


# ----------------------------------------------------------------------------- CPU kernel (CI)
@pytest.mark.parametrize("B", [1, 2, 3, 17, 64, 130, 300])
@pytest.mark.parametrize("mv", [False, True], ids=["sum", "max"])
@pytest.mark.parametrize("ids", [None, "dup"], ids=["noids", "ids"])
@pytest.mark.parametrize("chunk", [None, 97], ids=["onechunk", "chunked"])
def test_cpu_matches_reference(B, mv, ids, chunk):
    check_vs_reference("cpu", B, 33, mv, ids, chunk=chunk)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 3.0, 1.7])
@pytest.mark.parametrize("margin", [0.05, 0.2, 0.6])
@pytest.mark.parametrize("mv", [False, True], ids=["sum", "max"])
def test_cpu_gamma_margin(gamma, margin, mv):
    check_vs_reference("cpu", 45, 20, mv, "dup", margin=margin, gamma=gamma, chunk=200)


@pytest.mark.parametrize("mv", [False, True], ids=["sum", "max"])
def test_cpu_float64_exact(mv):
    """float64 runs the same algorithm in double: agreement to ~1e-12 shows the maths, not rounding luck."""
    img, txt, ids = make(77, 24, torch.float64, ids="dup")
    kw = dict(max_violation=mv, ids=ids)
    out = loss_and_grads(lambda a, b: weighted_triplet_loss(a, b, impl="cpu", chunk_elems=300, **kw), img, txt)
    ref = loss_and_grads(lambda a, b: weighted_triplet_ref(a, b, **kw), img, txt)
    for name, a, r in zip(("loss", "grad_img", "grad_txt"), out, ref):
        assert a.dtype == torch.float64
        assert_close(a, r, atol=1e-12, rtol=1e-10, name=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mv", [False, True], ids=["sum", "max"])
def test_cpu_low_precision_inputs(dtype, mv):
    (loss, gi, gt), _ = check_vs_reference("cpu", 96, 40, mv, None, dtype=dtype)
    assert loss.dtype == torch.float32 and gi.dtype == dtype and gt.dtype == dtype


@pytest.mark.parametrize("mv", [False, True], ids=["sum", "max"])
def test_cpu_ties_lowest_index(mv):
    """Exact ties: duplicated captions (equal columns of S), a row with no violation (all zeros) and a
    negative margin (everything clamped). Lowest index wins in both the reference and the kernel, so
    even float64 agrees to rounding, gradients included."""
    img, txt, _ = make(40, 16, torch.float64)
    with torch.no_grad():
        txt[7] = txt[3]
        txt[12] = txt[3]
        img[20] = img[5]
        img[30] = txt[30]  # perfectly matched pair: row 30 may have no violation at all
    for margin in (0.2, -3.0):
        for gamma in (2.0, 0.0):
            kw = dict(margin=margin, gamma=gamma, max_violation=mv)
            out = loss_and_grads(lambda a, b: weighted_triplet_loss(a, b, impl="cpu", chunk_elems=90, **kw), img, txt)
            ref = loss_and_grads(lambda a, b: weighted_triplet_ref(a, b, **kw), img, txt)
            for name, a, r in zip(("loss", "grad_img", "grad_txt"), out, ref):
                assert_close(a, r, atol=1e-12, rtol=1e-10, name=f"{name} margin={margin} gamma={gamma}")


def test_reference_tie_rule_is_first_index():
    """The reference's explicit rule: the gradient of a tied max goes to the lowest index."""
    img = torch.eye(3, 4, dtype=torch.float64)
    txt = torch.eye(3, 4, dtype=torch.float64).requires_grad_()
    # S = I: every off-diagonal cost is margin - 1 = 0.5 (a 2-way tie per row and per column)
    loss = weighted_triplet_ref(img, txt, margin=1.5, gamma=0.0, max_violation=True)
    (g,) = torch.autograd.grad(loss, txt)
    # row i: lowest j != i; column j: lowest i != j. Row 0 → column 1, rows 1, 2 → column 0.
    exp_cols = torch.tensor([1, 0, 0])
    exp_rows = torch.tensor([1, 0, 0])  # column 0 → row 1, columns 1, 2 → row 0
    expected = torch.zeros(3, 4, dtype=torch.float64)
    for i, j in enumerate(exp_cols.tolist()):  # ∂Cs[i, j]/∂txt_j = img_i ; ∂/∂txt_i = -img_i
        expected[j] += 0.5 * img[i]
        expected[i] -= 0.5 * img[i]
    for j, i in enumerate(exp_rows.tolist()):  # ∂Ci[i, j]/∂txt_j = img_i - img_j
        expected[j] += 0.5 * (img[i] - img[j])
    assert_close(g, expected, atol=1e-12, rtol=0, name="grad_txt")
    out = loss_and_grads(
        lambda a, b: weighted_triplet_loss(a, b, margin=1.5, gamma=0.0, max_violation=True, impl="cpu"),
        img.clone().requires_grad_(), txt,
    )
    assert_close(out[2], expected, atol=1e-12, rtol=0, name="kernel grad_txt")


@pytest.mark.parametrize("mv", [False, True], ids=["sum", "max"])
def test_cpu_deterministic(mv):
    img, txt, ids = make(150, 32, ids="dup")
    runs = [loss_and_grads(lambda a, b: weighted_triplet_loss(a, b, max_violation=mv, ids=ids, impl="cpu",
                                                               chunk_elems=1000), img, txt) for _ in range(3)]
    for r in runs[1:]:
        for a, b in zip(runs[0], r):
            assert torch.equal(a, b)


def test_cpu_no_grad_forward():
    img, txt, _ = make(50, 16)
    with torch.no_grad():
        a = weighted_triplet_loss(img, txt, impl="cpu")
    b = weighted_triplet_ref(img, txt).detach()
    assert not a.requires_grad
    assert_close(a, b, atol=1e-5, rtol=1e-5, name="loss")
    loss, g1, g2 = _triplet_fwd(img.detach(), txt.detach(), None, 0, 50, 0.2, 2.0, False, False, 0)
    assert g1.numel() == 0 and g2.numel() == 0  # nothing (B, D) is formed without need_grad


def test_cpu_grad_of_one_input_and_scaled_upstream():
    img, txt, _ = make(31, 12)
    img = img.detach()
    loss = weighted_triplet_loss(img, txt, impl="cpu")
    (3.5 * loss).backward()
    ref_txt = txt.detach().clone().requires_grad_()
    (3.5 * weighted_triplet_ref(img, ref_txt)).backward()
    assert_close(txt.grad, ref_txt.grad, atol=1e-5, rtol=1e-4, name="grad_txt")


def test_cpu_noncontiguous():
    base_i = torch.randn(24, 40, dtype=torch.float64)
    base_t = torch.randn(24, 40, dtype=torch.float64)
    img = F.normalize(base_i, dim=0).t()[:, ::2].float().requires_grad_()  # (40, 12), strided
    txt = F.normalize(base_t, dim=0).t()[:, 1::2].float().requires_grad_()
    assert not img.is_contiguous()
    for mv in (False, True):
        out = loss_and_grads(lambda a, b: weighted_triplet_loss(a, b, max_violation=mv, impl="cpu"), img, txt)
        ref = loss_and_grads(lambda a, b: weighted_triplet_ref(a, b, max_violation=mv), img, txt)
        gold = loss_and_grads(lambda a, b: weighted_triplet_ref(a, b, max_violation=mv), *_f64_leaves(img, txt))
        assert_fused_close(list(out), list(ref), list(gold), floor_ulps=FLOOR_ULPS, name=f"noncontiguous max={mv}")


@pytest.mark.parametrize("mv", [False, True], ids=["sum", "max"])
def test_cpu_autocast_bf16(mv):
    img, txt, _ = make(64, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss_and_grads(lambda a, b: weighted_triplet_loss(a, b, max_violation=mv, impl="cpu"), img, txt)
        ref = loss_and_grads(lambda a, b: weighted_triplet_ref(a, b, max_violation=mv), img, txt)
    assert out[0].dtype == torch.float32 and out[1].dtype == torch.float32  # grads in the leaves' dtype
    # the eager reference under autocast rounds S (and more) to bf16; we compute S from bf16 inputs in fp32
    for name, a, r in zip(("loss", "grad_img", "grad_txt"), out, ref):
        assert_close(a, r, atol=5e-2 * max(1.0, float(r.abs().max())), rtol=5e-2, name=name)


def test_module():
    img, txt, ids = make(30, 16, ids="dup")
    mod = WeightedTripletLoss(margin=0.3, gamma=1.5, max_violation=True, impl="cpu")
    assert "gather=False" in repr(mod)
    out = loss_and_grads(lambda a, b: mod(a, b, ids), img, txt)
    ref = loss_and_grads(lambda a, b: weighted_triplet_ref(a, b, 0.3, 1.5, True, ids), img, txt)
    gold = loss_and_grads(lambda a, b: weighted_triplet_ref(a, b, 0.3, 1.5, True, ids), *_f64_leaves(img, txt))
    assert_fused_close(list(out), list(ref), list(gold), floor_ulps=FLOOR_ULPS, name="module")


def test_auto_picks_extension_on_cpu():
    from rspeft_fast._impl import resolve_impl

    assert resolve_impl("weighted_triplet_loss", "auto", "cpu", ("cuda", "cpu")) == "cpu"


# ----------------------------------------------------------------------------- local rows (gather=True maths)
@pytest.mark.parametrize("mv", [False, True], ids=["sum", "max"])
def test_local_bands_sum_to_global(mv):
    """What each rank computes under gather=True: rows/columns [start, start+count) of the global batch.
    The kernel's local loss matches the eager local oracle, and the bands sum to the global loss/grads."""
    N, D = 60, 16
    img, txt, ids = make(N, D, torch.float64, ids="dup")
    total_l, total_gi, total_gt = 0.0, torch.zeros_like(img), torch.zeros_like(txt)
    for start, count in ((0, 25), (25, 20), (45, 15)):
        kw = dict(max_violation=mv, ids=ids)
        out = _triplet_fwd(img.detach(), txt.detach(), ids, start, count, 0.2, 2.0, mv, True, 200)
        ref = loss_and_grads(lambda a, b: weighted_triplet_local_ref(a, b, start, count, **kw), img, txt)
        for name, a, r in zip(("loss", "grad_img", "grad_txt"), out, ref):
            assert_close(a, r, atol=1e-12, rtol=1e-10, name=f"{name} [{start}, {start + count})")
        total_l = total_l + out[0]
        total_gi += out[1]
        total_gt += out[2]
    gold = loss_and_grads(lambda a, b: weighted_triplet_ref(a, b, max_violation=mv, ids=ids), img, txt)
    for name, a, r in zip(("loss", "grad_img", "grad_txt"), (total_l, total_gi, total_gt), gold):
        assert_close(a, r, atol=1e-12, rtol=1e-10, name=f"sum of bands {name}")


# ----------------------------------------------------------------------------- non-finite inputs
NONFINITE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def planted(B, D, where, bad, ids=None, dtype=torch.float32, device="cpu", seed=3, at=((5, 3), (0, 0))):
    """Fresh random features with `bad` planted at `at` (row, col) entries of img or txt (rows mod B)."""
    img, txt, ids_t = make(B, D, dtype, device, ids, seed=seed)
    img, txt = img.detach().clone(), txt.detach().clone()
    target = img if where == "img" else txt
    for r, c in at:
        target[r % B, c % D] = NONFINITE[bad]
    return img.requires_grad_(), txt.requires_grad_(), ids_t


def check_nonfinite(impl, img, txt, ids, mv, gamma, chunk=None, exact_nan=True, atol=2e-5, rtol=2e-4):
    """The kernel's loss and gradients against eager autograd of the reference on the same (planted)
    inputs: identical NaN positions (assert_close), equal infinities, close finite values."""
    kw = dict(gamma=gamma, max_violation=mv, ids=ids)
    out = loss_and_grads(lambda a, b: weighted_triplet_loss(a, b, impl=impl, chunk_elems=chunk, **kw), img, txt)
    ref = loss_and_grads(lambda a, b: weighted_triplet_ref(a, b, **kw), img, txt)
    assert not torch.isfinite(ref[0]), "the planted value should reach the reference's loss"
    for name, a, r in zip(("loss", "grad_img", "grad_txt"), out, ref):
        assert torch.equal(torch.isfinite(a), torch.isfinite(r)), (
            f"{name}: non-finite pattern differs ({int((~torch.isfinite(a)).sum())} vs {int((~torch.isfinite(r)).sum())})")
        if exact_nan:
            assert_close(a, r, atol=atol, rtol=rtol, name=name)  # NaN positions identical, inf == inf
        else:
            fin = torch.isfinite(r)
            assert_close(a[fin], r[fin], atol=atol, rtol=rtol, name=f"{name} (finite part)")
    return out, ref


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["img", "txt"])
@pytest.mark.parametrize("gamma", [2.0, 0.5])
@pytest.mark.parametrize("mv", [False, True], ids=["sum", "max"])
@pytest.mark.parametrize("ids,chunk", [(None, None), ("dup", 250)], ids=["noids", "ids-chunked"])
def test_cpu_nonfinite_like_eager(bad, where, gamma, mv, ids, chunk):
    """NaN / ±Inf in img or txt: the loss is NaN / inf as eager's (a NaN cost is never zeroed, NaN wins the
    hard-mining max) and the gradients have exactly eager autograd's NaN pattern: clamp's backward gates a
    NaN cost to 0, an unmasked +inf cost has a NaN gradient (exp's backward 0·inf) even off the arg-max,
    and the dense dS·features of eager spreads a NaN/inf feature over its whole column."""
    img, txt, ids_t = planted(37, 24, where, bad, ids)
    check_nonfinite("cpu", img, txt, ids_t, mv, gamma, chunk)


@pytest.mark.parametrize("bad", ["nan", "inf"])
@pytest.mark.parametrize("mv", [False, True], ids=["sum", "max"])
def test_cpu_nonfinite_gamma0(bad, mv):
    """gamma = 0 (plain hinge): NaN plants give eager's exact NaN pattern. With an inf plant the
    non-finite pattern is eager's, but a few entries may be NaN where eager has ±inf: eager multiplies
    the inf feature by the exact dS coefficient (diagonal included) in one dense GEMM, the kernel by the
    masked diagonal's 0 or, under hard mining, by a zero column term (documented in ops/triplet.py)."""
    for where in ("img", "txt"):
        img, txt, ids = planted(29, 16, where, bad, "dup")
        check_nonfinite("cpu", img, txt, ids, mv, 0.0, exact_nan=bad == "nan")


@pytest.mark.parametrize("mv", [False, True], ids=["sum", "max"])
def test_cpu_nonfinite_float64_exact_values(mv):
    """float64, NaN in img then in txt, several plants: NaN pattern identical and the finite entries agree
    to rounding, so the finite part of the maths is untouched by the NaN handling."""
    for where in ("img", "txt"):
        img, txt, ids = planted(41, 12, where, "nan", "dup", torch.float64, at=((3, 1), (17, 5), (40, 11)))
        check_nonfinite("cpu", img, txt, ids, mv, 2.0, chunk=300, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("mv", [False, True], ids=["sum", "max"])
def test_cpu_nonfinite_forward_no_grad(mv):
    for bad in ("nan", "inf"):
        img, txt, _ = planted(20, 8, "txt", bad)
        with torch.no_grad():
            a = weighted_triplet_loss(img, txt, max_violation=mv, impl="cpu")
            r = weighted_triplet_ref(img, txt, max_violation=mv)
        assert_close(a, r, atol=1e-5, rtol=1e-5, name=f"loss ({bad})")
        assert not torch.isfinite(a)


def test_cpu_hard_mining_nan_wins_first():
    """A NaN cost in a row (column) is its max and the first NaN is the arg-max, as torch.max: the row of
    a NaN image is all NaN, so the loss is NaN; one NaN entry in an otherwise finite row is picked over a
    larger finite cost. With only a NaN *similarity* (not a NaN feature), the row's arg-max is that entry
    and its gradient (clamp gate: 0) is what the reference gives: the gradients stay finite."""
    img, txt, _ = make(6, 4, torch.float64)
    S = (img @ txt.t()).detach()

    def patched(a, b, mv, impl):
        # S[1, 4] = NaN through a custom similarity: feed the kernel and the reference the same NaN S by
        # making img a one-hot basis and txt = S^T (img @ txt^T = S)
        return weighted_triplet_loss(a, b, max_violation=mv, impl=impl) if impl != "ref" else \
            weighted_triplet_ref(a, b, max_violation=mv)

    eye = torch.eye(6, dtype=torch.float64)
    S_nan = S.clone()
    S_nan[1, 4] = float("nan")
    a = eye.clone().requires_grad_()
    b = S_nan.t().contiguous().requires_grad_()  # (6, 6): img @ b^T = S_nan
    for mv in (False, True):
        out = loss_and_grads(lambda x, y: patched(x, y, mv, "cpu"), a, b)
        ref = loss_and_grads(lambda x, y: patched(x, y, mv, "ref"), a, b)
        for name, o, r in zip(("loss", "grad_img", "grad_txt"), out, ref):
            assert_close(o, r, atol=1e-12, rtol=1e-10, name=f"{name} mv={mv}")
        assert torch.isnan(out[0])


@pytest.mark.parametrize("bad", ["nan", "inf"])
@pytest.mark.parametrize("mv", [False, True], ids=["sum", "max"])
def test_local_bands_nonfinite(bad, mv):
    """gather=True maths (one rank's rows/columns) with a non-finite feature inside or outside the band:
    exactly the eager local oracle's NaN pattern and values."""
    N, D = 30, 8
    for where in ("img", "txt"):
        for plant_row in (12, 27):  # inside / outside the band [10, 22)
            img, txt, ids = planted(N, D, where, bad, "dup", torch.float64, at=((plant_row, 2),))
            out = _triplet_fwd(img.detach(), txt.detach(), ids, 10, 12, 0.2, 2.0, mv, True, 100)
            ref = loss_and_grads(
                lambda a, b: weighted_triplet_local_ref(a, b, 10, 12, max_violation=mv, ids=ids), img, txt)
            for name, a, r in zip(("loss", "grad_img", "grad_txt"), out, ref):
                assert torch.equal(torch.isfinite(a), torch.isfinite(r)), f"{name} {where} row {plant_row}"
                assert_close(a, r, atol=1e-12, rtol=1e-10, name=f"{name} {where} row {plant_row}")


# ----------------------------------------------------------------------------- errors, build
def test_errors():
    img, txt, _ = make(8, 4)
    with pytest.raises(TypeError):
        weighted_triplet_loss(img.long(), txt, impl="cpu")
    with pytest.raises(ValueError):
        weighted_triplet_loss(img, txt[:7], impl="cpu")
    with pytest.raises(ValueError):
        weighted_triplet_loss(img[None], txt[None], impl="cpu")
    with pytest.raises(ValueError):
        weighted_triplet_loss(img, txt, ids=torch.arange(7), impl="cpu")
    with pytest.raises(TypeError):
        weighted_triplet_loss(img, txt, ids=torch.arange(8.0), impl="cpu")
    with pytest.raises(ValueError):
        weighted_triplet_loss(img[:0], txt[:0], impl="cpu")
    with pytest.raises(ValueError):
        weighted_triplet_loss(img, txt, gamma=-1.0, impl="cpu")
    with pytest.raises(ValueError):
        weighted_triplet_loss(img, txt, impl="triton")
    if not torch.cuda.is_available():
        with pytest.raises(ImplUnavailableError):
            weighted_triplet_loss(img, txt, impl="cuda")
    with pytest.raises(RuntimeError, match="process group"):
        weighted_triplet_loss(img, txt, impl="cpu", gather=True)
    with pytest.raises(RuntimeError, match="outside"):
        _triplet_fwd(img.detach(), txt.detach(), None, 5, 4, 0.2, 2.0, False, False, 0)


def test_extension_reports_kernels():
    ext = _native.extension()
    kernels = ext.kernels()
    assert "weighted_triplet_cpu" in kernels
    assert hasattr(ext, "weighted_triplet_forward_cpu")
    assert ("weighted_triplet_cuda" in kernels) == ext.with_cuda() == hasattr(ext, "weighted_triplet_forward_cuda")


# ----------------------------------------------------------------------------- CUDA kernel (GPU)
@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 2, 3, 17, 64, 130, 300])
@pytest.mark.parametrize("mv", [False, True], ids=["sum", "max"])
@pytest.mark.parametrize("ids", [None, "dup"], ids=["noids", "ids"])
@pytest.mark.parametrize("chunk", [None, 97], ids=["onechunk", "chunked"])
def test_cuda_matches_reference(B, mv, ids, chunk):
    check_vs_reference("cuda", B, 33, mv, ids, chunk=chunk, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("mv", [False, True], ids=["sum", "max"])
def test_cuda_float64_and_ties(mv):
    img, txt, ids = make(77, 24, torch.float64, device="cuda", ids="dup")
    with torch.no_grad():
        txt[7] = txt[3]
    for gamma in (2.0, 0.0, 0.5):
        kw = dict(max_violation=mv, ids=ids, gamma=gamma)
        out = loss_and_grads(lambda a, b: weighted_triplet_loss(a, b, impl="cuda", chunk_elems=300, **kw), img, txt)
        ref = loss_and_grads(lambda a, b: weighted_triplet_ref(a, b, **kw), img, txt)
        for name, a, r in zip(("loss", "grad_img", "grad_txt"), out, ref):
            assert_close(a, r, atol=1e-12, rtol=1e-10, name=f"{name} gamma={gamma}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mv", [False, True], ids=["sum", "max"])
def test_cuda_low_precision(dtype, mv):
    check_vs_reference("cuda", 300, 64, mv, "dup", dtype=dtype, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("mv", [False, True], ids=["sum", "max"])
def test_cuda_deterministic_and_local(mv):
    img, txt, ids = make(1000, 64, device="cuda", ids="dup")
    runs = [loss_and_grads(lambda a, b: weighted_triplet_loss(a, b, max_violation=mv, ids=ids, impl="cuda",
                                                               chunk_elems=100_000), img, txt) for _ in range(3)]
    for r in runs[1:]:
        for a, b in zip(runs[0], r):
            assert torch.equal(a, b)
    out = _triplet_fwd(img.detach().double(), txt.detach().double(), ids, 300, 400, 0.2, 2.0, mv, True, 50_000)
    ref = weighted_triplet_local_ref(img.detach().double(), txt.detach().double(), 300, 400, max_violation=mv, ids=ids)
    assert_close(out[0], ref, atol=1e-10, rtol=1e-10, name="local loss")


@pytest.mark.gpu
@pytest.mark.parametrize("mv", [False, True], ids=["sum", "max"])
def test_cuda_b16384(mv):
    """SPEC shape: B = 16384, D = 512 against the (14 GB) eager reference; and the kernel's peak memory."""
    img, txt, _ = make(16384, 512, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = loss_and_grads(lambda a, b: weighted_triplet_loss(a, b, max_violation=mv, impl="cuda"), img, txt)
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 1 << 30, f"peak extra memory {peak / 2**20:.0f} MiB"
    ref = loss_and_grads(lambda a, b: weighted_triplet_ref(a, b, max_violation=mv), img, txt)
    for name, a, r in zip(("loss", "grad_img", "grad_txt"), out, ref):
        assert_close(a, r, atol=1e-4 * max(1.0, float(r.abs().max())), rtol=1e-3, name=name)


@pytest.mark.gpu
@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["img", "txt"])
@pytest.mark.parametrize("mv", [False, True], ids=["sum", "max"])
def test_cuda_nonfinite_like_eager(bad, where, mv):
    """The CPU non-finite checks on the CUDA kernels (NaN-aware tree max, poison flags from all blocks)."""
    for B, chunk, ids in ((37, None, None), (300, 20_000, "dup")):
        img, txt, ids_t = planted(B, 24, where, bad, ids, device="cuda", at=((5, 3), (0, 0), (B - 1, 7)))
        check_nonfinite("cuda", img, txt, ids_t, mv, 2.0, chunk)
        check_nonfinite("cuda", img.detach().double().requires_grad_(), txt.detach().double().requires_grad_(),
                        ids_t, mv, 2.0, chunk, atol=1e-12, rtol=1e-10)
