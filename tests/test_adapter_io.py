"""save_adapters / load_adapters: only trainable tensors, config in the metadata, bit-for-bit round trips,
clear errors that leave the model untouched."""
import pytest
import torch

timm = pytest.importorskip("timm")
pytest.importorskip("safetensors")

import rspeft_fast as rf  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

VIT_KW = {"img_size": 32, "depth": 3}


def _vit(name="vit_tiny_patch16_224", **kw):
    return timm.create_model(name, pretrained=False, **{**VIT_KW, **kw}).eval()


def _randomise_trainable(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _output_then_save(model, path, x, **kw):
    """``(model(x), tensor names in the file, file metadata)`` after ``save_adapters(model, path, **kw)``."""
    with torch.no_grad():
        out = model(x)
    rf.save_adapters(model, path, **kw)
    with safe_open(str(path), framework="pt") as f:
        return out, set(f.keys()), f.metadata()


@pytest.mark.parametrize("method,opts", [("mufa", {}), ("lora", {"rank": 4}), ("vpt", {"num_tokens": 2, "deep": True}), ("bitfit", {})])
def test_round_trip_onto_fresh_uninjected_model_is_bit_exact(tmp_path, method, opts):
    torch.manual_seed(0)
    model = rf.inject(_vit(), method, num_classes=5, **opts)
    _randomise_trainable(model)
    x = torch.randn(2, 3, 32, 32)
    path = tmp_path / "a.safetensors"
    ref, keys, meta = _output_then_save(model, path, x)

    # only the trainable tensors, with the config in the metadata
    assert keys == {n for n, p in model.named_parameters() if p.requires_grad}
    assert "rspeft_fast.config" in meta
    cfg = rf.integration.read_adapter_config(path)
    assert cfg == model.rspeft_config and cfg.num_classes == 5

    torch.manual_seed(0)  # same backbone weights, default 1000-class head: replaced only when told to
    fresh = _vit()
    with pytest.raises(ValueError, match="5-class head.*1000 classes.*replace_head=True"):
        rf.load_adapters(fresh, path)
    assert getattr(fresh, "rspeft_config", None) is None and fresh.num_classes == 1000  # untouched
    rf.load_adapters(fresh, path, replace_head=True)
    assert fresh.num_classes == 5 and type(fresh.rspeft_config) is type(model.rspeft_config)
    with torch.no_grad():
        assert torch.equal(fresh(x), ref)


def test_round_trip_into_injected_model_and_impl_override(tmp_path):
    model = rf.inject(_vit(), "mufa", num_classes=3)
    _randomise_trainable(model)
    path = tmp_path / "m.safetensors"
    rf.save_adapters(model, path)
    other = rf.inject(_vit(), "mufa", num_classes=3)
    other.load_state_dict({k: v for k, v in model.state_dict().items() if "adapter" not in k and "head" not in k}, strict=False)
    rf.load_adapters(other, path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(other(x), model(x))
    fresh = _vit()
    rf.load_adapters(fresh, path, impl="reference", replace_head=True)
    assert all(m.impl == "reference" for m in fresh.modules() if isinstance(m, rf.MuFAAdapter))


def test_round_trip_convnext_eqam_capm(tmp_path):
    torch.manual_seed(0)
    model = rf.inject(timm.create_model("convnext_atto", pretrained=False, depths=(1, 1, 1, 1)).eval(), "eqam+capm", bits=4, num_classes=4)
    _randomise_trainable(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    path = tmp_path / "c.safetensors"
    rf.save_adapters(model, path)
    torch.manual_seed(0)
    fresh = timm.create_model("convnext_atto", pretrained=False, depths=(1, 1, 1, 1)).eval()
    rf.load_adapters(fresh, path, replace_head=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), ref)


def test_round_trip_open_clip_mga(tmp_path):
    open_clip = pytest.importorskip("open_clip")

    def make():
        torch.manual_seed(0)
        return open_clip.CLIP(
            embed_dim=32,
            vision_cfg=dict(layers=2, width=64, patch_size=16, image_size=32, head_width=32),
            text_cfg=dict(context_length=12, vocab_size=500, width=64, heads=4, layers=2),
        ).eval()

    model = rf.inject(make(), "mga", hidden=32, heads=4, share_across_towers=True)
    _randomise_trainable(model)
    img, txt = torch.randn(2, 3, 32, 32), torch.randint(1, 500, (2, 12))
    txt[1, 5:] = 0
    with torch.no_grad():
        ri, rt = model.encode_image(img), model.encode_text(txt)
    path = tmp_path / "clip.safetensors"
    rf.save_adapters(model, path)
    fresh = make()
    rf.load_adapters(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh.encode_image(img), ri)
        assert torch.equal(fresh.encode_text(txt), rt)


def test_wrong_method_is_refused_and_model_untouched(tmp_path):
    src = rf.inject(_vit(), "mufa", num_classes=3)
    path = tmp_path / "mufa.safetensors"
    rf.save_adapters(src, path)
    dst = rf.inject(_vit(), "adaptformer", num_classes=3)
    before = _snapshot(dst)
    with pytest.raises(ValueError, match="different configuration"):
        rf.load_adapters(dst, path)
    assert _same(before, _snapshot(dst))
    # same method, other options (head size) also differ
    dst2 = rf.inject(_vit(), "mufa", num_classes=7)
    with pytest.raises(ValueError, match="num_classes"):
        rf.load_adapters(dst2, path)


def test_wrong_shape_is_refused_before_anything_changes(tmp_path):
    src = rf.inject(_vit(), "mufa", num_classes=3)
    path = tmp_path / "tiny.safetensors"
    rf.save_adapters(src, path)

    # an un-injected model of another width: nothing is injected, nothing copied
    dst = _vit("vit_small_patch16_224")
    before = _snapshot(dst)
    classes = [type(m) for m in dst.modules()]
    with pytest.raises(ValueError, match="does not fit"):
        rf.load_adapters(dst, path, replace_head=True)
    assert getattr(dst, "rspeft_config", None) is None
    assert [type(m) for m in dst.modules()] == classes
    assert dst.num_classes == 1000
    assert _same(before, _snapshot(dst))

    # an injected model of another width, same config
    dst = rf.inject(_vit("vit_small_patch16_224"), "mufa", num_classes=3)
    before = _snapshot(dst)
    with pytest.raises(ValueError, match="shape"):
        rf.load_adapters(dst, path)
    assert _same(before, _snapshot(dst))

    # a file whose tensor set was tampered with: one tensor missing
    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        for k in f.keys():
            tensors[k] = f.get_tensor(k)
    tensors.pop("blocks.0.adapter.gate")
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    dst = rf.inject(_vit(), "mufa", num_classes=3)
    before = _snapshot(dst)
    with pytest.raises(ValueError, match="missing from the file"):
        rf.load_adapters(dst, bad)
    assert _same(before, _snapshot(dst))

    # a model of another family: the file says which family it was saved from
    convnext = timm.create_model("convnext_atto", pretrained=False, depths=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="adapters for family vit, the model is convnext"):
        rf.load_adapters(convnext, path, replace_head=True)


def test_clear_errors(tmp_path):
    with pytest.raises(RuntimeError, match="no injected adapters"):
        rf.save_adapters(_vit(), tmp_path / "x.safetensors")
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="not an rspeft_fast adapter file"):
        rf.load_adapters(_vit(), plain)
    model = rf.inject(_vit(), "lora", rank=2)
    rf.merge_adapters(model)
    with pytest.raises(RuntimeError, match="merged"):
        rf.save_adapters(model, tmp_path / "y.safetensors")


def test_parameters_unfrozen_after_injection_are_saved_and_loaded(tmp_path):
    """HF peft's modules_to_save: anything trainable when saving is saved (here the final norm, unfrozen by
    hand), plus what extra= names (here the patch embedding's projection, still frozen); loading restores
    them and makes them trainable again. Nothing trainable is silently dropped."""
    torch.manual_seed(0)
    model = rf.inject(_vit(), "mufa", num_classes=3)
    model.norm.requires_grad_(True)
    _randomise_trainable(model)
    with torch.no_grad():
        model.patch_embed.proj.weight.mul_(1.5)
    path = tmp_path / "extra.safetensors"
    x = torch.randn(2, 3, 32, 32)
    ref, keys, _ = _output_then_save(model, path, x, extra=["patch_embed.proj"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable | {"patch_embed.proj.weight", "patch_embed.proj.bias"} == keys
    assert {"norm.weight", "norm.bias"} <= keys
    torch.manual_seed(0)
    fresh = _vit()
    rf.load_adapters(fresh, path, replace_head=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), ref)
    assert fresh.norm.weight.requires_grad and fresh.patch_embed.proj.weight.requires_grad
    with pytest.raises(ValueError, match="names no parameter or module"):
        rf.save_adapters(model, path, extra=["no.such.module"])


def test_packed_eqam_saves_packed_and_loads_into_a_fresh_model(tmp_path):
    """After pack_adapters the int codes and scales are saved (the master weights are gone); loading packs
    the fresh model's Q-Linear layers and gives the packed model's output exactly."""
    torch.manual_seed(0)
    make = lambda: timm.create_model("convnext_atto", pretrained=False, depths=(1, 1, 1, 1), num_classes=4).eval()  # noqa: E731
    model = rf.inject(make(), "eqam", bits=4)
    _randomise_trainable(model)
    rf.pack_adapters(model)
    x = torch.randn(2, 3, 32, 32)
    ref, keys, _ = _output_then_save(model, tmp_path / "packed.safetensors", x)
    path = tmp_path / "packed.safetensors"
    assert any(k.endswith(".qweight") for k in keys) and not any(k.endswith("down.weight") for k in keys)
    torch.manual_seed(0)
    fresh = make()
    rf.load_adapters(fresh, path)
    qls = [m for m in fresh.modules() if isinstance(m, rf.QLinear)]
    assert qls and all(m.packed for m in qls)
    with torch.no_grad():
        assert torch.equal(fresh(x), ref)
    torch.manual_seed(0)  # into an injected, unpacked model of the same config: packed too
    injected = rf.inject(make(), "eqam", bits=4)
    rf.load_adapters(injected, path)
    assert all(m.packed for m in injected.modules() if isinstance(m, rf.QLinear))
    with torch.no_grad():
        assert torch.equal(injected(x), ref)
    # an unpacked injected model with float weights cannot take a packed model's file the other way round
    unpacked_file = tmp_path / "float.safetensors"
    rf.save_adapters(rf.inject(make(), "eqam", bits=4), unpacked_file)
    with pytest.raises(ValueError, match="packed.*pack_adapters after loading"):
        rf.load_adapters(model, unpacked_file)


def test_merged_model_save_says_why_and_what_to_do(tmp_path):
    model = rf.inject(_vit(), "lora", rank=2, num_classes=3)
    rf.merge_adapters(model)
    with pytest.raises(RuntimeError, match="merge_adapters folded.*Save the adapters before merging"):
        rf.save_adapters(model, tmp_path / "m.safetensors")


def _saved_vit(tmp_path, method="mufa", **kw):
    torch.manual_seed(0)
    model = rf.inject(_vit(), method, num_classes=3, **kw)
    _randomise_trainable(model)
    path = tmp_path / "a.safetensors"
    rf.save_adapters(model, path)
    return path


def _rewrite(path, out, tensors=None, meta=None):
    """Copy the adapter file ``path`` to ``out`` with some tensors and / or metadata entries replaced."""
    with safe_open(str(path), framework="pt") as f:
        old_meta = f.metadata()
        old = {k: f.get_tensor(k) for k in f.keys()}
    save_file({**old, **(tensors or {})}, str(out), metadata={**old_meta, **(meta or {})})
    return out


def test_adapters_of_another_family_name_both_families(tmp_path):
    path = _saved_vit(tmp_path)
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, window_size=2,
                             embed_dim=24, depths=(1, 1), num_heads=(1, 1), num_classes=3)
    before = _snapshot(swin)
    with pytest.raises(ValueError, match="adapters for family vit, the model is swin") as ei:
        rf.load_adapters(swin, path)
    assert "replace_head" not in str(ei.value)
    assert _same(before, _snapshot(swin)) and getattr(swin, "rspeft_config", None) is None


def test_corrupt_tensor_bytes_are_refused_with_the_file_name(tmp_path):
    path = _saved_vit(tmp_path)
    raw = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    g = torch.Generator().manual_seed(3)
    at = header + torch.randint(0, len(raw) - header - 64, (1,), generator=g).item()
    raw[at:at + 64] = torch.randint(0, 256, (64,), generator=g, dtype=torch.uint8).numpy().tobytes()
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(raw))
    for model in (_vit(num_classes=3), rf.inject(_vit(num_classes=3), "mufa", num_classes=3)):
        before = _snapshot(model)
        with pytest.raises(ValueError, match="flipped.safetensors is corrupt"):
            rf.load_adapters(model, bad)
        assert _same(before, _snapshot(model))


def test_non_finite_values_are_refused_with_the_file_name(tmp_path):
    """A file without a checksum (written by another tool) is still refused when a weight is NaN or inf."""
    path = _saved_vit(tmp_path)
    with safe_open(str(path), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "rspeft_fast.sha256"}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["blocks.1.adapter.down.weight"][0, 0] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    model = _vit(num_classes=3)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"nan.safetensors holds non-finite values.*blocks\.1\.adapter\.down"):
        rf.load_adapters(model, bad)
    assert _same(before, _snapshot(model)) and getattr(model, "rspeft_config", None) is None


@pytest.mark.parametrize("config", ['{"method": "mufa", "rates": [8', '{"method": "mufa", "rates": "x"}',
                                    '{"method": "mufa", "colour": 1}', '{"method": "nope"}', '[1, 2]'])
def test_broken_config_in_the_file_names_the_file(tmp_path, config):
    bad = _rewrite(_saved_vit(tmp_path), tmp_path / "broken.safetensors", meta={"rspeft_fast.config": config})
    model = _vit(num_classes=3)
    before = _snapshot(model)
    for call in (lambda: rf.load_adapters(model, bad), lambda: rf.integration.read_adapter_config(bad)):
        with pytest.raises(ValueError, match="broken.safetensors: the adapter file's metadata is broken"):
            call()
    assert _same(before, _snapshot(model))
