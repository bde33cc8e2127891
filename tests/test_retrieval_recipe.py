"""HarMA's recipe (rspeft_fast.retrieval.recipe) against HarMA's code: the schedule vs a port of its scheduler.py,
the weight-decay groups of its optim.py, its image transforms and RandomAugment magnitudes, the four configs; the
learnable temperature unclamped as HarMA's."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rspeft_fast.retrieval.model import ALBEF_TEMP_CLAMP, RetrievalModel
from rspeft_fast.retrieval.recipe import (CLIP_MEAN, CLIP_STD, HARMA_AUGMENTS, HARMA_CONFIGS, HARMA_RECIPE,
                                          harma_lr_lambda, harma_param_groups, harma_transforms)


def _harma_scheduler_lambda(epochs, step_per_epoch, num_warmup_steps=0.1):
    """HarMA's scheduler.py (create_scheduler, sched 'linear'), ported literally."""
    args = {"epochs": epochs, "step_per_epoch": step_per_epoch, "num_warmup_steps": num_warmup_steps}
    args["num_training_steps"] = args["epochs"] * args["step_per_epoch"]
    if isinstance(args["num_warmup_steps"], float):
        assert 0 <= args["num_warmup_steps"] < 1
        args["num_warmup_steps"] = int(args["num_training_steps"] * args["num_warmup_steps"])

    def lr_lambda(current_step: int):
        if current_step < args["num_warmup_steps"]:
            return float(current_step) / float(max(1, args["num_warmup_steps"]))
        return max(0.0, float(args["num_training_steps"] - current_step) / float(
            max(1, args["num_training_steps"] - args["num_warmup_steps"])))

    return lr_lambda


@pytest.mark.parametrize("epochs, n, batch", [(10, 8734 * 5, 214), (50, 17175, 214), (80, 17175, 428), (1, 7, 214)])
def test_schedule_is_harmas_linear_warmup_then_linear_decay(epochs, n, batch):
    per_epoch = math.ceil(n / batch)
    total = epochs * per_epoch
    want = _harma_scheduler_lambda(epochs, per_epoch)
    got = harma_lr_lambda(total)
    for s in range(0, total + 3):
        assert got(s) == want(s), s
    assert got(total) == 0.0 and got(0) == (0.0 if total >= 10 else 1.0)  # under 10 steps there is no warm-up


def test_schedule_rejects_bad_lengths():
    with pytest.raises(ValueError, match="total_steps must be a positive int, got 0"):
        harma_lr_lambda(0)
    with pytest.raises(ValueError, match=r"warm-up fraction must lie in \[0, 1\), got 1.5"):
        harma_lr_lambda(10, 1.5)


def test_weight_decay_groups_follow_harmas_names():
    m = nn.Module()
    m.mga = nn.Module()
    m.mga.down = nn.Linear(4, 2)
    m.mga.attn = nn.MultiheadAttention(2, 1)
    m.mga.gate = nn.Parameter(torch.tensor(0.6))
    m.ln_2 = nn.LayerNorm(4)
    m.norm = nn.LayerNorm(4)
    m.temp = nn.Parameter(torch.tensor(0.07))
    m.frozen = nn.Parameter(torch.ones(3), requires_grad=False)
    names = {id(p): n for n, p in m.named_parameters()}
    decay, no_decay = harma_param_groups(m.named_parameters(), 0.04)
    assert decay["weight_decay"] == 0.04 and no_decay["weight_decay"] == 0.0
    # HarMA decays the scalar gate and the temperature (its rule is by name, not by shape), and LayerNorm weights
    # whose name is none of its norm names (open_clip's ln_2)
    assert sorted(names[id(p)] for p in decay["params"]) == sorted(
        ["mga.down.weight", "mga.attn.in_proj_weight", "mga.attn.out_proj.weight", "mga.gate", "ln_2.weight", "temp"])
    assert sorted(names[id(p)] for p in no_decay["params"]) == sorted(
        ["mga.down.bias", "mga.attn.in_proj_bias", "mga.attn.out_proj.bias", "ln_2.bias", "norm.weight", "norm.bias"])


def test_transforms_are_harmas():
    from timm.data.auto_augment import RandAugment
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    train, ev = harma_transforms(224)
    crop, flip, ra, totensor, norm = train.transforms
    assert isinstance(crop, T.RandomResizedCrop) and crop.size == (224, 224) and crop.scale == (0.5, 1.0)
    assert crop.interpolation == InterpolationMode.BICUBIC
    assert isinstance(flip, T.RandomHorizontalFlip) and flip.p == 0.5
    assert isinstance(totensor, T.ToTensor) and tuple(norm.mean) == CLIP_MEAN and tuple(norm.std) == CLIP_STD
    resize, totensor, norm = ev.transforms
    assert isinstance(resize, T.Resize) and tuple(resize.size) == (224, 224)
    assert resize.interpolation == InterpolationMode.BICUBIC and tuple(norm.mean) == CLIP_MEAN
    # RandomAugment(2, 7): 2 ops drawn with replacement from HarMA's 10, each applied with p 0.5, HarMA's levels
    assert isinstance(ra, RandAugment) and ra.num_layers == 2 and ra.choice_weights is None
    assert tuple(op.name for op in ra.ops) == HARMA_AUGMENTS
    want = {"Brightness": 1.36, "Sharpness": 1.36, "ShearX": 0.21, "ShearY": 0.21, "TranslateX": 7.0,
            "TranslateY": 7.0, "Rotate": 21.0}
    from PIL import Image

    for op in ra.ops[1:]:
        assert op.prob == 0.5 and op.magnitude == 7 and op.magnitude_std == 0
        assert op.kwargs["fillcolor"] == (128, 128, 128) and op.kwargs["resample"] == Image.BILINEAR
        if op.name in want:
            for _ in range(8):  # random sign where HarMA has one
                (v,) = op.level_fn(op.magnitude, op.hparams)
                assert abs(v) == pytest.approx(want[op.name]), op.name
                assert v > 0 or op.name not in ("Brightness", "Sharpness")
        else:
            assert op.level_fn is None
    # a PIL image through both
    import numpy as np

    im = Image.fromarray((np.random.default_rng(0).random((256, 300, 3)) * 255).astype("uint8"))
    assert train(im).shape == (3, 224, 224) and ev(im).shape == (3, 224, 224)
    # other sizes: translation scaled with the image (7 px at 224)
    (v,) = harma_transforms(32)[0].transforms[2].ops[7].level_fn(7, harma_transforms(32)[0].transforms[2].ops[7].hparams)
    assert abs(v) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="image_size must be square"):
        harma_transforms((224, 256))


def test_recipe_and_configs_are_harmas():
    r = HARMA_RECIPE
    assert (r.max_words, r.image_size, r.text_padding_mask, r.temperature_init, r.temperature_clamp) == (30, 224, False, 0.07, None)
    assert (r.margin, r.gamma, r.max_violation, r.triplet_diagonal_only, r.triplet_weight) == (0.2, 2.0, False, True, 1.0)
    assert (r.weight_decay, r.betas, r.eps, r.warmup_fraction, r.batch_size, r.ties) == (0.04, (0.9, 0.98), 1e-8, 0.1, 214, "argsort")
    assert {k: (c.lr, c.epochs) for k, c in HARMA_CONFIGS.items()} == {
        "rsicd_vit": (4e-4, 10), "rsitmd_vit": (4e-4, 50), "rsicd_geo": (4e-6, 80), "rsitmd_geo": (4e-6, 80)}
    assert HARMA_CONFIGS["rsicd_geo"].model.endswith("-quickgelu") and HARMA_CONFIGS["rsicd_vit"].pretrained == "laion2b_s34b_b79k"


def test_temperature_is_not_clamped_by_default():
    m = RetrievalModel(nn.Identity())
    assert m.temp_clamp is None and float(m.temperature().detach()) == pytest.approx(0.07)
    with torch.no_grad():
        m.temp.fill_(0.9)
    assert float(m.temperature().detach()) == pytest.approx(0.9)  # HarMA: used as it is
    with torch.no_grad():
        m.temp.fill_(1e-4)
    assert float(m.temperature().detach()) == pytest.approx(1e-4)
    c = RetrievalModel(nn.Identity(), temp_clamp=ALBEF_TEMP_CLAMP)
    with torch.no_grad():
        c.temp.fill_(0.9)
    assert float(c.temperature().detach()) == 0.5
    t = c.temperature()
    t.backward()
    assert c.temp.grad is not None and float(c.temp.grad) == 0.0  # clamped: no gradient past the bound
    for bad in ((0.5, 0.1), (0.0, 1.0), (0.1,), "0.1,0.5"):
        with pytest.raises(ValueError, match=r"temp_clamp must be None or \(lo, hi\)"):
            RetrievalModel(nn.Identity(), temp_clamp=bad)
    with pytest.raises(ValueError, match="temp_init must be a positive number"):
        RetrievalModel(nn.Identity(), temp_init=0)


def test_create_clip_gives_harmas_transforms_on_request():
    import open_clip  # noqa: F401  (pinned: a missing one fails)
    from rspeft_fast.retrieval.model import TINY_CLIP, create_clip

    assert HARMA_RECIPE.transforms == "harma"
    _, _, train, ev = create_clip(TINY_CLIP, transforms=HARMA_RECIPE.transforms)
    assert type(train.transforms[2]).__name__ == "RandAugment" and tuple(ev.transforms[0].size) == (32, 32)
    _, _, train, _ = create_clip(TINY_CLIP)  # open_clip's (the embedded 32-px set learns nothing under HarMA's)
    assert all(type(t).__name__ != "RandAugment" for t in train.transforms)
    with pytest.raises(ValueError, match="transforms='timm'"):
        create_clip(TINY_CLIP, transforms="timm")


def test_missing_open_clip_is_one_line_naming_the_extra(monkeypatch):
    import sys

    from rspeft_fast.retrieval import model

    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip -> ImportError
    for call in (model.require_open_clip, model.register_tiny_clip, lambda: model.create_clip(model.TINY_CLIP),
                 lambda: model.uses_quick_gelu(nn.Identity())):
        with pytest.raises(ImportError) as e:
            call()
        assert str(e.value) == "the retrieval model needs open_clip, an optional dependency: pip install 'rspeft_fast[open_clip]'"
