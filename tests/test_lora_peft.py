"""LoRA wherever a linear map is, checked against HF peft 0.21 on the same weights (outputs, gradients, one AdamW
step, merge), against the formulas on nn.MultiheadAttention (open_clip towers), and the ways back: unload,
merge(keep=True) → unmerge, merge_and_unload. peft is a test dependency (requirements-ci.txt): nothing is skipped."""
import contextlib
import copy
import io

import peft
import pytest
import timm
import torch
from torch import nn

import rspeft_fast as rf
from rspeft_fast.integration import _blocks
from rspeft_fast.reference import lora_mha_ref

VIT = ("vit_tiny_patch16_224", {"img_size": 32, "depth": 2, "num_classes": 3})
PEFT_RECIPE = dict(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["qkv", "fc1", "fc2"])


def _vit(seed=0):
    torch.manual_seed(seed)
    return timm.create_model(VIT[0], pretrained=False, **VIT[1])


def _tiny_clip(seed=0):
    from _helpers import tiny_clip

    return tiny_clip(seed)


def _hf_clip(seed=0):
    import transformers as T
    torch.manual_seed(seed)
    cfg = T.CLIPConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=500, max_position_embeddings=12, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=16),
        projection_dim=32)
    return T.CLIPModel(cfg)


def _randomise_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _to_peft(ours, theirs):
    """Copy our LoRA factors into the peft model (``x.lora_A`` → ``base_model.model.x.lora_A.default.weight``)."""
    tp = dict(theirs.named_parameters())
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "lora_" in n:
                mod, _, ab = n.rpartition(".")
                tp[f"base_model.model.{mod}.{ab}.default.weight"].copy_(p)


def _peft_name(n, theirs_names=()):
    mod, _, pn = n.rpartition(".")
    if "lora_" in pn:
        return f"base_model.model.{mod}.{pn}.default.weight"
    wrapped = f"base_model.model.{mod}.base_layer.{pn}"  # a bias of an adapted layer: inside peft's wrapper
    return wrapped if wrapped in theirs_names else f"base_model.model.{n}"


def _check_same_training(ours, theirs, run):
    """Outputs (train mode, dropout seeded), gradients, one AdamW step, outputs after it: bit for bit."""
    names = [n for n, p in ours.named_parameters() if p.requires_grad]
    tp = dict(theirs.named_parameters())
    pn = {n: _peft_name(n, tp) for n in names}
    assert sorted(pn.values()) == sorted(n for n, p in tp.items() if p.requires_grad)
    ours.train(), theirs.train()
    for m in theirs.modules():  # a frozen BatchNorm stays in eval in ours (its statistics are the backbone's)
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    opt_o = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    opt_t = torch.optim.AdamW([tp[pn[n]] for n in names], lr=1e-2)
    torch.manual_seed(5)
    yo = run(ours)
    torch.manual_seed(5)
    yt = run(theirs)
    for a, b in zip(yo, yt):
        assert torch.equal(a, b)
    g = torch.Generator().manual_seed(6)
    w = [torch.randn(a.shape, generator=g) for a in yo]
    sum((a * r).sum() for a, r in zip(yo, w)).backward()
    sum((a * r).sum() for a, r in zip(yt, w)).backward()
    op = dict(ours.named_parameters())
    for n in names:
        assert op[n].grad is not None and op[n].grad.abs().sum() > 0, n
        assert torch.equal(op[n].grad, tp[pn[n]].grad), n
    opt_o.step(), opt_t.step()
    for n in names:
        assert torch.equal(op[n], tp[pn[n]]), n
    ours.eval(), theirs.eval()
    with torch.no_grad():
        for a, b in zip(run(ours), run(theirs)):
            assert torch.equal(a, b)


def test_peft_recipe_on_timm_vit_qkv_and_mlp_equals_peft():
    """A peft user's recipe (r=8 on qkv, fc1, fc2, dropout 0.1), with peft's option names, gives peft's numbers."""
    base = _vit()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**PEFT_RECIPE))
    ours = rf.inject(base, "lora", train_head=False, **PEFT_RECIPE)
    assert ours.rspeft_adapted == tuple(f"blocks.{i}.{m}" for i in range(2) for m in ("attn.qkv", "mlp.fc1", "mlp.fc2"))
    cfg = ours.rspeft_config
    assert (cfg.rank, cfg.alpha, cfg.dropout, cfg.target) == (8, 16.0, 0.1, ["qkv", "fc1", "fc2"])
    # the trainable-parameter line starts as peft's print_trainable_parameters, the backbone share beside it
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        theirs.print_trainable_parameters()
    line = str(rf.trainable_parameters(ours))
    assert line.startswith(buf.getvalue().strip() + " || backbone params: "), (line, buf.getvalue())
    _randomise_lora(ours)
    _to_peft(ours, theirs)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    _check_same_training(ours, theirs, lambda m: (m(x),))
    # merge: ours in place, peft's merge_and_unload
    rf.merge_adapters(ours)
    plain = theirs.merge_and_unload()
    with torch.no_grad():
        assert torch.equal(ours(x), plain(x))
    for (n, a), (_, b) in zip(ours.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("opts", [dict(use_rslora=True, init_lora_weights="gaussian"), dict(bias="lora_only")],
                         ids=["rslora-gaussian", "bias-lora_only"])
def test_options_equal_peft(opts):
    base = _vit()
    recipe = dict(PEFT_RECIPE, lora_dropout=0.0, **opts)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**recipe))
    ours = rf.inject(base, "lora", train_head=False, **recipe)
    _randomise_lora(ours)
    _to_peft(ours, theirs)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    _check_same_training(ours, theirs, lambda m: (m(x),))


def test_hf_clip_projections_equal_peft():
    base = _hf_clip()
    recipe = dict(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**recipe))
    ours = rf.inject(base, "lora", **recipe)
    assert len(ours.rspeft_adapted) == 2 * 2 * 4  # two towers, two layers, four projections
    _randomise_lora(ours)
    _to_peft(ours, theirs)
    g = torch.Generator().manual_seed(3)
    px, ids = torch.randn(2, 3, 32, 32, generator=g), torch.randint(3, 500, (2, 12), generator=g)

    def run(m):
        out = m(input_ids=ids, pixel_values=px)
        return out.image_embeds, out.text_embeds

    _check_same_training(ours, theirs, run)
    rf.merge_adapters(ours)
    plain = theirs.merge_and_unload()
    with torch.no_grad():
        for a, b in zip(run(ours), run(plain)):
            assert torch.equal(a, b)


def test_resnet_1x1_convs_and_convnext_mlp_equal_peft():
    """1x1 convolutions (ResNet bottlenecks' conv1 / conv3, a strided 1x1 downsample) are linear maps: LoRA there
    equals peft's lora.Conv2d; ConvNeXt's MLP Linears are targets like any other."""
    torch.manual_seed(0)
    base = timm.create_model("resnet50", pretrained=False, layers=[1, 1, 1, 1], num_classes=3, zero_init_last=False)
    recipe = dict(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=r"layer\d\.\d\.(conv[13]|downsample\.0)")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**recipe))
    ours = rf.inject(base, "lora", train_head=False, **recipe)
    assert len(ours.rspeft_adapted) == 4 * 3 and type(ours.layer2[0].downsample[0]) is _blocks.LoRAConv1x1
    _randomise_lora(ours)
    _to_peft(ours, theirs)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    _check_same_training(ours, theirs, lambda m: (m(x),))
    rf.merge_adapters(ours)
    plain = theirs.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), plain(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="1x1"):
        rf.inject(timm.create_model("resnet50", pretrained=False, layers=[1, 1, 1, 1]), "lora", target=["layer1.0.conv2"])
    with pytest.raises(ValueError, match="no attention; name the layers"):
        rf.inject(timm.create_model("resnet50", pretrained=False, layers=[1, 1, 1, 1]), "lora")
    torch.manual_seed(0)
    cnx = timm.create_model("convnext_atto", pretrained=False, num_classes=3)
    theirs = peft.get_peft_model(copy.deepcopy(cnx), peft.LoraConfig(r=4, target_modules=["fc1", "fc2"]))
    ours = rf.inject(cnx, "lora", r=4, target_modules=["fc1", "fc2"], train_head=False)
    _randomise_lora(ours)
    _to_peft(ours, theirs)
    _check_same_training(ours, theirs, lambda m: (m(x),))


def test_default_hf_clip_is_qkv():
    m = rf.inject(_hf_clip(), "lora", rank=2)
    assert {n.rpartition(".")[2] for n in m.rspeft_adapted} == {"q_proj", "k_proj", "v_proj"}


# ---------------------------------------------------------------- nn.MultiheadAttention (open_clip towers)
def test_mha_lora_equals_formula_reference_in_open_clip_towers():
    model = rf.inject(_tiny_clip(), "lora", rank=4, alpha=8, modules=r"^(in_proj|out_proj)$")
    attns = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(attns) == 4 and all(type(m) is _blocks.LoRAMultiheadAttention for m in attns)
    assert len(model.rspeft_adapted) == 8
    _randomise_lora(model)
    model.train()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 12, 64, generator=g, dtype=torch.float64)
    mask = torch.full((12, 12), float("-inf"), dtype=torch.float64).triu(1)  # the text tower's causal mask
    for mha in attns:
        m64 = copy.deepcopy(mha).double()
        xs = [x.clone().requires_grad_(True) for _ in range(2)]
        got = m64(xs[0], xs[0], xs[0], need_weights=False, attn_mask=mask)[0]
        ref = lora_mha_ref(xs[1], m64.num_heads, m64.in_proj_weight, m64.in_proj_bias, m64.out_proj.weight,
                           m64.out_proj.bias, m64.lora_scaling, (m64.lora_A, m64.lora_B),
                           (m64.out_proj.lora_A, m64.out_proj.lora_B), attn_mask=mask)
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
        w = torch.randn(got.shape, generator=g, dtype=torch.float64)
        params = [m64.lora_A, m64.lora_B, m64.out_proj.lora_A, m64.out_proj.lora_B]
        g_got = torch.autograd.grad((got * w).sum(), params + [xs[0]])
        g_ref = torch.autograd.grad((ref * w).sum(), params + [xs[1]])
        for a, b in zip(g_got, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_mha_lora_in_open_clip_default_and_targets():
    m = rf.inject(_tiny_clip(), "lora", rank=2)  # default: the packed q/k/v projection of both towers
    assert all(n.endswith("attn.in_proj") for n in m.rspeft_adapted) and len(m.rspeft_adapted) == 4
    m = rf.inject(_tiny_clip(), "lora", rank=2, target=r"transformer\.resblocks\.0\.attn\.out_proj")
    assert m.rspeft_adapted == ("transformer.resblocks.0.attn.out_proj",)
    assert type(m.transformer.resblocks[0].attn) is _blocks.LoRAMultiheadAttention
    m = rf.inject(_tiny_clip(), "lora", rank=2, target_modules=["c_fc"])  # open_clip's MLP Linear
    assert len(m.rspeft_adapted) == 4 and all(n.endswith("mlp.c_fc") for n in m.rspeft_adapted)
    with pytest.warns(UserWarning, match="does not apply"):
        rf.inject(_tiny_clip(), "lora", rank=2, dropout=0.1)


def test_mha_lora_clip_outputs_switch_save_load(tmp_path):
    base = _tiny_clip().eval().requires_grad_(False)  # frozen as the injected one (MHA's fast path depends on it)
    model = rf.inject(copy.deepcopy(base), "lora", rank=4, modules=r"^(in_proj|out_proj)$")
    _randomise_lora(model)
    model.eval()
    g = torch.Generator().manual_seed(4)
    img, txt = torch.randn(2, 3, 32, 32, generator=g), torch.randint(1, 500, (2, 12), generator=g)

    def run(m):
        with torch.no_grad():
            return m.encode_image(img), m.encode_text(txt)

    bare, adapted = run(base), run(model)
    assert (adapted[0] - bare[0]).abs().max() > 1e-3
    with rf.adapters_disabled(model):
        for a, b in zip(run(model), bare):
            assert torch.equal(a, b)
    # the formulas at model level: the weights W + scaling B A in a plain copy give the same outputs
    folded = copy.deepcopy(base)
    with torch.no_grad():
        for (n, m), (_, f) in zip(model.named_modules(), folded.named_modules()):
            if isinstance(m, _blocks.LoRAMultiheadAttention):
                f.in_proj_weight += m.lora_scaling * m.lora_B @ m.lora_A
                f.out_proj.weight += m.lora_scaling * m.out_proj.lora_B @ m.out_proj.lora_A
    for a, b in zip(adapted, run(folded)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    path = tmp_path / "clip_lora.safetensors"
    rf.save_adapters(model, path)
    fresh = rf.load_adapters(copy.deepcopy(base), path).eval()
    for a, b in zip(run(fresh), adapted):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- unload, merge(keep) / unmerge, merge_and_unload
def _classes(model):
    return [(n, type(m)) for n, m in model.named_modules()]


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _eva02(seed=0):  # EVA-02 (q/v biases): LoRA switches timm's qkv_bias_separate, unload switches it back
    torch.manual_seed(seed)
    return timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=28, depth=2, num_classes=5)


UNLOAD_CASES = [
    ("vit", "lora", dict(PEFT_RECIPE, lora_dropout=0.0)),
    ("eva02", "lora", {"rank": 4}),
    ("vit", "mufa", {}),
    ("vit", "vpt", {"num_tokens": 2, "deep": True}),
    ("clip", "lora", {"modules": r"^(in_proj|out_proj)$"}),
    ("clip", "mga", {"hidden": 32, "heads": 4, "impl": "reference"}),
    ("hf-clip", "lora", {"target_modules": ["q_proj", "v_proj", "fc1"]}),
]


@pytest.mark.parametrize("kind,method,opts", UNLOAD_CASES, ids=lambda v: str(v)[:24])
def test_unload_gives_back_the_original_model(kind, method, opts):
    build = {"vit": _vit, "eva02": _eva02, "clip": _tiny_clip, "hf-clip": _hf_clip}[kind]
    original = build().eval()
    model = rf.inject(copy.deepcopy(original), method, train_head=False, **opts)
    for n, p in model.named_parameters():  # adapters that would change the outputs
        if p.requires_grad and n in model.rspeft_added:
            with torch.no_grad():
                p.add_(0.05)
    g = torch.Generator().manual_seed(4)
    if kind in ("vit", "eva02"):
        inputs = (torch.randn(2, 3, 28 if kind == "eva02" else 32, 28 if kind == "eva02" else 32, generator=g),)
        run = lambda m: (m(*inputs),)  # noqa: E731
    elif kind == "clip":
        img, txt = torch.randn(2, 3, 32, 32, generator=g), torch.randint(1, 500, (2, 12), generator=g)
        run = lambda m: (m.encode_image(img), m.encode_text(txt))  # noqa: E731
    else:
        px, ids = torch.randn(2, 3, 32, 32, generator=g), torch.randint(3, 500, (2, 12), generator=g)
        run = lambda m: (m(input_ids=ids, pixel_values=px).logits_per_image,)  # noqa: E731
    with torch.no_grad():
        assert any(not torch.equal(a, b) for a, b in zip(run(model.eval()), run(original)))
    if kind == "eva02":
        assert model.blocks[0].attn.qkv_bias_separate and not original.blocks[0].attn.qkv_bias_separate
    if kind == "vit":  # what the user sets after inject is theirs: unload does not undo it
        model.set_grad_checkpointing(True)
        original.set_grad_checkpointing(True)
    assert rf.unload_adapters(model) is model
    assert _classes(model) == _classes(original) and _hooks(model) == _hooks(original)
    so, sm = original.state_dict(), model.state_dict()
    assert list(so) == list(sm) and all(torch.equal(so[k], sm[k]) for k in so)
    assert all(p.requires_grad for p in model.parameters())
    assert not [k for k in model.__dict__ if k.startswith("rspeft")]
    assert kind != "vit" or model.grad_checkpointing
    assert kind != "eva02" or not model.blocks[0].attn.qkv_bias_separate
    with torch.no_grad():
        for a, b in zip(run(model.eval()), run(original)):
            assert torch.equal(a, b)
    rf.inject(model, method, **opts)  # a clean backbone again: injectable


def test_merge_keep_then_unmerge_is_exact_and_merge_and_unload():
    model = rf.inject(_vit(), "lora", train_head=False, **dict(PEFT_RECIPE, lora_dropout=0.0))
    clip = rf.inject(_tiny_clip(), "lora", rank=4, modules=r"^(in_proj|out_proj)$")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    for m, run in ((model, lambda m: m(x)), (clip, lambda m: m.encode_image(x))):  # noqa: B023
        _randomise_lora(m)
        m.eval()
        with torch.no_grad():
            before = run(m)
            with rf.adapters_disabled(m):
                bare = run(m)
            rf.merge_adapters(m, keep=True)
            assert any("lora_A" in n for n, _ in m.named_parameters()) and m.rspeft_config is not None
            torch.testing.assert_close(run(m), before, rtol=1e-5, atol=1e-5)
            with rf.adapters_disabled(m):  # switched off while merged: the pre-merge weights run (MHA: the slow path,
                torch.testing.assert_close(run(m), bare, rtol=0 if m is model else 1e-6,
                                           atol=0 if m is model else 1e-6)  # not nn.MHA's fast path: last bits
            rf.unmerge_adapters(m)
            assert torch.equal(run(m), before)
            rf.merge_and_unload(m)
            assert not any(isinstance(mod, (_blocks.LoRALinear, _blocks.LoRAMultiheadAttention)) for mod in m.modules())
            assert not any("lora" in n for n, _ in m.named_parameters())
            torch.testing.assert_close(run(m), before, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="keep=True"):
        m = rf.inject(_vit(), "lora", rank=2)
        rf.unmerge_adapters(rf.merge_adapters(m))
    bitfit = rf.merge_adapters(rf.inject(_vit(), "bitfit"), keep=True)  # its tensors are the biases: nothing to keep
    assert rf.unmerge_adapters(bitfit).rspeft_config is not None


# ---------------------------------------------------------------- options and peft names
def test_peft_option_names_and_option_rules():
    cfg = rf.LoRAConfig(rank=4)
    assert rf.coerce_options("lora", {"r": "4", "lora_alpha": "8", "use_rslora": "true"}) == {
        "r": 4, "lora_alpha": 8.0, "use_rslora": True}
    with pytest.raises(rf.OptionError, match="given twice"):
        rf.inject(_vit(), "lora", r=4, rank=4)
    m = rf.inject(_vit(), "lora", r=4, lora_alpha=8, init_lora_weights=True, use_rslora=True)
    qkv = m.blocks[0].attn.qkv
    assert m.rspeft_config.init == "kaiming" and qkv.lora_scaling == 8 / 2 and torch.count_nonzero(qkv.lora_B) == 0
    for bad, what in ((dict(bias="some"), "bias"), (dict(init="pissa"), "init"), (dict(dropout=1.0), "dropout")):
        with pytest.raises(rf.OptionError, match=what):
            rf.LoRAConfig(**bad)
    # bias="all": every bias trains (peft's rule), the factors too
    m = rf.inject(_vit(), "lora", rank=2, bias="all", train_head=False)
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {
        n for n, _ in m.named_parameters() if "bias" in n or "lora_" in n}
    # a target naming Linears adapts them; one naming nothing linear says so
    m = rf.inject(_vit(), "lora", target=r".*mlp\.fc1")
    assert m.rspeft_adapted == ("blocks.0.mlp.fc1", "blocks.1.mlp.fc1")
    m = rf.inject(_vit(), "lora", target=["head"], train_head=False)
    assert m.rspeft_adapted == ("head",) and type(m.head) is _blocks.LoRALinear
    with pytest.raises(ValueError, match="names no nn.Linear"):
        rf.inject(_vit(), "lora", target=r".*mlp")
    assert cfg.to_dict()["rank"] == 4 and "r" not in cfg.to_dict()


# ---------------------------------------------------------------- named adapters
def test_two_named_adapters_switch_save_load_delete(tmp_path):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    original = _vit().eval()
    model = rf.inject(copy.deepcopy(original), "lora", adapter_name="ucm", r=8, target_modules=["qkv"], train_head=False)
    _randomise_lora(model, seed=1)
    ucm_alone = copy.deepcopy(model).eval()
    rf.inject(model, "lora", adapter_name="aid", r=4, lora_alpha=8, target_modules=["fc1", "qkv"], train_head=False)
    assert model.rspeft_active == "aid" and rf.adapter_names(model) == ("aid", "ucm")
    assert model.rspeft_adapted == tuple(f"blocks.{i}.{m}" for i in range(2) for m in ("attn.qkv", "mlp.fc1"))
    # only the active adapter's factors are in the module tree (and the optimiser's, and the kernels') reach
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.{i}.{m}.lora_{ab}" for i in range(2) for m in ("attn.qkv", "mlp.fc1") for ab in "AB"}
    assert model.blocks[0].attn.qkv.lora_A.shape[0] == 4
    _randomise_lora(model, seed=2)
    aid_alone = rf.inject(copy.deepcopy(original), "lora", r=4, lora_alpha=8, target_modules=["fc1", "qkv"],
                          train_head=False)
    _randomise_lora(aid_alone, seed=2)
    model.eval()
    with torch.no_grad():
        y_aid, y_ucm = aid_alone.eval()(x), ucm_alone(x)
        assert not torch.equal(y_aid, y_ucm)
        assert torch.equal(model(x), y_aid)
        rf.set_adapter(model, "ucm")
        assert torch.equal(model(x), y_ucm)
        assert {n for n, p in model.named_parameters() if p.requires_grad} == {
            f"blocks.{i}.attn.qkv.lora_{ab}" for i in range(2) for ab in "AB"}
        rf.set_adapter(model, "aid")
        assert torch.equal(model(x), y_aid)
    # save the inactive one by name, load it into a fresh model: its own outputs
    rf.save_adapters(model, tmp_path / "ucm.safetensors", adapter_name="ucm")
    assert model.rspeft_active == "aid"
    fresh = rf.load_adapters(copy.deepcopy(original), tmp_path / "ucm.safetensors").eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), y_ucm) and torch.equal(model(x), y_aid)
    # load_adapters(adapter_name=): beside the model's adapters (made active), or the first one's name
    twin = rf.load_adapters(copy.deepcopy(model), tmp_path / "ucm.safetensors", adapter_name="ucm2").eval()
    assert rf.adapter_names(twin) == ("ucm2", "aid", "ucm")
    named = rf.load_adapters(copy.deepcopy(original), tmp_path / "ucm.safetensors", adapter_name="ucm").eval()
    assert rf.adapter_names(named) == ("ucm",)
    with torch.no_grad():
        assert torch.equal(twin(x), y_ucm) and torch.equal(named(x), y_ucm)
        assert torch.equal(rf.set_adapter(twin, "aid")(x), y_aid)
    with pytest.raises(ValueError, match="active adapter"):
        rf.delete_adapter(model, "aid")
    rf.set_adapter(model, "ucm")
    rf.delete_adapter(model, "aid")
    assert rf.adapter_names(model) == ("ucm",) and type(model.blocks[0].mlp.fc1) is nn.Linear
    with torch.no_grad():
        assert torch.equal(model(x), y_ucm)
    with pytest.raises(RuntimeError, match="adapter_name="):
        rf.inject(model, "lora")
    with pytest.raises(ValueError, match="names no nn.Linear"):  # a failed add leaves the model as it was
        rf.inject(model, "lora", adapter_name="bad", target=r".*mlp")
    assert rf.adapter_names(model) == ("ucm",) and model.blocks[0].attn.qkv.lora_A.requires_grad
    with torch.no_grad():
        assert torch.equal(model(x), y_ucm)
    with pytest.raises(NotImplementedError, match="another method"):
        rf.inject(model, "mufa", adapter_name="x")
    rf.unload_adapters(model)
    so, sm = original.state_dict(), model.state_dict()
    assert list(so) == list(sm) and all(torch.equal(so[k], sm[k]) for k in so)
    assert _classes(model) == _classes(original)
