"""HarMA's training recipe, read off its code (github.com/seekerhuang/HarMA), in one place for the retrieval job.

What each value reproduces (file of HarMA's repository in brackets):

* data — captions cleaned by ``pre_caption`` and cut at **30 words** (``dataset/re_dataset.py``, ``max_words=30``);
  training images ``RandomResizedCrop(224, scale=(0.5, 1.0), bicubic)``, ``RandomHorizontalFlip()``,
  ``RandomAugment(2, 7, isPIL=True, augs=[Identity, AutoContrast, Equalize, Brightness, Sharpness, ShearX, ShearY,
  TranslateX, TranslateY, Rotate])``, ``ToTensor``, CLIP mean / std; evaluation images ``Resize((224, 224),
  bicubic)`` (a square resize, no centre crop) (``dataset/__init__.py``). :func:`harma_transforms` builds both;
* model — MGA's multi-head self-attention attends over the text padding (``open_clip/transformer.py`` calls
  ``mmadapter(x)`` with no mask): ``text_padding_mask=False``; the learnable temperature starts at 0.07 and is
  **not clamped** (``models/harma.py``: ``logits = ... / self.temp``);
* objective — ``get_contr_loss`` (soft targets over captions of the same image: ``idx``) + ``weighted_triplet_loss``
  (margin 0.2, γ 2, no hard mining, weight 1) whose mask is the **diagonal only**: other captions of the same image
  count as negatives (``models/harma.py``, ``Retrieval.py``: ``loss = loss_contr + loss_triplet``);
* optimisation — AdamW, weight decay 0.04, betas (0.9, 0.98), eps 1e-8; no decay for parameters whose *name*
  contains ``bias`` or a norm's weight / bias (so MGA's gates and the temperature *are* decayed) (``optim.py``;
  ``lr_mult`` 2 applies to ``model.init_params``, which HarMA's model does not define: unused); schedule per
  iteration: linear warm-up over the first 10 % of the steps from 0, then linear decay to 0
  (``scheduler.py``: ``num_warmup_steps: 0.1``, ``sched: linear``), total = epochs · ⌈N / (batch · world)⌉ while the
  training loader drops the last partial batch; batch 214 per process (``--bs -1``; the README launches 2 GPUs);
* the four configurations (``configs/Retrieval_*.yaml``) in :data:`HARMA_CONFIGS`.

Where we differ on purpose (options of the job, not the default): HarMA selects the epoch on the *test* split
(its validation pass is commented out); SPEC §5 selects on validation. The ``RandomAugment`` policy is rebuilt
from timm's RandAugment ops (:func:`harma_rand_augment`): the same ops, magnitudes (rotate ±21°, shear ±0.21,
translate ±7 px at 224, brightness / sharpness ×1.36, fill grey 128), 2 ops drawn with replacement, each applied
with probability 0.5; the pixel arithmetic is PIL's rather than HarMA's OpenCV re-implementations (PIL's affine
maps output to input, so a shear / translation of +v here is −v there: the same distribution, the sign being
random; PIL rounds where HarMA's tables truncate; sharpness treats the border like PIL), and the random streams are
Python's ``random`` where HarMA draws from ``np.random``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from .readers import MAX_WORDS

__all__ = ["HarmaRecipe", "HarmaConfig", "HARMA_RECIPE", "HARMA_CONFIGS", "HARMA_AUGMENTS", "CLIP_MEAN", "CLIP_STD",
           "harma_lr_lambda", "harma_warmup_steps", "harma_param_groups", "harma_rand_augment", "harma_transforms"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HARMA_AUGMENTS = ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness", "ShearX", "ShearY",
                  "TranslateX", "TranslateY", "Rotate")
# HarMA's names that decide "no weight decay" (substring match on the parameter name, optim.py)
HARMA_NO_DECAY = ("bias", "LayerNorm.bias", "LayerNorm.weight", "norm.bias", "norm.weight", "norm1.bias",
                  "norm1.weight", "norm2.bias", "norm2.weight")


@dataclass(frozen=True)
class HarmaRecipe:
    """The settings HarMA's four configurations share (see the module docstring for where each comes from)."""

    max_words: int = MAX_WORDS
    image_size: int = 224
    crop_scale: tuple = (0.5, 1.0)
    rand_augment_ops: int = 2
    rand_augment_magnitude: int = 7
    translate_px: float = 10.0  # RandomAugment's translate_const, in pixels at image_size (7 px at magnitude 7)
    transforms: str = "harma"  # create_clip(..., transforms=) for real data (the embedded 32-px set keeps "open_clip")
    text_padding_mask: bool = False
    temperature_init: float = 0.07
    temperature_clamp: Optional[tuple] = None
    triplet_weight: float = 1.0
    margin: float = 0.2
    gamma: float = 2.0
    max_violation: bool = False
    triplet_diagonal_only: bool = True
    batch_size: int = 214
    weight_decay: float = 0.04
    betas: tuple = (0.9, 0.98)
    eps: float = 1e-8
    warmup_fraction: float = 0.1
    schedule: str = "linear"  # linear warm-up from 0, then linear decay to 0, stepped per iteration
    ties: str = "argsort"  # recall_at_k's tie rule = HarMA's itm_eval


@dataclass(frozen=True)
class HarmaConfig:
    """One of HarMA's ``configs/Retrieval_*.yaml``: backbone and the learning rate / epochs it trains with."""

    model: str  # open_clip name
    pretrained: Optional[str]  # open_clip pretrained tag
    checkpoint: Optional[str]  # further weights loaded over it (file name as HarMA's code names it)
    lr: float
    epochs: int


HARMA_RECIPE = HarmaRecipe()
# 'vit': open_clip ViT-B/32 with HarMA's factory default tag laion2b_s34b_b79k; 'geo': OpenAI ViT-B/32 (QuickGELU)
# with GeoRSCLIP's RS5M_ViT-B-32_RET-2.pt over it (models/model_retrieval.py)
_GEO = dict(model="ViT-B-32-quickgelu", pretrained="openai", checkpoint="RS5M_ViT-B-32_RET-2.pt")
_VIT = dict(model="ViT-B-32", pretrained="laion2b_s34b_b79k", checkpoint=None)
HARMA_CONFIGS = {
    "rsicd_vit": HarmaConfig(**_VIT, lr=4e-4, epochs=10),
    "rsitmd_vit": HarmaConfig(**_VIT, lr=4e-4, epochs=50),
    "rsicd_geo": HarmaConfig(**_GEO, lr=4e-6, epochs=80),
    "rsitmd_geo": HarmaConfig(**_GEO, lr=4e-6, epochs=80),
}


def harma_warmup_steps(total_steps: int, fraction: float = HARMA_RECIPE.warmup_fraction) -> int:
    """HarMA's warm-up length: ``int(total_steps · fraction)`` (``scheduler.py``)."""
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"warm-up fraction must lie in [0, 1), got {fraction!r}")
    return int(total_steps * fraction)


def harma_lr_lambda(total_steps: int, fraction: float = HARMA_RECIPE.warmup_fraction) -> Callable[[int], float]:
    """The learning-rate factor of HarMA's ``linear`` schedule at scheduler step ``s`` (for ``LambdaLR``, stepped per
    iteration): ``s / W`` for ``s < W`` (the first step runs at 0), then ``max(0, (T − s) / (T − W))``;
    ``T = total_steps``, ``W = int(T · fraction)``."""
    warm = harma_warmup_steps(total_steps, fraction)

    def lr_lambda(step: int) -> float:
        if step < warm:
            return float(step) / float(max(1, warm))
        return max(0.0, float(total_steps - step) / float(max(1, total_steps - warm)))

    return lr_lambda


def harma_param_groups(named_parameters: Iterable, weight_decay: float = HARMA_RECIPE.weight_decay) -> list:
    """AdamW parameter groups by HarMA's rule (``optim.py``): trainable parameters whose name contains one of
    :data:`HARMA_NO_DECAY` get no weight decay, every other one (MGA's scalar gates and the temperature included)
    gets ``weight_decay``. Returns ``[{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0}]``."""
    decay, no_decay = [], []
    for n, p in named_parameters:
        if not p.requires_grad:
            continue
        (no_decay if any(k in n for k in HARMA_NO_DECAY) else decay).append(p)
    return [{"params": decay, "weight_decay": float(weight_decay)}, {"params": no_decay, "weight_decay": 0.0}]


class _Identity:
    """HarMA's ``Identity`` op (timm's RandAugment has none); drawn like the others, changes nothing."""

    name = "Identity"

    def __call__(self, img):
        return img

    def __repr__(self):
        return "AugmentOp(name=Identity)"


def harma_rand_augment(image_size: int = HARMA_RECIPE.image_size, recipe: HarmaRecipe = HARMA_RECIPE):
    """HarMA's ``RandomAugment(2, 7, isPIL=True, augs=HARMA_AUGMENTS)`` from timm's RandAugment ops (see the module
    docstring for what differs at the pixel level). The translation is ``translate_px`` at 224 px, scaled with
    ``image_size``; bilinear resampling (HarMA's OpenCV ``INTER_LINEAR``); fill grey 128."""
    from timm.data.auto_augment import RandAugment, rand_augment_ops
    from PIL import Image

    hparams = {"translate_const": recipe.translate_px * image_size / 224.0, "img_mean": (128, 128, 128),
               "interpolation": Image.BILINEAR}
    ops = rand_augment_ops(recipe.rand_augment_magnitude, prob=0.5, hparams=hparams,
                           transforms=[a for a in HARMA_AUGMENTS if a != "Identity"])
    return RandAugment([_Identity()] + ops, num_layers=recipe.rand_augment_ops)


def harma_transforms(image_size: int = HARMA_RECIPE.image_size, mean=CLIP_MEAN, std=CLIP_STD,
                     recipe: HarmaRecipe = HARMA_RECIPE) -> tuple:
    """``(train, eval)`` image transforms of HarMA (``dataset/__init__.py``), PIL image in, normalised tensor out."""
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    if isinstance(image_size, (tuple, list)):
        if len(image_size) != 2 or image_size[0] != image_size[1]:
            raise ValueError(f"image_size must be square, got {tuple(image_size)}")
        image_size = image_size[0]
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    norm = T.Normalize(tuple(mean), tuple(std))
    train = T.Compose([
        T.RandomResizedCrop(image_size, scale=tuple(recipe.crop_scale), interpolation=InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        harma_rand_augment(image_size, recipe),
        T.ToTensor(),
        norm,
    ])
    evaluate = T.Compose([
        T.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC),
        T.ToTensor(),
        norm,
    ])
    return train, evaluate

