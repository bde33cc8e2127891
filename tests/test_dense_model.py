"""Dense models (SPEC §6): multi-scale features of injected backbones, CAPM per level, the Siamese encoder,
sliding-window inference, the loss, and UPetu's parameter budget with the decoder counted apart."""
import math

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")
pytest.importorskip("segmentation_models_pytorch")

import rspeft_fast as rf  # noqa: E402
from rspeft_fast.dense import (ChangeDetector, DenseLoss, MultiScaleEncoder, Segmentor, create_encoder,  # noqa: E402
                               parameter_report, sliding_window)
from rspeft_fast.dense.infer import window_starts  # noqa: E402

TINY = {"dims": (16, 32, 64, 128), "depths": (1, 1, 1, 1)}  # a ConvNeXt small enough for CPU tests


def _tiny(method="eqam+capm"):
    return create_encoder("convnext_atto", method, model_args=TINY)


def test_eqam_capm_on_convnext_base_keeps_upetu_budget_with_decoder_apart():
    """0.73 % of ConvNeXt-B (adapters + stage prompts, no head; SPEC §1: 0.70 %), the UperNet decoder (≈ 10 M at
    256 channels, SPEC §6) reported beside it, not in it."""
    with torch.device("meta"):
        enc = create_encoder("convnext_base", "eqam+capm")
        seg = Segmentor(enc, num_classes=6)
    assert enc.prompts is None  # the stage CAPMs are the level prompts: none added
    assert sum(isinstance(m, rf.CAPM) for m in enc.modules()) == 4
    r = parameter_report(seg)
    assert abs(r["adapters_pct_of_backbone"] - 0.73) < 0.05, r
    assert 5e6 < r["decoder"] < 3e7, r
    assert r["adapters"] < r["decoder"]


@pytest.mark.parametrize("name,method,kw,prompts", [
    ("convnext_atto", "eqam+capm", {"model_args": TINY}, 0),
    ("swin_tiny_patch4_window7_224", "lora", {"img_size": 64, "model_args": {"window_size": 2, "depths": (1, 1, 1, 1),
                                                                             "embed_dim": 32, "num_heads": (1, 2, 4, 8)}}, 8),
    ("vit_tiny_patch16_224", "mufa", {"img_size": 64, "model_args": {"depth": 2}}, 8),
])
def test_four_levels_at_strides_4_to_32_and_module_names_unchanged(name, method, kw, prompts):
    enc = create_encoder(name, method, **kw)
    assert (enc.prompts is not None) == bool(prompts)
    feats = enc(torch.randn(2, 3, 64, 64))
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2]
    assert [f.shape[1] for f in feats] == list(enc.channels)
    plain = timm.create_model(name, pretrained=False, num_classes=0, **({"img_size": 64} if "img_size" in kw else {}),
                              **kw.get("model_args", {}))
    names = {n for n, _ in enc.backbone.named_parameters()}
    assert {n for n, _ in plain.named_parameters()} <= names  # checkpoints / targets address the same names


def test_stage_prompts_and_adapters_get_gradients_and_backbone_stays_frozen():
    enc = _tiny()
    seg = Segmentor(enc, 5, decoder_channels=16)
    DenseLoss(5)(seg(torch.randn(2, 3, 64, 64)), torch.randint(0, 5, (2, 64, 64))).backward()
    capm = [m for m in enc.modules() if isinstance(m, rf.CAPM)]
    assert capm and all(m.prompts.grad is not None and m.prompts.grad.abs().sum() > 0 for m in capm)
    assert all(p.grad is None for n, p in enc.backbone.named_parameters() if not p.requires_grad)
    assert seg.decode_head.head[0].weight.grad is not None


def test_siamese_encoder_shares_weights_one_gradient_for_both_dates():
    """Both dates run through the one encoder (one forward over the stacked batch); an adapter's gradient is the
    sum of both dates' paths, exactly as two explicit passes through the same modules give it."""
    torch.manual_seed(0)
    enc = _tiny()
    cd = ChangeDetector(enc, decoder_channels=16).eval()
    assert sum(isinstance(m, MultiScaleEncoder) for m in cd.modules()) == 1
    a, b = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    p = next(m for m in enc.modules() if isinstance(m, rf.EQAM)).up.weight
    calls = []
    h = enc.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    g = torch.autograd.grad(cd(a, b).square().mean(), p)[0]
    h.remove()
    assert calls == [4]  # one encoder pass over both dates
    fused = [(fa - fb).abs() for fa, fb in zip(enc(a), enc(b))]
    g_ref = torch.autograd.grad(cd.decode_head(fused, a.shape[-2:]).square().mean(), p)[0]
    assert g.abs().sum() > 0
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(cd(b, a), cd(a, b))  # |fA - fB| is symmetric in the dates
    cat = ChangeDetector(_tiny("eqam"), decoder_channels=16, fusion="concat")
    assert cat(a, b).shape == (2, 2, 64, 64) and len(cat.fuse) == 4


def test_window_starts_cover_sizes_not_divisible_by_stride():
    assert window_starts(64, 64, 32) == [0]
    assert window_starts(100, 64, 32) == [0, 32, 36]
    assert window_starts(50, 64, 32) == [0]
    with pytest.raises(ValueError, match="unscored"):
        window_starts(100, 32, 48)


def test_sliding_window_equals_whole_image_when_one_window_covers_it():
    torch.manual_seed(0)
    seg = Segmentor(_tiny(), 4, decoder_channels=16).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        whole = seg(x)
    torch.testing.assert_close(sliding_window(seg, x, crop=64, stride=32, num_classes=4), whole)


class _Pointwise(nn.Module):
    """A per-pixel model: any window arrangement must give its whole-image output exactly."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(6, 3, 1)

    def forward(self, a, b):
        return self.conv(torch.cat([a, b], 1))


@pytest.mark.parametrize("h,w", [(100, 77), (13, 96), (64, 64)])
def test_sliding_window_averages_overlaps_on_sizes_stride_does_not_divide(h, w):
    m = _Pointwise()
    a, b = torch.randn(2, 3, h, w), torch.randn(2, 3, h, w)
    out = sliding_window(m, a, b, crop=32, stride=20, num_classes=3, batch_size=3)
    with torch.no_grad():
        ref = m(a, b)
    torch.testing.assert_close(out, ref)


def test_dense_loss_ignores_255_weights_classes_and_is_zero_when_all_ignored():
    logits = torch.randn(2, 3, 5, 5, requires_grad=True)
    t = torch.randint(0, 3, (2, 5, 5))
    t[0, 0] = 255
    ref = nn.functional.cross_entropy(logits, t, weight=torch.tensor([1.0, 2.0, 5.0]), ignore_index=255)
    torch.testing.assert_close(DenseLoss(3, class_weights=[1, 2, 5])(logits, t), ref)
    z = DenseLoss(3, dice=1.0)(logits, torch.full((2, 5, 5), 255))
    assert z.item() == 0.0 and not math.isnan(z.item())
    z.backward()
    assert DenseLoss(3, dice=0.5)(logits, t).item() > nn.functional.cross_entropy(logits, t, ignore_index=255).item()


def test_a_missing_decoder_library_is_one_line_naming_the_extra(monkeypatch):
    import builtins

    from rspeft_fast.dense.model import require_smp

    real = builtins.__import__

    def no_smp(name, *a, **k):
        if name.startswith("segmentation_models_pytorch"):
            raise ImportError("No module named 'segmentation_models_pytorch'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_smp)
    with pytest.raises(ImportError, match=r"pip install 'rspeft_fast\[dense\]'"):
        require_smp()
