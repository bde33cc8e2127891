"""MuFA's Table 1 baselines beyond the first nine (SPEC §1, "The rest of MuFA's Table 1"): Convpass, LoRand, IVPT,
E2VPT. Each against an eager reference written from the formulas (and, where the reference repositories' block maths
can be transcribed, against that on the same weights); identity at initialisation where the method starts at zero;
the frozen backbone gets no gradient; enable/disable; save/load; ``target=``; each default's tuned-parameter budget."""
import math

import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")

import rspeft_fast as rf  # noqa: E402
from rspeft_fast.modules import Convpass, IVPTGate, KVPrompts, LoRand  # noqa: E402
from rspeft_fast.reference import (convpass_ref, gated_prompts_ref, kv_prompt_attention_ref, lorand_ref,  # noqa: E402
                                   lorand_weight_ref, quick_gelu, tempered_attention_ref)
from rspeft_fast.testing import assert_fused_close  # noqa: E402

METHODS = ("convpass", "lorand", "ivpt", "e2vpt")
SWIN_METHODS = ("convpass", "lorand")


def _vit(**kw):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=3, num_classes=5, **kw).eval()


def _swin():
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, window_size=4,
                             embed_dim=16, depths=(1, 1), num_heads=(1, 2), num_classes=5).eval()


def _randomise(model, std=0.05):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


# ---------------------------------------------------------------------------------------------- module vs reference
def test_convpass_module_is_the_formula_and_the_reference_repo_block():
    torch.manual_seed(0)
    cp = Convpass(24, width=8, scale=0.5).eval()
    _randomise(cp, 0.2)
    x = torch.randn(2, 1 + 3 * 4, 24)  # CLS + a 3x4 grid (odd, non-square)
    args = (cp.down.weight, cp.down.bias, cp.conv.weight, cp.conv.bias, cp.up.weight, cp.up.bias)
    _close(cp(x, (3, 4), 1), convpass_ref(x, (3, 4), 1, *args, scale=0.5))
    # two prefix tokens (CLS + a register), each its own 1x1 map
    x2 = torch.randn(2, 2 + 9, 24)
    _close(cp(x2, (3, 3), 2), convpass_ref(x2, (3, 3), 2, *args, scale=0.5))

    # JieShibo/PETL-ViT convpass.py Convpass.forward, transcribed (CLS first, a square grid, scale outside)
    def repo_forward(x, side):
        B, N, C = x.shape
        x_down = quick_gelu(F.linear(x, cp.down.weight, cp.down.bias))
        x_patch = x_down[:, 1:].reshape(B, side, side, 8).permute(0, 3, 1, 2)
        x_patch = F.conv2d(x_patch, cp.conv.weight, cp.conv.bias, padding=1).permute(0, 2, 3, 1).reshape(B, side * side, 8)
        x_cls = x_down[:, :1].reshape(B, 1, 1, 8).permute(0, 3, 1, 2)
        x_cls = F.conv2d(x_cls, cp.conv.weight, cp.conv.bias, padding=1).permute(0, 2, 3, 1).reshape(B, 1, 8)
        x_down = quick_gelu(torch.cat([x_cls, x_patch], dim=1))
        return F.linear(x_down, cp.up.weight, cp.up.bias)

    x3 = torch.randn(2, 1 + 16, 24)
    _close(cp(x3, (4, 4), 1), 0.5 * repo_forward(x3, 4))
    # Swin: a (B, H, W, C) map, no prefix
    m = torch.randn(2, 3, 5, 24)
    _close(cp(m), convpass_ref(m.reshape(2, 15, 24), (3, 5), 0, *args, scale=0.5).reshape(2, 3, 5, 24))


def test_convpass_init_is_zero_delta_with_identity_centre_tap():
    cp = Convpass(16, width=4)
    assert torch.equal(cp.conv.weight[:, :, 1, 1], torch.eye(4)) and cp.conv.weight.abs().sum() == 4
    assert torch.count_nonzero(cp.up.weight) == 0
    assert torch.count_nonzero(cp(torch.randn(2, 5, 16), (2, 2), 1)) == 0


def test_lorand_weight_synthesis_is_the_reference_repo_formula():
    """``Lorand_Multi``: ``weight = Σ (A_i g_i B_i)ᵀ`` with ``A_i (in, β)``, ``g_i (β, β)``, ``B_i (β, out)``."""
    torch.manual_seed(0)
    ad = LoRand(24, hidden=6, branches=3, kernel=4, zero_init_up=False)
    wd, wu = ad.weights()
    _close(wd, lorand_weight_ref(ad.down_P, ad.down_K, ad.down_Q))
    A = [ad.down_Q[i].t() for i in range(3)]
    g = [ad.down_K[i].t() for i in range(3)]
    B = [ad.down_P[i].t() for i in range(3)]
    _close(wd, sum(torch.mm(torch.mm(A[i], g[i]), B[i]).t() for i in range(3)))
    assert wd.shape == (6, 24) and wu.shape == (24, 6)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_lorand_module_runs_the_bottleneck_op_and_matches_the_formula(impl):
    """The fused path (Triton through the interpreter on CPU): output and every factor's gradient vs the eager
    formula in float64."""
    torch.manual_seed(0)
    ad = LoRand(32, hidden=8, branches=2, kernel=4, zero_init_up=False, impl=impl)
    y = torch.randn(2, 5, 32, requires_grad=True)
    out = ad(y)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [y] + list(ad.parameters()), g)
    params64 = [p.detach().double().requires_grad_() for p in ad.parameters()]
    y64 = y.detach().double().requires_grad_()
    names = [n for n, _ in ad.named_parameters()]
    kw = dict(zip(names, params64))
    ref = lorand_ref(y64, kw["down_P"], kw["down_K"], kw["down_Q"], kw["down_bias"], kw["up_P"], kw["up_K"],
                     kw["up_Q"], kw["up_bias"])
    ref_grads = torch.autograd.grad(ref, [y64] + params64, g.double())
    if impl == "reference":
        _close(out, ref.float())
        for a, b in zip(grads, ref_grads):
            _close(a, b.float(), 1e-4)
    else:  # fp32 kernel vs fp32 eager, both against the float64 reference
        eager = LoRand(32, hidden=8, branches=2, kernel=4, zero_init_up=False, impl="reference")
        eager.load_state_dict(ad.state_dict())
        out_e = eager(y)
        grads_e = torch.autograd.grad(out_e, [y] + list(eager.parameters()), g)
        assert_fused_close([out] + list(grads), [out_e] + list(grads_e), [ref.float()] + [r.float() for r in ref_grads],
                           name="lorand")


def test_lorand_zero_init_up_starts_at_identity():
    ad = LoRand(16, branches=2, kernel=4, impl="reference")
    y = torch.randn(3, 16)
    assert torch.equal(ad(y), y)
    assert torch.count_nonzero(ad.up_P) == 0 and torch.count_nonzero(ad.up_bias) == 0


def test_ivpt_gate_and_temperature():
    gate = IVPTGate(gate=True, gate_init=5.0)
    assert gate.gate_logit.item() == -5.0 and gate.temperature.item() == 1.0
    p_in, p_out = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    _close(gate.mix(p_in, p_out), gated_prompts_ref(p_in, p_out, torch.tensor(-5.0)))
    # the value is clamped to [0.01, 10], the gradient passes straight through (the reference clamps the stored value)
    with torch.no_grad():
        gate.temperature.fill_(20.0)
    t = gate.tau()
    assert t.item() == 10.0
    t.backward()
    assert gate.temperature.grad.item() == 1.0
    assert IVPTGate(gate=False).gate_logit is None


def test_kv_prompts_prune_keeps_the_selected_tokens():
    kv = KVPrompts(2, 4, 5)
    k, v = torch.randn(3, 2, 7, 4), torch.randn(3, 2, 7, 4)
    k2, v2 = kv.extend(k, v)
    assert k2.shape == (3, 2, 12, 4) and torch.equal(k2[:, :, 7:], kv.key.detach().expand(3, -1, -1, -1))
    keep = torch.tensor([True, False, True, False, False])
    kv.prune(keep)
    k3, v3 = kv.extend(k, v)
    assert k3.shape == (3, 2, 9, 4) and torch.equal(v3[:, :, 7:], kv.value.detach()[:, keep].expand(3, -1, -1, -1))


# ---------------------------------------------------------------------------------------------- blocks in a real model
def _ivpt_block_ref(blk, x, k, n):
    """IVPT's block (GatedPromptTuning Block.forward(x, temp) + the gate of forward_features) on timm weights."""
    a = blk.attn
    tau = blk.adapter.temperature.clamp(0.01, 10.0)
    p_in = x[:, k:k + n]
    x = x + tempered_attention_ref(blk.norm1(x), a.qkv.weight, a.qkv.bias, a.proj.weight, a.proj.bias, a.num_heads, tau)
    x = x + blk.mlp(blk.norm2(x))
    if blk.adapter.gate_logit is None:
        return x
    return torch.cat([x[:, :k], gated_prompts_ref(p_in, x[:, k:k + n], blk.adapter.gate_logit), x[:, k + n:]], dim=1)


def test_ivpt_blocks_are_the_reference_block():
    torch.manual_seed(0)
    model = rf.inject(_vit(), "ivpt", num_tokens=3, gate_init=1.0)
    _randomise(model, 0.3)
    with torch.no_grad():
        model.blocks[0].adapter.temperature.fill_(0.5)
        model.blocks[1].adapter.temperature.fill_(30.0)  # clamped to 10
    x = torch.randn(2, 3, 32, 32)
    k = model.num_prefix_tokens
    with torch.no_grad():
        t = model.norm_pre(model._pos_embed(model.patch_embed(x)))  # prompts inserted by the hook
        assert t.shape[1] == k + 3 + 4
        for blk in model.blocks:
            want = _ivpt_block_ref(blk, t, k, 3)
            t = blk(t)
            _close(t, want, 1e-5)
    assert model.blocks[-1].adapter.gate_logit is None  # the reference's GATE_NUM = depth - 1
    assert all(b.adapter.gate_logit is not None for b in model.blocks[:-1])


def test_e2vpt_attention_is_the_reference_attention():
    torch.manual_seed(0)
    model = rf.inject(_vit(), "e2vpt", num_tokens=2, kv_tokens=3)
    _randomise(model, 0.3)
    blk = model.blocks[1]  # called through its forward: the pre-hook of deep VPT would re-set the prompt tokens
    a = blk.attn
    x = torch.randn(2, 1 + 2 + 4, a.qkv.in_features)
    fwd = type(blk).forward
    with torch.no_grad():
        want = x + kv_prompt_attention_ref(blk.norm1(x), a.qkv.weight, a.qkv.bias, a.proj.weight, a.proj.bias,
                                           a.num_heads, blk.adapter.key, blk.adapter.value)
        want = want + blk.mlp(blk.norm2(want))
        _close(fwd(blk, x), want)
        # pruning: the same with only the kept tokens
        keep = torch.tensor([True, False, True])
        blk.adapter.prune(keep)
        want = x + kv_prompt_attention_ref(blk.norm1(x), a.qkv.weight, a.qkv.bias, a.proj.weight, a.proj.bias,
                                           a.num_heads, blk.adapter.key[:, keep], blk.adapter.value[:, keep])
        _close(fwd(blk, x), want + blk.mlp(blk.norm2(want)))
    assert model.vpt_prompts.shape == (3, 2, a.qkv.in_features)


def test_convpass_and_lorand_blocks_are_the_formula_on_vit():
    torch.manual_seed(0)
    x = torch.randn(2, 1 + 4, 192)
    for method in SWIN_METHODS:
        model = rf.inject(_vit(), method, **({"width": 8} if method == "convpass" else {}))
        _randomise(model, 0.1)
        blk = model.blocks[0]
        with torch.no_grad():
            if method == "convpass":
                ca, cm = blk.adapter.attn, blk.adapter.mlp
                ref = lambda c, t: convpass_ref(t, (2, 2), 1, c.down.weight, c.down.bias, c.conv.weight,  # noqa: E731
                                                c.conv.bias, c.up.weight, c.up.bias)
                n = blk.norm1(x)
                y = x + blk.attn(n) + ref(ca, n)
                n = blk.norm2(y)
                want = y + blk.mlp(n) + ref(cm, n)
            else:
                ref = lambda ad, t: lorand_ref(t, ad.down_P, ad.down_K, ad.down_Q, ad.down_bias, ad.up_P,  # noqa: E731
                                               ad.up_K, ad.up_Q, ad.up_bias)
                y = x + ref(blk.adapter.attn, blk.attn(blk.norm1(x)))
                want = y + ref(blk.adapter.mlp, blk.mlp(blk.norm2(y)))
            _close(blk(x), want)


# ---------------------------------------------------------------------------------------------- the model contracts
@pytest.mark.parametrize("family,method", [("vit", m) for m in METHODS] + [("swin", m) for m in SWIN_METHODS])
def test_identity_where_zero_initialised_disable_and_frozen_backbone(family, method):
    torch.manual_seed(0)
    bare = _vit() if family == "vit" else _swin()
    torch.manual_seed(0)
    small = {"width": 16} if method == "convpass" else {}  # the default's 68 channels: slower, same code
    model = rf.inject(_vit() if family == "vit" else _swin(), method, **small)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = bare(x)
        on = model(x)
        if method in ("convpass", "lorand"):  # zero-initialised up projections: the backbone at init
            _close(on, ref, 1e-6)
        with rf.adapters_disabled(model):
            assert torch.equal(model(x), ref)
    _randomise(model)
    model.train()
    model(x).square().mean().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("adapter" in n or "vpt_prompts" in n or n.startswith("head.")) for n in trainable), trainable
    for n, p in model.named_parameters():
        if n in trainable:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n  # every tuned tensor is used (DDP)
        else:
            assert p.grad is None, n


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip(tmp_path, method):
    torch.manual_seed(0)
    model = rf.inject(_vit(), method)
    _randomise(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    rf.save_adapters(model, tmp_path / "a.safetensors")
    torch.manual_seed(0)
    fresh = _vit()
    rf.load_adapters(fresh, tmp_path / "a.safetensors")
    assert fresh.rspeft_config == model.rspeft_config
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), want)


@pytest.mark.parametrize("method", METHODS)
def test_target_selects_blocks(method):
    model = rf.inject(_vit(), method, target="blocks.1")
    assert [n for n in model.rspeft_adapted if n.startswith("blocks")] == ["blocks.1"]
    assert [n for n, m in model.named_modules() if "adapter" in m.__dict__.get("_modules", {})] == ["blocks.1"]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        model(x)


@pytest.mark.parametrize("method", ["ivpt", "e2vpt"])
def test_prompt_methods_refuse_swin_with_the_reason(method):
    with pytest.raises(ValueError, match="window"):
        rf.inject(_swin(), method)


# ---------------------------------------------------------------------------------------------- budgets
def _share(arch, method, **opts):
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, num_classes=21)  # UCM: 21 classes
        rf.inject(model, method, **opts)
    return rf.trainable_parameters(model)


VIT_B, SWIN_T = "vit_base_patch16_224", "swin_tiny_patch4_window7_224"
HEAD = 768 * 21 + 21


def test_convpass_default_is_mufa_table1_budget():
    """width 68: 4.13 % of ViT-B/16 (MuFA lists 4.12 %); the paper's width 8 is 0.38 % without the head."""
    tp = _share(VIT_B, "convpass")
    per = 768 * 68 + 68 + 68 * 68 * 9 + 68 + 68 * 768 + 768
    assert tp.trainable == 12 * 2 * per + HEAD
    assert abs(tp.percent - 4.12) < 0.015, tp
    paper = _share(VIT_B, "convpass", width=8)
    assert abs(100 * (paper.trainable - HEAD) / paper.backbone - 0.38) < 0.005, paper
    assert 8.0 < _share(SWIN_T, "convpass").percent < 8.2  # one absolute width over Swin-T's narrow stages


def test_lorand_default_is_the_reference_config():
    """α=4, β=8, hidden d/4: 1.78 % of ViT-B/16 with the head (1.76 % without); MuFA lists 1.84 %."""
    tp = _share(VIT_B, "lorand")
    d, h, a, b = 768, 192, 4, 8
    per = a * (h * b + b * b + b * d) + h + a * (d * b + b * b + b * h) + d
    assert tp.trainable == 12 * 2 * per + HEAD
    assert abs(tp.percent - 1.78) < 0.005 and abs(100 * 12 * 2 * per / tp.backbone - 1.76) < 0.005, tp
    assert 2.70 < _share(SWIN_T, "lorand").percent < 2.72


def test_ivpt_default_is_the_reference_config():
    """5 shallow prompts, 11 gates, 12 temperatures: 0.023 % of ViT-B/16 (MuFA's 0.78 % would need ~850 prompts)."""
    tp = _share(VIT_B, "ivpt")
    assert tp.trainable == 5 * 768 + 11 + 12 + HEAD
    assert abs(tp.percent - 0.023) < 0.001, tp
    need = (0.0078 * tp.backbone - HEAD - 23) / 768
    assert 800 < need < 900


def test_e2vpt_default_is_mufa_table1_budget():
    """15 deep visual prompts + 10 key and 10 value prompts per block: 0.39 % of ViT-B/16 (MuFA: 0.39 %)."""
    tp = _share(VIT_B, "e2vpt")
    assert tp.trainable == 12 * (15 + 2 * 10) * 768 + HEAD
    assert round(tp.percent, 2) == 0.39, tp


# ---------------------------------------------------------------------------------------------- compare
def test_compare_end_to_end_writes_table_and_plot_and_skips_finished_methods(tmp_path, monkeypatch):
    from rspeft_fast.train import cli, compare

    out = tmp_path / "cmp"
    argv = ["--methods", "linear,lorand,ivpt", "--out", str(out), "--model", "vit_tiny_patch16_224", "--img-size", "32",
            "--global-pool", "avg", "--epochs", "1", "--embedded-per-class", "2", "--model-arg", "depth=1",
            "--no-progress", "--method-option", "ivpt:num_tokens=2"]
    assert compare.main(argv) == 0
    table = (out / "table.md").read_text()
    for m in ("linear", "lorand", "ivpt"):
        assert f"| {m} |" in table
        rebuilt = __import__("json").loads((out / m / "test.json").read_text())
        assert rebuilt["test_acc"] is not None and 0 <= rebuilt["test_acc"] <= 100
    assert (out / "table.png").stat().st_size > 1000
    rows = __import__("json").loads((out / "table.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["linear", "lorand", "ivpt"] and rows[2]["trainable_percent"] > 0

    # a re-run trains nothing: every method has its metrics.json (one removed: only that one runs again)
    (out / "lorand" / "metrics.json").unlink()
    ran = []
    real = cli.main
    monkeypatch.setattr(cli, "main", lambda a, **kw: ran.append(a[a.index("--method") + 1]) or real(a, **kw))
    assert compare.main(argv) == 0
    assert ran == ["lorand"]


def test_compare_refuses_per_run_flags_and_unknown_methods(tmp_path):
    from rspeft_fast.train import compare

    with pytest.raises(SystemExit, match="--method"):
        compare.main(["--out", str(tmp_path), "--method", "mufa"])
    with pytest.raises(SystemExit, match="unknown"):
        compare.main(["--out", str(tmp_path), "--methods", "mufa,prefix"])
    assert compare.TABLE1[7:9] == ("convpass", "lorand") and len(compare.TABLE1) == 13
