"""The block protocol on the backbones remote-sensing users fine-tune (issue 14), at tiny random configs
(no downloads): timm Eva (DINOv3 with RoPE + layer scale + registers; EVA-02 with SwiGLU), HF transformers
(ViT, Dinov2, DINOv3ViT, Swin, ConvNext, CLIP), torchvision Swin V2 (Satlas) and an open_clip SigLIP-style
CustomTextCLIP with a timm ViT image tower.

Per family and method: identity at initialisation, only the adapter (and head) tensors get gradients, the
adapters change the output and switch off exactly; save -> load into a fresh model; LoRA merge; fused ==
reference (interpreter) with the flash-attention rule; gradient checkpointing and torch.compile; the MuFA
share at the DINOv3 sat493m ViT-L config; one HarMA training step on HF CLIP.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import os

import pytest
import torch

import timm
if os.environ.get("CI"):  # pinned in requirements-ci.txt: a missing transformers fails CI instead of skipping
    import transformers
else:
    import transformers

import rspeft_fast as rf  # noqa: E402
from rspeft_fast.integration.families import FAMILIES, family_of, set_grad_checkpointing  # noqa: E402
from rspeft_fast.testing import AbsTerms, assert_fused_close  # noqa: E402

transformers.logging.set_verbosity_error()
inject_mod = importlib.import_module("rspeft_fast.integration.inject")
T = transformers


# ------------------------------------------------------------------------------------------- builders
def _eva_dinov3():  # DINOv3 layout: RoPE, layer scale, 4 register tokens (vit_*_dinov3 config, tiny)
    # layer scale 0.5 as in a trained model (the 1e-5 init would hide what passes through it)
    return timm.create_model("vit_small_patch16_dinov3", pretrained=False, img_size=32, embed_dim=64, depth=2,
                             num_heads=2, num_classes=5, init_values=0.5)


def _eva02():  # EVA-02: RoPE + SwiGLU (GluMlp)
    return timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=28, depth=2, num_classes=5)


_VIT_KW = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=16)


def _hf_vit():
    return T.ViTForImageClassification(T.ViTConfig(intermediate_size=128, num_labels=5, **_VIT_KW))


def _hf_dinov2():
    return T.Dinov2Model(T.Dinov2Config(mlp_ratio=2, use_swiglu_ffn=True, **_VIT_KW))


def _hf_dinov3():
    return T.DINOv3ViTModel(T.DINOv3ViTConfig(intermediate_size=128, num_register_tokens=2, **_VIT_KW))


def _hf_swin():
    return T.SwinModel(T.SwinConfig(image_size=32, patch_size=4, embed_dim=32, depths=[1, 1], num_heads=[1, 2], window_size=4))


def _hf_convnext():
    return T.ConvNextModel(T.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2))


def _tv_swin_v2():
    from torchvision.models import swin_transformer as S

    return S.SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[1, 1], num_heads=[1, 2], window_size=[4, 4],
                             block=S.SwinTransformerBlockV2, downsample_layer=S.PatchMergingV2, num_classes=5)


def _hf_clip():
    cfg = T.CLIPConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=500,
                         max_position_embeddings=12, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                           patch_size=16),
        projection_dim=32)
    return T.CLIPModel(cfg)


def _siglip():  # open_clip CustomTextCLIP + timm ViT tower, as ViT-B-16-SigLIP (timm's test_vit: d=64, 6 blocks, 160 px)
    import open_clip
    return open_clip.CustomTextCLIP(
        embed_dim=64,  # = the tower's width: timm_proj="none" as SigLIP
        vision_cfg=dict(timm_model_name="test_vit", timm_model_pretrained=False, timm_pool="map",
                        timm_proj="none", image_size=160),
        text_cfg=dict(context_length=12, vocab_size=500, width=64, heads=4, layers=2, no_causal_mask=True, proj_bias=True,
                      pool_type="last", norm_kwargs={"eps": 1e-6}),
        init_logit_bias=-10)


def _img(size, b=2, seed=3):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _text(b=2, seed=4):
    ids = torch.randint(3, 500, (b, 12), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(b, 12, dtype=torch.long)
    ids[0, 7], ids[0, 8:], mask[0, 8:] = 2, 0, 0  # sequence 0: eos then padding
    ids[1:, -1] = 2
    return ids, mask


def _vision_out(key):
    def run(model, inputs):
        out = model(inputs["x"]) if key is None else getattr(model(pixel_values=inputs["x"]), key)
        return out

    return run


def _hf_clip_out(model, inputs):
    out = model(input_ids=inputs["ids"], attention_mask=inputs["mask"], pixel_values=inputs["x"])
    return torch.cat([out.image_embeds, out.text_embeds])


def _open_clip_out(model, inputs):
    return torch.cat([model.encode_image(inputs["x"]), model.encode_text(inputs["ids"])])


# name: (builder, inputs, forward -> tensor, family)
BACKBONES = {
    "eva-dinov3": (_eva_dinov3, lambda: {"x": _img(32)}, _vision_out(None), "eva"),
    "eva02": (_eva02, lambda: {"x": _img(28)}, _vision_out(None), "eva"),
    "hf-vit": (_hf_vit, lambda: {"x": _img(32)}, _vision_out("logits"), "hf-vit"),
    "hf-dinov2": (_hf_dinov2, lambda: {"x": _img(32)}, _vision_out("last_hidden_state"), "hf-dinov2"),
    "hf-dinov3": (_hf_dinov3, lambda: {"x": _img(32)}, _vision_out("last_hidden_state"), "hf-dinov3"),
    "hf-swin": (_hf_swin, lambda: {"x": _img(32)}, _vision_out("last_hidden_state"), "hf-swin"),
    "hf-convnext": (_hf_convnext, lambda: {"x": _img(32)}, _vision_out("pooler_output"), "hf-convnext"),
    "resnet": (lambda: timm.create_model("resnet18", pretrained=False, num_classes=5), lambda: {"x": _img(32)},
               _vision_out(None), "resnet"),
    "tv-swin-v2": (_tv_swin_v2, lambda: {"x": _img(32)}, _vision_out(None), "tv-swin"),
    "hf-clip": (_hf_clip, lambda: dict(zip(("ids", "mask"), _text()), x=_img(32)), _hf_clip_out, "hf-clip"),
    "siglip": (_siglip, lambda: {"x": _img(160, b=1), "ids": torch.where(_text(1)[1].bool(), _text(1)[0], 0)},
               _open_clip_out, "clip"),
}
MGA = {"hidden": 32, "heads": 4}

CASES = [
    ("eva-dinov3", "mufa", {}), ("eva-dinov3", "adapter", {}), ("eva-dinov3", "lora", {"rank": 4}),
    ("eva-dinov3", "mga", MGA), ("eva-dinov3", "bitfit", {}), ("eva-dinov3", "linear", {}),
    ("eva02", "mufa", {}), ("eva02", "lora", {"rank": 4}),
    ("hf-vit", "mufa", {}), ("hf-vit", "lora", {"rank": 4}), ("hf-vit", "linear", {}), ("hf-vit", "mga", MGA),
    ("hf-dinov2", "adaptformer", {}), ("hf-dinov2", "lora", {"rank": 4}),
    ("hf-dinov3", "mufa", {}), ("hf-dinov3", "mga", MGA), ("hf-dinov3", "lora", {"rank": 4}),
    ("hf-swin", "mufa", {"rates": (4, 8)}), ("hf-swin", "lora", {"rank": 4}),
    ("hf-convnext", "bitfit", {}), ("hf-convnext", "layernorm", {}),
    ("resnet", "layernorm", {}), ("resnet", "linear", {}),
    ("tv-swin-v2", "mufa", {"rates": (4, 8)}), ("tv-swin-v2", "adapter", {"rates": (4,)}), ("tv-swin-v2", "bitfit", {}),
    ("hf-clip", "mga", MGA), ("siglip", "mga", MGA),
]
FUSED = {"mufa", "adaptformer", "adapter", "mga"}


def _ids(v):
    if isinstance(v, dict):
        return "-".join(f"{k}{x}" for k, x in v.items()) or "default"
    return str(v)


def build(name, seed=0):
    torch.manual_seed(seed)
    return BACKBONES[name][0]().eval()


def inject(model, method, opts, impl="reference"):
    extra = {"impl": impl} if method in FUSED else {}
    return rf.inject(model, method, **opts, **extra)


@torch.no_grad()
def randomise_trainable(model, seed=1):
    """Sensible random values for the tensors injection added (``up`` starts at zero, which would hide errors),
    or for every trainable tensor of methods that add none (bitfit, layernorm, ...)."""
    g = torch.Generator().manual_seed(seed)
    added = inject_mod.adapter_parameter_names(model)
    for name, p in model.named_parameters():
        if p.requires_grad and (name in added or not added):
            r = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
            p.copy_(torch.rand(p.shape, generator=g).to(p.dtype) * 1.5 - 0.5 if "gate" in name
                    else r * p.shape[-1] ** -0.5 if p.dim() >= 2 else r * 0.3)


def fwd_bwd(model, name, dtype=torch.float32, train=False, terms=None):
    """Output and the gradients of every trainable tensor for a fixed random ``<out, dy>``; ``terms``: an
    :class:`AbsTerms` to record the magnitudes of the summed terms in (for the float64 reference run)."""
    model.train(train)
    model.zero_grad(set_to_none=True)
    inputs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in BACKBONES[name][1]().items()}
    torch.manual_seed(7)  # train-mode randomness (DINOv3's RoPE jitter, drop path) the same in every run
    with terms if terms is not None else contextlib.nullcontext():
        out = BACKBONES[name][2](model, inputs)
        dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out.dtype)
        (out * dy).sum().backward()
    grads = {n.removeprefix("_orig_mod."): p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), grads


def forward(model, name):
    with torch.no_grad():
        return BACKBONES[name][2](model, BACKBONES[name][1]())


# ------------------------------------------------------------------------------------------------ tests
def test_every_backbone_is_in_its_declared_family():
    from rspeft_fast.integration.families import block_modules

    names = {f.name for f in FAMILIES}
    for key, (builder, _, _, fam) in BACKBONES.items():
        assert fam in names
        model = build(key)
        assert rf.integration.model_family(model) == fam, key
        blocks = block_modules(model)
        assert bool(blocks) == (fam not in ("hf-convnext", "resnet")), key
        assert all(type(b) in family_of(model).block_classes() or fam == "clip" for b in blocks)


@pytest.mark.parametrize("name,method,opts", CASES, ids=_ids)
def test_identity_grads_and_switch_off(name, method, opts):
    model = build(name)
    bare = forward(model, name)
    inject(model, method, opts)
    assert model.rspeft_adapted or method == "linear"
    if name == "eva02" and method == "lora":  # EVA-02's q/v biases now added after qkv(x): last-bit rounding only
        torch.testing.assert_close(forward(model, name), bare, atol=1e-6, rtol=1e-6)
    else:
        assert torch.equal(forward(model, name), bare), f"{name}+{method}: not the identity at init"

    randomise_trainable(model)
    out, grads = fwd_bwd(model, name)
    assert grads and all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not frozen, f"frozen tensors with a gradient: {frozen[:5]}"
    added = inject_mod.adapter_parameter_names(model)
    if method not in ("bitfit", "layernorm", "linear", "full"):  # adapters: new tensors only, plus the head
        head = inject_mod._head(model, family_of(model))
        head_names = {f"{n}" for n, p in model.named_parameters() if head is not None and any(p is q for q in head.parameters())}
        assert set(grads) - added <= head_names, sorted(set(grads) - added - head_names)[:5]
    if method not in ("bitfit", "layernorm", "linear", "full"):
        assert (out - bare).abs().max() > 1e-3 * bare.abs().max(), "the adapters do not change the output"
        with rf.adapters_disabled(model):
            off = forward(model.eval(), name)
        if name == "eva02" and method == "lora":
            torch.testing.assert_close(off, bare, atol=1e-6, rtol=1e-6)
        else:
            assert torch.equal(off, bare)


SAVE_CASES = [("eva-dinov3", "mufa", {}), ("eva02", "lora", {"rank": 4}), ("hf-vit", "linear", {}),
              ("hf-dinov3", "mga", MGA), ("hf-swin", "mufa", {"rates": (4, 8)}), ("tv-swin-v2", "adapter", {"rates": (4,)}),
              ("hf-clip", "mga", MGA)]


@pytest.mark.parametrize("name,method,opts", SAVE_CASES, ids=_ids)
def test_save_load_into_fresh_model(tmp_path, name, method, opts):
    model = inject(build(name), method, opts)
    randomise_trainable(model)
    want = forward(model, name)
    path = tmp_path / "adapters.safetensors"
    rf.save_adapters(model, path)
    fresh = build(name)  # same backbone weights (same seed), no adapters
    rf.load_adapters(fresh, path)
    assert fresh.rspeft_adapted == model.rspeft_adapted
    assert torch.equal(forward(fresh, name), want)


@pytest.mark.parametrize("name", ["eva-dinov3", "hf-vit", "hf-swin"])
def test_merge_lora(name):
    model = inject(build(name), "lora", {"rank": 4, "alpha": 8})
    randomise_trainable(model)
    before = forward(model, name)
    rf.merge_adapters(model)
    assert not any("lora" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(forward(model, name), before, atol=1e-5, rtol=1e-5)


FUSED_CASES = [("eva-dinov3", "mufa", {}), ("hf-dinov3", "mga", {"hidden": 64, "heads": 4}),
               ("hf-clip", "mga", {"hidden": 64, "heads": 4})]


@pytest.mark.parametrize("name,method,opts", FUSED_CASES, ids=_ids)
def test_fused_equals_reference_inside_model(name, method, opts):
    # fused (interpreter) and eager in fp32 against the eager model in fp64: the flash-attention rule
    fused, eager = inject(build(name), method, opts, "triton"), inject(build(name), method, opts, "reference")
    randomise_trainable(fused)
    randomise_trainable(eager)
    ref = copy.deepcopy(eager).double()
    terms = AbsTerms()  # every gradient of a parameter is a sum over B·L rows: its floor scales with Σ|terms|
    a, b, c = fwd_bwd(fused, name), fwd_bwd(eager, name), fwd_bwd(ref, name, torch.float64, terms=terms)
    assert_fused_close(list(a), list(b), list(c), name=f"{name}+{method}", terms=[None, terms.of(c[1])])


CKPT_CASES = [("eva-dinov3", "mufa", {}), ("hf-dinov3", "mufa", {}), ("hf-swin", "lora", {"rank": 4}),
              ("hf-clip", "mga", {**MGA, "text_padding_mask": True}), ("siglip", "mga", {**MGA, "text_padding_mask": True})]  # the CLIPs with padded text: the mask survives recompute


@pytest.mark.parametrize("name,method,opts", CKPT_CASES, ids=_ids)
def test_grad_checkpointing_same_gradients(name, method, opts):
    plain = inject(build(name), method, opts)
    ckpt = inject(build(name), method, opts)
    randomise_trainable(plain)
    randomise_trainable(ckpt)
    set_grad_checkpointing(ckpt, True)  # the family's own switch (timm / HF), as the CLIs' --grad-checkpointing
    assert any(getattr(m, "gradient_checkpointing", getattr(m, "grad_checkpointing", False)) is True for m in ckpt.modules())
    (oa, ga), (ob, gb) = fwd_bwd(ckpt, name, train=True), fwd_bwd(plain, name, train=True)
    assert torch.equal(oa, ob)
    for n in ga:  # recomputation replays the same float operations on CPU (and the MGA text mask)
        assert torch.equal(ga[n], gb[n]), n
    if name in ("hf-clip", "siglip"):  # the text padding mask matters here: without it the outputs differ
        nomask = inject(build(name), method, dict(opts, text_padding_mask=False))
        randomise_trainable(nomask)
        assert not torch.equal(fwd_bwd(nomask, name, train=True)[0], oa)


COMPILE_CASES = [("eva-dinov3", "mufa", {}), ("hf-vit", "mufa", {}), ("hf-clip", "mga", MGA)]


@pytest.mark.parametrize("name,method,opts", COMPILE_CASES, ids=_ids)
def test_compile_same_results(name, method, opts):
    eager = inject(build(name), method, opts)
    randomise_trainable(eager)
    want = fwd_bwd(eager, name)
    model = inject(build(name), method, opts)
    randomise_trainable(model)
    torch._dynamo.reset()
    # fullgraph where the backbone itself has no graph break (timm Eva; HF CLIP with the text-mask hooks)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=name != "hf-vit")
    got = fwd_bwd(compiled, name)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-4)
    assert got[1].keys() == want[1].keys()
    for n in want[1]:
        torch.testing.assert_close(got[1][n], want[1][n], atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
    torch._dynamo.reset()


def test_mufa_share_at_dinov3_sat493m_vit_large():
    # the sat493m checkpoint's architecture (ViT-L/16, d=1024, 24 blocks), built on the meta device (no memory)
    with torch.device("meta"):
        model = timm.create_model("vit_large_patch16_dinov3.sat493m", pretrained=False)
        rf.inject(model, "mufa")
    d, depth = model.embed_dim, len(model.blocks)
    r = d // 8 + d // 16 + d // 32
    per_block = r * d + r + d * r + d + 3  # down, up, 3 gates (SPEC §1)
    info = rf.trainable_parameters(model)
    assert (d, depth, model.num_classes) == (1024, 24, 0)
    assert info.trainable == depth * per_block
    assert info.backbone == sum(p.numel() for n, p in model.named_parameters() if ".adapter." not in n)
    # README: 11.04 M tuned = 3.64 % of the 303.1 M backbone (no head: the checkpoint is a feature extractor)
    assert abs(info.percent - 100 * depth * per_block / info.backbone) < 1e-9
    assert 3.6 < info.percent < 3.7, info


def test_hf_clip_mga_weighted_triplet_training_step():
    model = inject(build("hf-clip"), "mga", MGA)
    inputs = BACKBONES["hf-clip"][1]()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    out = model(input_ids=inputs["ids"], attention_mask=inputs["mask"], pixel_values=inputs["x"])
    img = torch.nn.functional.normalize(out.image_embeds, dim=-1)
    txt = torch.nn.functional.normalize(out.text_embeds, dim=-1)
    loss = rf.weighted_triplet_loss(img, txt, margin=0.2, gamma=2.0)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable
    assert any(".adapter." in n for n in changed) and any("text_model" in n for n in changed)


def test_hf_clip_text_mask_reaches_text_adapters_only():
    assert rf.integration.config.config_for("mga").text_padding_mask is False  # HarMA's default: no mask
    model = inject(build("hf-clip"), "mga", {**MGA, "text_padding_mask": True})
    seen = {}
    for name, mod in model.named_modules():
        if isinstance(mod, rf.MGAdapter):
            mod.register_forward_pre_hook(lambda m, a, kw, name=name: seen.__setitem__(name, kw.get("key_padding_mask")),
                                          with_kwargs=True)
    inputs = BACKBONES["hf-clip"][1]()
    forward(model, "hf-clip")
    text = [v for k, v in seen.items() if k.startswith("text_model")]
    assert text and all(torch.equal(v, inputs["mask"] == 0) for v in text)
    assert all(v is None for k, v in seen.items() if k.startswith("vision_model"))


def test_unsupported_methods_say_why():
    with pytest.raises(ValueError, match="rotary"):
        rf.inject(build("eva-dinov3"), "vpt")
    with pytest.raises(ValueError, match="ResNets get bitfit"):
        rf.inject(build("resnet"), "mufa")
    with pytest.raises(ValueError, match="inline"):
        rf.inject(build("hf-convnext"), "eqam")
    with pytest.raises(ValueError, match="reads qkv.weight"):
        rf.inject(build("tv-swin-v2"), "lora")
    with pytest.raises(ValueError, match="no classifier head|has none"):
        rf.inject(build("hf-dinov3"), "linear")


# ------------------------------------------------------------------------------ create_classifier (CLI models)
HF_SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, patch_size=16)


def test_create_classifier_hf_from_class_type_and_local_checkpoints(tmp_path):
    from rspeft_fast.integration.models import ModelBuildError, create_classifier

    x = _img(32)
    torch.manual_seed(0)
    m = create_classifier("hf:ViTForImageClassification", num_classes=7, img_size=32, model_args=HF_SMALL).eval()
    with torch.no_grad():
        y = m(x)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 7)  # logits, as a timm classifier returns
    assert rf.integration.model_family(m) == "hf-vit"
    rf.inject(m, "mufa")
    assert set(m.rspeft_trainable) >= {"classifier.weight", "classifier.bias"}
    with torch.no_grad():
        assert torch.equal(m(x), y)

    # a save_pretrained folder and a weights file: backbone loaded, a classifier of another size re-initialised
    src = create_classifier("hf:vit", num_classes=3, img_size=32, model_args=HF_SMALL).eval()
    src.save_pretrained(tmp_path / "folder")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    for ckpt in (tmp_path / "folder", tmp_path / "w.safetensors"):
        got = create_classifier("hf:vit", num_classes=5, img_size=32, model_args=HF_SMALL, checkpoint=str(ckpt)).eval()
        sd, ref = got.state_dict(), src.state_dict()
        assert got.classifier.out_features == 5
        assert all(torch.equal(sd[k], ref[k]) for k in ref if not k.startswith("classifier")), ckpt
    with pytest.raises(ModelBuildError, match="no hub download"):
        create_classifier("hf:vit", num_classes=2, pretrained=True)
    with pytest.raises(ModelBuildError, match="no such file"):
        create_classifier("hf:vit", num_classes=2, checkpoint=str(tmp_path / "missing"))
    with pytest.raises(ModelBuildError, match="no class"):
        create_classifier("hf:NoSuchForImageClassification", num_classes=2)
    with pytest.raises(ModelBuildError, match="model_type"):
        create_classifier("hf:not-a-model-type", num_classes=2)


def test_create_classifier_timm_eva_checkpoint_keeps_backbone_new_head(tmp_path):
    from safetensors.torch import save_file

    from rspeft_fast.integration.models import create_classifier

    args = dict(embed_dim=64, depth=2, num_heads=2, init_values=0.5)
    src = create_classifier("vit_small_patch16_dinov3", num_classes=3, img_size=32, model_args=args)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "eva.safetensors"))
    got = create_classifier("vit_small_patch16_dinov3", num_classes=6, img_size=32, model_args=args,
                            checkpoint=str(tmp_path / "eva.safetensors"))
    assert got.num_classes == 6
    sd = got.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in src.state_dict().items() if not k.startswith("head"))
