"""The eager references against independent formulations (the foundation every kernel test stands on)."""
import math

import pytest
import torch
import torch.nn.functional as F

import rspeft_fast
from rspeft_fast import reference as R
from rspeft_fast.testing import assert_close

DT = torch.float64


def _rand(*shape, scale=1.0):
    return (torch.randn(*shape, dtype=DT) * scale).requires_grad_()


# ----------------------------------------------------------------------------- MuFA
def _mufa_params(d, rates):
    sizes = R.branch_sizes(d, rates)
    Rr = sum(sizes)
    return sizes, _rand(Rr, d, scale=d**-0.5), _rand(Rr), _rand(d, Rr, scale=Rr**-0.5), _rand(d), _rand(len(sizes))


@pytest.mark.parametrize("d,rates", [(96, (8, 16, 32)), (64, (8,)), (192, (4, 12))])
def test_mufa_ref_matches_concatenated_form(d, rates):
    sizes, wd, bd, wu, bu, gate = _mufa_params(d, rates)
    x = _rand(3, 7, d)
    got = R.mufa_ref(x, wd, bd, wu, bu, gate, sizes, scale=0.7)
    g = torch.repeat_interleave(gate, torch.tensor(sizes))
    h = 0.5 * (x @ wd.t() + bd) * (1 + torch.erf((x @ wd.t() + bd) / math.sqrt(2)))
    want = 0.7 * ((h * g) @ wu.t() + bu)
    assert_close(got, want, name="mufa")
    base = _rand(3, 7, d)
    assert_close(R.mufa_ref(x, wd, bd, wu, bu, gate, sizes, 0.7, base=base), want + base, name="mufa+base")


def test_mufa_ref_gradcheck():
    sizes, wd, bd, wu, bu, gate = _mufa_params(32, (8, 16))
    x = _rand(5, 32)
    assert torch.autograd.gradcheck(lambda *a: R.mufa_ref(*a, sizes, 1.3), (x, wd, bd, wu, bu, gate))


def test_mufa_module_layout_and_identity_init():
    m = rspeft_fast.MuFAAdapter(768)
    assert m.sizes == (96, 48, 24) and m.bottleneck == 168
    assert m.down.weight.shape == (168, 768) and m.down.bias.shape == (168,)
    assert m.up.weight.shape == (768, 168) and m.up.bias.shape == (768,)
    assert m.gate.shape == (3,) and torch.allclose(m.gate, torch.full((3,), 1 / 3))
    x = torch.randn(2, 5, 768)
    assert torch.equal(m(x), torch.zeros_like(x))
    base = torch.randn_like(x)
    assert torch.equal(m(x, base=base), base)


def test_mufa_module_errors():
    with pytest.raises(ValueError, match="not divisible"):
        rspeft_fast.MuFAAdapter(100, rates=(8,))
    m = rspeft_fast.MuFAAdapter(64, rates=(8,), impl="reference")
    with pytest.raises(ValueError, match="last dimension 64"):
        m(torch.randn(3, 65))
    with pytest.raises(TypeError, match="floating"):
        m(torch.ones(3, 64, dtype=torch.int64))
    with pytest.raises(ValueError, match="impl"):
        rspeft_fast.MuFAAdapter(64, rates=(8,), impl="bogus")(torch.randn(2, 64))


def test_mufa_module_noncontiguous_matches_contiguous():
    m = rspeft_fast.MuFAAdapter(32, rates=(8, 16), impl="reference")
    torch.nn.init.normal_(m.up.weight)
    xt = torch.randn(32, 6).t()  # (6, 32) non-contiguous
    assert not xt.is_contiguous()
    assert torch.allclose(m(xt), m(xt.contiguous()))


# ----------------------------------------------------------------------------- QLinear / EQAM
def _explicit_quantizer(w, bits):
    """Per-row quantiser written out element by element."""
    qmax = 2 ** (bits - 1) - 1
    out = torch.empty_like(w, dtype=torch.float32)
    for o in range(w.shape[0]):
        row = w[o].float()
        s = max(float(row.abs().max()) / qmax, 1e-8)
        s = torch.tensor(s, dtype=torch.float32)
        for k in range(w.shape[1]):
            q = R.round_half_even_ref((row[k] / s).reshape(1))[0]
            q = min(max(float(q), -qmax - 1), qmax)
            out[o, k] = q * s
    return out


@pytest.mark.parametrize("bits", range(2, 9))
def test_fake_quant_matches_explicit_quantizer(bits):
    w = torch.randn(5, 13)
    got = R.fake_quant_weight(w, bits)
    assert_close(got, _explicit_quantizer(w, bits), atol=0, rtol=1e-6, name=f"Wq bits={bits}")
    q, s = R.quantize_weight(w, bits)
    assert q.min() >= -(2 ** (bits - 1)) and q.max() <= 2 ** (bits - 1) - 1
    assert torch.equal(q, torch.round(q))


def test_round_half_even_ties():
    v = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, 0.49, 0.51])
    assert torch.equal(R.round_half_even_ref(v), torch.round(v))
    assert R.round_half_even_ref(v).tolist() == [-2.0, -2.0, -0.0, 0.0, 2.0, 2.0, 4.0, 0.0, 1.0]
    # constructed weight row whose scaled values sit exactly on .5 ties (scale = 1 for bits=8: max = 127)
    w = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -3.5]])
    assert R.fake_quant_weight(w, 8).tolist() == [[127.0, 0.0, 2.0, 2.0, -0.0, -4.0]]


def test_qlinear_ste_gradients_match_formula():
    x = torch.randn(4, 6, 16, requires_grad=True)
    w = torch.randn(8, 16, requires_grad=True)
    b = torch.randn(8, requires_grad=True)
    y = R.qlinear_ref(x, w, b, 4)
    dy = torch.randn_like(y)
    y.backward(dy)
    wq = R.fake_quant_weight(w.detach(), 4)
    assert_close(y, x.detach() @ wq.t() + b.detach(), name="y")
    assert_close(x.grad, dy @ wq, name="dX = dY Wq")
    assert_close(w.grad, dy.reshape(-1, 8).t() @ x.detach().reshape(-1, 16), name="dW = dY^T X")
    assert_close(b.grad, dy.reshape(-1, 8).sum(0), name="db = sum dY")


def test_qlinear_module_and_errors():
    m = rspeft_fast.QLinear(16, 8, bits=3, impl="reference")
    assert m.weight.shape == (8, 16) and m.bias.shape == (8,)
    x = torch.randn(5, 16)
    assert_close(m(x), F.linear(x, _explicit_quantizer(m.weight.detach(), 3), m.bias.detach()), name="QLinear")
    assert rspeft_fast.QLinear(4, 4, bias=False).bias is None
    for bad in (1, 9, 0, 2.5, True):
        with pytest.raises(ValueError, match="bits"):
            rspeft_fast.QLinear(4, 4, bits=bad)
    with pytest.raises(ValueError, match="bits"):
        rspeft_fast.EQAM(16, bits=9)
    with pytest.raises(ValueError, match="last dimension 16"):
        m(torch.randn(2, 15))


def test_eqam_identity_init_and_gradients():
    m = rspeft_fast.EQAM(32, reduction=4, bits=8, impl="reference")
    assert m.down.weight.shape == (8, 32) and m.up.weight.shape == (32, 8)
    x = torch.randn(2, 3, 3, 32)  # channels-last ConvNeXt features
    assert torch.equal(m(x), torch.zeros_like(x))
    torch.nn.init.normal_(m.up.weight)
    y = m(x)
    want = R.qlinear_ref(F.gelu(R.qlinear_ref(x, m.down.weight, m.down.bias, 8)), m.up.weight, m.up.bias, 8)
    assert_close(y, want, name="EQAM")
    y.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


# ----------------------------------------------------------------------------- CAPM
def test_capm_ref_matches_loop_and_layouts():
    f = torch.randn(2, 12, 5, 4, dtype=DT)
    P = torch.randn(3, 12, dtype=DT)
    want = torch.empty_like(f)
    for b in range(2):
        c = f[b].mean(dim=(1, 2))
        logits = torch.stack([(c * P[j]).sum() for j in range(3)]) / math.sqrt(12)
        a = torch.exp(logits - logits.max())
        a = a / a.sum()
        p = sum(a[j] * P[j] for j in range(3))
        want[b] = f[b] + p[:, None, None]
    assert_close(R.capm_ref(f, P), want, name="capm NCHW")
    assert_close(R.capm_ref(f.permute(0, 2, 3, 1), P, channels_last=True), want.permute(0, 2, 3, 1), name="capm NHWC")


def test_capm_module_gradcheck_and_errors():
    m = rspeft_fast.CAPM(6, num_prompts=4).double()
    assert m.prompts.shape == (4, 6)
    f = torch.randn(2, 6, 3, 3, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f, p: R.capm_ref(f, p), (f, m.prompts))
    assert m(f.permute(0, 2, 3, 1), channels_last=True).shape == (2, 3, 3, 6)
    with pytest.raises(ValueError, match="C=6"):
        m(torch.randn(2, 5, 3, 3, dtype=DT))
    with pytest.raises(ValueError, match="4-D"):
        m(torch.randn(2, 6, dtype=DT))


# ----------------------------------------------------------------------------- MSA / BiShare / MGA
@pytest.mark.parametrize("masked", [False, True])
def test_msa_ref_equals_nn_multiheadattention(masked):
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True).double()
    x = torch.randn(3, 11, 32, dtype=DT)
    mask = None
    if masked:
        mask = torch.zeros(3, 11, dtype=torch.bool)
        mask[0, 7:] = True
        mask[2, 3:] = True
    want = mha(x, x, x, key_padding_mask=mask, need_weights=False)[0]
    got = R.msa_ref(x, mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight, mha.out_proj.bias, 4, mask)
    assert_close(got, want, name="msa")


def _randomise(module):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)
    return module


def test_bishare_and_mga_match_spec_with_nn_modules():
    share = _randomise(rspeft_fast.BiShareAdapter(hidden=16, heads=2).double())
    mga = _randomise(rspeft_fast.MGAdapter(24, hidden=16, heads=4, share=share, impl="reference").double())
    x = torch.randn(2, 9, 24, dtype=DT)

    def mha(attn, z):
        return attn(z, z, z, need_weights=False)[0]

    # written out with the nn modules themselves (independent of msa_ref)
    z = F.gelu(mga.down(x))
    m = z
    z = mha(mga.attn, z)
    a2 = torch.sigmoid(share.gate)
    zz = share.down(z)
    z = z + share.up(a2 * mha(share.attn, zz) + (1 - a2) * zz)
    z = mha(mga.attn, z)
    a = torch.sigmoid(mga.gate)
    want = x + mga.up(a * m + (1 - a) * z)
    assert_close(mga(x), want, name="MGA+share")
    assert_close(share(m), m + share.up(a2 * mha(share.attn, share.down(m)) + (1 - a2) * share.down(m)), name="BiShare")


def test_mga_gradcheck_and_identity_init():
    mga = rspeft_fast.MGAdapter(12, hidden=8, heads=2, share=rspeft_fast.BiShareAdapter(8, 2), impl="reference").double()
    x = torch.randn(2, 5, 12, dtype=DT)
    assert torch.equal(mga(x), x)  # zero-initialised up
    assert mga.gate.shape == () and abs(float(mga.gate.detach()) - 0.6) < 1e-7
    _randomise(mga)
    xg = x.clone().requires_grad_()
    params = [xg] + list(mga.parameters())

    def fn(*_):
        return mga(xg)

    assert torch.autograd.gradcheck(lambda *a: fn(), params)


def test_mga_errors():
    with pytest.raises(ValueError, match="divisible"):
        rspeft_fast.MGAdapter(16, hidden=10, heads=4)
    with pytest.raises(ValueError, match="share.hidden"):
        rspeft_fast.MGAdapter(16, hidden=16, heads=4, share=rspeft_fast.BiShareAdapter(32, 4))
    m = rspeft_fast.MGAdapter(16, hidden=8, heads=2, impl="reference")
    with pytest.raises(ValueError, match=r"\(B, L, 16\)"):
        m(torch.randn(4, 16))
    with pytest.raises(ValueError, match="key_padding_mask"):
        m(torch.randn(2, 3, 16), key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))


# ----------------------------------------------------------------------------- weighted triplet
def _triplet_bruteforce(img, txt, margin, gamma, max_violation, ids=None):
    B = img.shape[0]
    S = [[float((img[i] * txt[j]).sum()) for j in range(B)] for i in range(B)]

    def w(c):
        return (1 - math.exp(-c)) ** gamma * c

    def neg(i, j):
        return i != j if ids is None else int(ids[i]) != int(ids[j])

    rows = [[w(max(0.0, margin + S[i][j] - S[i][i])) if neg(i, j) else 0.0 for j in range(B)] for i in range(B)]
    cols = [[w(max(0.0, margin + S[i][j] - S[j][j])) if neg(i, j) else 0.0 for i in range(B)] for j in range(B)]
    if max_violation:
        return (sum(max(r) for r in rows) + sum(max(c) for c in cols)) / 2
    return (sum(map(sum, rows)) + sum(map(sum, cols))) / 2


@pytest.mark.parametrize("max_violation", [False, True])
@pytest.mark.parametrize("with_ids", [False, True])
def test_triplet_ref_matches_bruteforce(max_violation, with_ids):
    B, D = 9, 8
    img = F.normalize(torch.randn(B, D, dtype=DT), dim=1)
    txt = F.normalize(torch.randn(B, D, dtype=DT), dim=1)
    ids = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4, 5]) if with_ids else None
    got = R.weighted_triplet_ref(img, txt, 0.3, 2.0, max_violation, ids)
    want = _triplet_bruteforce(img, txt, 0.3, 2.0, max_violation, ids)
    assert abs(float(got) - want) < 1e-10
    assert rspeft_fast.weighted_triplet_loss(img, txt, 0.3, 2.0, max_violation, ids, impl="reference").item() == pytest.approx(want, abs=1e-10)


@pytest.mark.parametrize("max_violation", [False, True])
def test_triplet_ref_gradcheck(max_violation):
    img = F.normalize(torch.randn(6, 5, dtype=DT), dim=1).requires_grad_()
    txt = F.normalize(torch.randn(6, 5, dtype=DT), dim=1).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: R.weighted_triplet_ref(a, b, 0.5, 2.0, max_violation), (img, txt))


def test_triplet_errors():
    a = torch.randn(4, 8)
    with pytest.raises(ValueError, match="same shape"):
        rspeft_fast.weighted_triplet_loss(a, torch.randn(4, 7))
    with pytest.raises(ValueError, match="ids"):
        rspeft_fast.weighted_triplet_loss(a, a, ids=torch.arange(3))
    with pytest.raises(TypeError, match="floating"):
        rspeft_fast.weighted_triplet_loss(a.long(), a.long())
    with pytest.raises(ValueError, match="2-D"):
        rspeft_fast.weighted_triplet_loss(a[0], a[0])
    loss = rspeft_fast.WeightedTripletLoss(margin=0.2)(a, torch.randn(4, 8))
    assert loss.dim() == 0 and torch.isfinite(loss)


def test_triton_request_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    m = rspeft_fast.MuFAAdapter(32, rates=(8,), impl="triton")
    with pytest.raises(rspeft_fast.ImplUnavailableError, match="TRITON_INTERPRET"):
        m(torch.randn(2, 32))
