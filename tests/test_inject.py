"""inject() on every supported family: shapes, identity at initialisation, frozen backbone, configs."""
import copy
import json

import pytest
import torch
from torch import nn

import timm

import rspeft_fast as rf  # noqa: E402
from rspeft_fast.integration import SUPPORTED, config_for  # noqa: E402
from rspeft_fast.integration.config import AdapterConfig  # noqa: E402

# small variants (the adapted code paths are the same as in the full-size models)
VIT = ("vit_tiny_patch16_224", {"img_size": 32, "depth": 4})
SWIN = ("swin_tiny_patch4_window7_224", {"img_size": 64, "embed_dim": 32, "depths": (1, 1, 2, 1), "num_heads": (1, 2, 4, 8)})
CONVNEXT = ("convnext_atto", {"depths": (1, 1, 2, 1)})


def _model(spec, **kw):
    name, extra = spec
    return timm.create_model(name, pretrained=False, **extra, **kw).eval()


def _x(spec, b=2):
    s = spec[1].get("img_size", 64)
    return torch.randn(b, 3, s, s)


def _randomise_trainable(model, std=0.05):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


def _tiny_clip():
    from _helpers import tiny_clip

    return tiny_clip().eval()


IDENTITY_CASES = [
    (VIT, "mufa", {}),
    (VIT, "mufa", {"placement": "serial", "rates": (4, 8)}),
    (VIT, "adaptformer", {}),
    (VIT, "adapter", {}),
    (VIT, "lora", {"rank": 4}),
    (VIT, "bitfit", {}),
    (VIT, "layernorm", {}),
    (VIT, "linear", {}),
    (VIT, "full", {}),
    (VIT, "mga", {"hidden": 32, "heads": 4}),
    (SWIN, "mufa", {}),
    (SWIN, "adapter", {}),
    (SWIN, "lora", {}),
    (CONVNEXT, "eqam", {}),
    (CONVNEXT, "eqam", {"bits": 4, "reduction": 8}),
]


@pytest.mark.parametrize("spec,method,opts", IDENTITY_CASES, ids=lambda v: v[0] if isinstance(v, tuple) else str(v))
def test_identity_at_init_and_frozen_backbone(spec, method, opts):
    model = _model(spec)
    x = _x(spec)
    with torch.no_grad():
        ref = model(x)
    rf.inject(model, method, **opts)
    with torch.no_grad():
        out = model(x)
    assert out.shape == ref.shape
    # adapters start as the identity of the backbone: exactly the same output
    assert torch.equal(out, ref), f"{method}: max diff {(out - ref).abs().max().item()}"

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "nothing is trainable"
    head_mod = model.get_classifier()
    head = {n for n, p in model.named_parameters() if any(p is q for q in head_mod.parameters())}
    if method == "full":
        assert trainable == {n for n, _ in model.named_parameters()}
    elif method == "linear":
        assert trainable == head
    else:
        assert head <= trainable
        assert len(trainable) < len(list(model.parameters()))

    # after randomising the adapters, a backward pass reaches exactly the trainable tensors
    _randomise_trainable(model)
    model.train()
    model(x).square().mean().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{n} is trainable but got no gradient"
        else:
            assert p.grad is None, f"{n} is frozen but got a gradient"


@pytest.mark.parametrize("spec,method", [(VIT, "mufa"), (SWIN, "adaptformer"), (CONVNEXT, "eqam+capm"), (VIT, "lora")], ids=str)
def test_adapters_change_output_and_can_be_disabled(spec, method):
    model = _model(spec)
    x = _x(spec)
    bare = copy.deepcopy(model)
    rf.inject(model, method)
    _randomise_trainable(model)
    with torch.no_grad():
        on = model(x)
        with rf.adapters_disabled(model):
            off = model(x)
        rf.enable_adapters(model, False)
        off2 = model(x)
        rf.enable_adapters(model, True)
        on2 = model(x)
        # the bare backbone: the injected model's head with the bare blocks
        bare.load_state_dict({k: v for k, v in model.state_dict().items() if k in bare.state_dict()})
        ref = bare(x)
    assert not torch.allclose(on, off)
    assert torch.equal(off, ref) and torch.equal(off2, ref)
    assert torch.equal(on, on2)


def test_mufa_vit_base_trainable_percentage_matches_paper():
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=1000)
    rf.inject(model, "mufa", num_classes=21)  # UCM: 21 classes
    tp = rf.trainable_parameters(model)
    assert abs(tp.percent - 3.64) < 0.05, tp
    # per layer: down (168, 768) + 168, up (768, 168) + 768, gate 3; head 768*21 + 21
    assert tp.trainable == 12 * (2 * 168 * 768 + 168 + 768 + 3) + 768 * 21 + 21
    assert tp.total - tp.backbone == tp.trainable - (768 * 21 + 21)
    assert model.num_classes == 21 and model.rspeft_config.num_classes == 21
    assert "trainable%" in str(tp)


def test_swin_mufa_bottlenecks_follow_stage_dims():
    model = _model(SWIN)
    rf.inject(model, "mufa")
    dims = sorted({(b.adapter.dim, b.adapter.bottleneck) for b in model.modules() if hasattr(b, "adapter")})
    assert dims == [(32, 7), (64, 14), (128, 28), (256, 56)]


def test_convnext_capm_per_stage_and_eqam_per_block():
    model = _model(CONVNEXT)
    rf.inject(model, "eqam+capm", num_prompts=4)
    from rspeft_fast import CAPM, EQAM

    assert sum(isinstance(m, CAPM) for m in model.modules()) == len(model.stages)
    assert sum(isinstance(m, EQAM) for m in model.modules()) == sum(len(s.blocks) for s in model.stages)
    assert model.rspeft_config.to_dict()["method"] == "eqam+capm"
    x = _x(CONVNEXT)
    out = model(x)
    assert out.shape == (2, 1000)
    out.sum().backward()
    assert all(m.prompts.grad is not None for m in model.modules() if isinstance(m, CAPM))


def test_capm_alone_at_zero_prompts_is_identity():
    model = _model(CONVNEXT)
    x = _x(CONVNEXT)
    with torch.no_grad():
        ref = model(x)
    rf.inject(model, "capm")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("capm.prompts"):
                p.zero_()
        assert torch.equal(model(x), ref)


def test_vpt_shallow_and_deep():
    for deep in (False, True):
        model = _model(VIT, num_classes=4)
        x = _x(VIT)
        with torch.no_grad():
            ref = model(x)
        rf.inject(model, "vpt", num_tokens=3, deep=deep)
        assert model.vpt_prompts.shape == (len(model.blocks) if deep else 1, 3, model.embed_dim)
        out = model(x)
        assert out.shape == ref.shape
        with torch.no_grad(), rf.adapters_disabled(model):
            assert torch.equal(model(x), ref)
        # the prompts are removed before the final norm: the feature map keeps its token count
        with torch.no_grad():
            assert model.forward_features(x).shape[1] == 1 + (32 // 16) ** 2
        out.sum().backward()
        grads = {n for n, p in model.named_parameters() if p.grad is not None}
        assert grads == {"vpt_prompts", "head.weight", "head.bias"}


def test_mga_clip_identity_grads_and_text_mask():
    model = _tiny_clip()
    model.requires_grad_(False)  # nn.MultiheadAttention takes another (fast) path once frozen: compare frozen to frozen
    img = torch.randn(2, 3, 32, 32)
    txt = torch.randint(1, 500, (2, 12))
    txt[0, 7:] = 0  # padding
    with torch.no_grad():
        ri, rt = model.encode_image(img), model.encode_text(txt)
    rf.inject(model, "mga", hidden=32, heads=4, text_padding_mask=True)  # the mask is an option (HarMA: none)
    with torch.no_grad():
        assert torch.equal(model.encode_image(img), ri)
        assert torch.equal(model.encode_text(txt), rt)

    from rspeft_fast import BiShareAdapter, MGAdapter

    text_ads = [b.adapter for b in model.transformer.resblocks]
    img_ads = [b.adapter for b in model.visual.transformer.resblocks]
    assert all(isinstance(a, MGAdapter) and isinstance(a.share, BiShareAdapter) for a in text_ads)
    assert all(isinstance(a, MGAdapter) and a.share is None for a in img_ads)
    gates = [b.adapter_gate for b in model.transformer.resblocks]
    assert all(abs(g.item() - 0.6) < 1e-6 and g.requires_grad for g in gates)

    # the text-tower adapters receive the key padding mask (token == 0); it is cleared afterwards
    seen = []
    h = text_ads[0].register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("key_padding_mask")), with_kwargs=True)
    _randomise_trainable(model)
    loss = model.encode_text(txt).square().sum() + model.encode_image(img).square().sum()
    h.remove()
    assert seen and torch.equal(seen[0], txt == 0)
    assert model.transformer.resblocks[0].adapter_text_ctx.mask is None
    loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".adapter" in n for n in names)


def test_mga_clip_share_across_towers_and_towers_option():
    model = _tiny_clip()
    rf.inject(model, "mga", hidden=32, heads=4, share_across_towers=True)
    for ti, vi in zip(model.transformer.resblocks, model.visual.transformer.resblocks):
        assert vi.adapter.share is ti.adapter.share
    model = _tiny_clip()
    rf.inject(model, "mga", hidden=32, heads=4, towers="image")
    assert not hasattr(model.transformer.resblocks[0], "adapter")
    assert hasattr(model.visual.transformer.resblocks[0], "adapter")


def test_target_regex_selects_blocks():
    model = _model(VIT)
    rf.inject(model, "mufa", target=r"^blocks\.(0|2)$")
    adapted = [n for n, m in model.named_modules() if isinstance(m, rf.MuFAAdapter)]
    assert adapted == ["blocks.0.adapter", "blocks.2.adapter"]
    with pytest.raises(ValueError, match="matched none"):
        rf.inject(_model(VIT), "mufa", target=r"^nothing$")


def test_errors_name_supported_families_and_methods():
    with pytest.raises(TypeError, match="timm VisionTransformer.*ConvNeXt.*open_clip"):
        rf.inject(nn.Sequential(nn.Linear(4, 4)), "mufa")
    with pytest.raises(ValueError, match="not supported on timm ConvNeXt"):
        rf.inject(_model(CONVNEXT), "mufa")
    with pytest.raises(ValueError, match="unknown method"):
        rf.inject(_model(VIT), "prefix-tuning")
    with pytest.raises(TypeError, match="unknown options"):
        rf.inject(_model(VIT), "mufa", rank=4)
    with pytest.raises(ValueError, match="placement"):
        rf.MuFAConfig(placement="sideways")
    model = rf.inject(_model(VIT), "mufa")
    with pytest.raises(RuntimeError, match="already"):
        rf.inject(model, "mufa")


def test_configs_roundtrip_json_and_inject_accepts_config():
    for method in sorted({m for ms in SUPPORTED.values() for m in ms}):
        cfg = config_for(method)
        back = AdapterConfig.from_json(cfg.to_json())
        assert back == cfg and type(back) is type(cfg)
        assert json.loads(cfg.to_json())["method"] == method
    cfg = rf.MuFAConfig(rates=(16, 32), scale=0.5, impl={"mufa": "reference"})
    model = rf.inject(_model(VIT), cfg)
    ads = [m for m in model.modules() if isinstance(m, rf.MuFAAdapter)]
    assert ads and all(a.rates == (16, 32) and a.scale == 0.5 and a.impl == "reference" for a in ads)
    with pytest.raises(ValueError):
        rf.MuFAConfig(impl="cuda-magic")


def test_merge_lora_and_bitfit():
    model = _model(VIT, num_classes=3)
    x = _x(VIT)
    rf.inject(model, "lora", rank=4, alpha=8)
    _randomise_trainable(model)
    with torch.no_grad():
        before = model(x)
    rf.merge_adapters(model)
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert all(type(b.attn.qkv) is nn.Linear for b in model.blocks)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    # a merged model is not "not injected": switching off says the adapters were merged and what to do
    with pytest.raises(RuntimeError, match="merged into the backbone.*deepcopy"):
        rf.enable_adapters(model, False)
    with pytest.raises(RuntimeError, match="merged into the backbone"):
        with rf.adapters_disabled(model):
            pass

    model = rf.inject(_model(VIT), "bitfit")
    assert rf.merge_adapters(model) is model
    with pytest.warns(UserWarning, match="nothing|no adapter"):
        rf.enable_adapters(model, False)
    with pytest.raises(NotImplementedError, match="not linear"):
        rf.merge_adapters(rf.inject(_model(VIT), "mufa"))


def test_target_fullmatch_one_meaning_across_methods_and_report():
    # a string is re.fullmatch-ed (HF peft's rule): "blocks.1" adapts block 1, not blocks 10 / 11
    model = _model(("vit_tiny_patch16_224", {"img_size": 32, "depth": 12}))
    rf.inject(model, "mufa", target="blocks.1")
    assert model.rspeft_adapted == ("blocks.1",)
    assert [n for n, m in model.named_modules() if isinstance(m, rf.MuFAAdapter)] == ["blocks.1.adapter"]
    info = rf.trainable_parameters(model)
    assert info.adapted == ("blocks.1",) and "adapted 1 modules: blocks.1" in str(info)
    # the same target means the same place for LoRA (units inside the selected block) and BitFit
    lora = rf.inject(_model(VIT), "lora", target="blocks.1")
    assert lora.rspeft_adapted == ("blocks.1.attn.qkv",)
    bitfit = rf.inject(_model(VIT), "bitfit", target="blocks.1", train_head=False)
    assert bitfit.rspeft_adapted and all(n.startswith("blocks.1.") for n in bitfit.rspeft_adapted)
    assert {n for n, p in bitfit.named_parameters() if p.requires_grad} == {
        n for n, _ in bitfit.named_parameters() if n.startswith("blocks.1.") and n.endswith("bias")}
    # a list: exact names or dotted suffixes
    m = rf.inject(_model(VIT), "lora", target=["blocks.0", "3.attn.qkv"])
    assert m.rspeft_adapted == ("blocks.0.attn.qkv", "blocks.3.attn.qkv")
    assert rf.LoRAConfig(target=("blocks.0",)).to_dict()["target"] == ["blocks.0"]
    # a name below the method's unit selects nothing: the error says so and how targets match
    with pytest.raises(ValueError, match="matched none of the 4 transformer blocks.*fullmatch"):
        rf.inject(_model(VIT), "mufa", target="blocks.1.mlp")
    with pytest.raises(ValueError, match="non-empty strings"):
        rf.MuFAConfig(target=["blocks.0", ""])


def test_a_method_declared_in_one_place_is_known_everywhere(tmp_path):
    """What a file in ``integration/methods/`` declares (config, injector, families, why not) is all inject,
    config_for, the families, trainable_parameters and save / load need (the package docstring's recipe)."""
    from dataclasses import dataclass
    from typing import ClassVar

    from rspeft_fast.integration.config import OptionError
    from rspeft_fast.integration.families import family_by_name
    from rspeft_fast.integration.methods._common import attach, blocks_of, dd
    from rspeft_fast.integration.registry import REGISTRY, register

    @dataclass
    class DemoConfig(AdapterConfig):
        method: ClassVar[str] = "demo-serial"
        rate: int = 16

        def validate(self) -> None:
            super().validate()
            if self.rate <= 0:
                raise OptionError(f"rate must be positive, got {self.rate}")

    def inject_demo(model, fam, cfg, target):
        return [attach(fam, n, b, rf.MuFAAdapter(fam.block_dim(b), rates=(cfg.rate,), impl="reference").to(**dd(b)), "serial")
                for n, b in target.select(blocks_of(model, fam), "transformer blocks")]

    register("demo-serial", DemoConfig, ("vit",), why_not={"swin": "demo: ViT only"})(inject_demo)
    try:
        assert "demo-serial" in family_by_name("vit").methods and config_for("demo-serial", rate="8").rate == 8
        with pytest.raises(OptionError, match="rate"):
            config_for("demo-serial", rate=0)
        with pytest.raises(ValueError, match="demo: ViT only"):
            rf.inject(_model(SWIN), "demo-serial")
        torch.manual_seed(0)
        model = rf.inject(_model(VIT, num_classes=3), "demo-serial", target=r"blocks\.[01]")
        tp = rf.trainable_parameters(model)
        assert tp.adapted == ("blocks.0", "blocks.1") and tp.backbone == sum(p.numel() for p in _model(VIT, num_classes=3).parameters())
        _randomise_trainable(model)
        rf.save_adapters(model, tmp_path / "demo.safetensors")
        torch.manual_seed(0)
        fresh = rf.load_adapters(_model(VIT, num_classes=3), tmp_path / "demo.safetensors")
        x = _x(VIT)
        with torch.no_grad():
            assert torch.equal(fresh(x), model(x))
    finally:
        REGISTRY.pop("demo-serial", None)
