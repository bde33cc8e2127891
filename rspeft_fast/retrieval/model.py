"""The retrieval job's model: an open_clip dual encoder with MGA in both towers and a learnable temperature.

* :data:`TINY_CLIP` (``"rspeft-tiny-clip"``): a CPU-sized CLIP (32² images, patch 8, width 128, 2 layers per
  tower, 64-d embeddings, open_clip's BPE tokenizer, context 24) registered in open_clip's model registry by
  :func:`register_tiny_clip`, so ``open_clip.create_model`` / ``get_tokenizer`` and ``--model`` accept it.
* :func:`create_clip`: model, tokenizer, train / eval image transforms from an open_clip name, optionally
  weights from ``--checkpoint`` (:func:`load_clip_checkpoint`). The transforms are open_clip's own by default,
  HarMA's with ``transforms="harma"`` (:func:`~rspeft_fast.retrieval.recipe.harma_transforms`; the recipe's
  choice for real data — its crop / RandomAugment is too strong for the 32-px embedded scene set).
* :func:`load_clip_checkpoint`: open_clip, OpenAI-format (raw state dict or TorchScript archive), GeoRSCLIP and
  RemoteCLIP state dicts (``state_dict`` / ``model`` wrappers and ``module.`` prefixes removed; open_clip's
  own conversions and position-embedding resampling applied), strict. When the checkpoint looks OpenAI-derived
  (OpenAI's ``input_resolution`` / ``context_length`` / ``vocab_size`` entries, a TorchScript archive, or a file
  name naming OpenAI, GeoRSCLIP, RemoteCLIP or RS5M) and the model uses exact GELU, it warns and names the fix
  (the ``-quickgelu`` model): those weights were trained with QuickGELU, and a GELU model gives a poor
  zero-shot recall.
* :class:`RetrievalModel`: the injected CLIP plus HarMA's learnable temperature ``τ`` (init 0.07, used as it is:
  HarMA does not clamp it; ``temp_clamp=(lo, hi)`` clamps it in the forward, as ALBEF does with ``[0.001, 0.5]``);
  ``forward(images, tokens)`` → L2-normalised ``img (B, E)``, ``txt (B, E)`` features and the temperature.
"""
from __future__ import annotations

import os
import re
import warnings
from typing import Optional

import torch
from torch import nn

__all__ = ["TINY_CLIP", "TINY_CLIP_CFG", "register_tiny_clip", "create_clip", "load_clip_checkpoint", "RetrievalModel",
           "uses_quick_gelu", "looks_openai_derived",
           "TEMP_INIT", "ALBEF_TEMP_CLAMP", "require_open_clip"]

TINY_CLIP = "rspeft-tiny-clip"
TINY_CLIP_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 128, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2},
}
TEMP_INIT = 0.07
ALBEF_TEMP_CLAMP = (0.001, 0.5)  # an option (ALBEF's); HarMA's temperature is not clamped


OPEN_CLIP_MISSING = "the retrieval model needs open_clip, an optional dependency: pip install 'rspeft_fast[open_clip]'"


def require_open_clip():
    """The ``open_clip`` module, or an ImportError of one line naming the extra to install."""
    try:
        import open_clip
    except ImportError:
        raise ImportError(OPEN_CLIP_MISSING) from None
    return open_clip


def register_tiny_clip() -> None:
    """Add :data:`TINY_CLIP` (and its ``-quickgelu`` variant) to open_clip's model registry (idempotent)."""
    import copy

    require_open_clip()
    from open_clip import factory

    if TINY_CLIP not in factory._MODEL_CONFIGS:
        factory._MODEL_CONFIGS[TINY_CLIP] = copy.deepcopy(TINY_CLIP_CFG)
        factory._MODEL_CONFIGS[TINY_CLIP + "-quickgelu"] = {**copy.deepcopy(TINY_CLIP_CFG), "quick_gelu": True}


def uses_quick_gelu(model: nn.Module) -> bool:
    require_open_clip()
    from open_clip.transformer import QuickGELU

    return any(isinstance(m, QuickGELU) for m in model.modules())


_OPENAI_NAMES = re.compile(r"openai|georsclip|geo_rsclip|remoteclip|remote_clip|rs5m", re.I)
_OPENAI_KEYS = ("input_resolution", "context_length", "vocab_size")


def looks_openai_derived(path: str, keys) -> str:
    """A reason string when the checkpoint at ``path`` with state-dict ``keys`` looks OpenAI-derived, else ''."""
    hits = [k for k in _OPENAI_KEYS if k in keys]
    if hits:
        return f"it holds OpenAI's {', '.join(hits)} entries"
    if _OPENAI_NAMES.search(os.path.basename(path)):
        return f"its file name {os.path.basename(path)!r} names an OpenAI-initialised model (OpenAI / GeoRSCLIP / RemoteCLIP / RS5M)"
    return ""


def _read_state_dict(path: str) -> tuple[dict, bool]:
    """(state dict, whether it came from a TorchScript archive)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path), False
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        jit = False
    except Exception as e:  # OpenAI's released files are TorchScript archives
        try:
            ck = torch.jit.load(path, map_location="cpu").state_dict()
            jit = True
        except Exception:
            raise SystemExit(f"--checkpoint {path}: cannot read it ({type(e).__name__}: {e})") from None
    for wrap in ("state_dict", "model", "module"):
        if isinstance(ck, dict) and isinstance(ck.get(wrap), dict):
            ck = ck[wrap]
    if not isinstance(ck, dict) or not ck:
        raise SystemExit(f"--checkpoint {path}: not a state dict")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in ck.items()}, jit


def load_clip_checkpoint(model: nn.Module, path: str, model_name: str = "") -> None:
    """Load an open_clip / OpenAI / GeoRSCLIP / RemoteCLIP state dict into ``model`` (strict); see the module docstring."""
    require_open_clip()
    from open_clip.factory import convert_state_dict, resize_pos_embed, resize_text_pos_embed

    if not os.path.isfile(path):
        raise SystemExit(f"--checkpoint {path}: no such file")
    sd, jit = _read_state_dict(path)
    reason = "it is a TorchScript archive (OpenAI's release format)" if jit else looks_openai_derived(path, sd)
    for k in _OPENAI_KEYS:
        sd.pop(k, None)
    sd = convert_state_dict(model, sd)
    if "logit_scale" in sd and model.logit_scale.ndim != sd["logit_scale"].ndim:
        sd["logit_scale"] = sd["logit_scale"].reshape(model.logit_scale.shape)
    resize_pos_embed(sd, model)
    resize_text_pos_embed(sd, model)
    res = model.load_state_dict(sd, strict=False)
    if res.missing_keys or res.unexpected_keys:
        raise SystemExit(f"--checkpoint {path} does not fit --model {model_name or type(model).__name__}: "
                         f"{len(res.missing_keys)} missing keys (e.g. {res.missing_keys[:3]}), "
                         f"{len(res.unexpected_keys)} unexpected (e.g. {res.unexpected_keys[:3]})")
    if reason and not uses_quick_gelu(model):
        fix = f"{model_name}-quickgelu" if model_name and not model_name.endswith("-quickgelu") else "a -quickgelu model"
        warnings.warn(f"--checkpoint {path} looks OpenAI-derived ({reason}), but --model {model_name} uses exact GELU: "
                      f"OpenAI, GeoRSCLIP and RemoteCLIP weights were trained with QuickGELU, so the zero-shot recall "
                      f"will be poor. Use --model {fix}.", stacklevel=2)


def create_clip(name: str, checkpoint: Optional[str] = None, pretrained: Optional[str] = None,
                transforms: str = "open_clip"):
    """``(model, tokenizer, train transform, eval transform)`` for an open_clip model name; ``transforms``:
    ``"open_clip"`` (open_clip's ``image_transform``) or ``"harma"`` (HarMA's crop / flip / RandomAugment and
    square bicubic resize, at the model's image size and mean / std: ``HARMA_RECIPE.transforms``)."""
    if transforms not in ("harma", "open_clip"):
        raise ValueError(f"create_clip: transforms={transforms!r}: expected 'harma' or 'open_clip'")
    open_clip = require_open_clip()

    register_tiny_clip()
    if name not in open_clip.list_models():
        raise SystemExit(f"--model {name!r}: not an open_clip model name (e.g. ViT-B-32, ViT-B-32-quickgelu, ViT-L-14, "
                         f"{TINY_CLIP}); see open_clip.list_models()")
    try:
        model = open_clip.create_model(name, pretrained=pretrained)
    except Exception as e:
        raise SystemExit(f"--model {name} --pretrained {pretrained}: {type(e).__name__}: {e}") from None
    if checkpoint:
        load_clip_checkpoint(model, checkpoint, name)
    from open_clip.transform import image_transform

    size = model.visual.image_size
    mean = getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    if transforms == "harma":
        from .recipe import harma_transforms

        t_train, t_eval = harma_transforms(size if isinstance(size, int) else tuple(size), mean, std)
    else:
        t_train = image_transform(size, is_train=True, mean=mean, std=std)
        t_eval = image_transform(size, is_train=False, mean=mean, std=std)
    return model, open_clip.get_tokenizer(name), t_train, t_eval


class RetrievalModel(nn.Module):
    """An (injected) open_clip model and the learnable temperature of the contrastive term.

    ``temp_init``: the temperature's start (HarMA: 0.07). ``temp_clamp``: ``None`` (HarMA: the parameter is used as
    it is) or ``(lo, hi)`` with ``0 < lo <= hi``, clamped in the forward (ALBEF: :data:`ALBEF_TEMP_CLAMP`)."""

    def __init__(self, clip: nn.Module, temp_init: float = TEMP_INIT, temp_clamp: Optional[tuple] = None):
        super().__init__()
        if isinstance(temp_init, bool) or not isinstance(temp_init, (int, float)) or not temp_init > 0:
            raise ValueError(f"RetrievalModel: temp_init must be a positive number, got {temp_init!r}")
        if temp_clamp is not None:
            ok = (isinstance(temp_clamp, (tuple, list)) and len(temp_clamp) == 2
                  and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in temp_clamp)
                  and 0 < temp_clamp[0] <= temp_clamp[1])
            if not ok:
                raise ValueError(f"RetrievalModel: temp_clamp must be None or (lo, hi) with 0 < lo <= hi, got {temp_clamp!r}")
            temp_clamp = (float(temp_clamp[0]), float(temp_clamp[1]))
        self.clip = clip
        self.temp_clamp = temp_clamp
        self.temp = nn.Parameter(torch.tensor(float(temp_init)))

    def temperature(self) -> torch.Tensor:
        return self.temp if self.temp_clamp is None else self.temp.clamp(*self.temp_clamp)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(images, normalize=True)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(tokens, normalize=True)

    def forward(self, images: Optional[torch.Tensor], tokens: Optional[torch.Tensor]):
        """``images (B, 3, H, W)``, ``tokens (B, L)`` int64 → L2-normalised ``img (B, E)``, ``txt (B, E)`` and the
        temperature (clamped only with ``temp_clamp``) (returned from the forward so DDP sees the parameter used). Either input may be None
        (evaluation embeds the towers apart); its output is then None."""
        img = None if images is None else self.encode_image(images)
        txt = None if tokens is None else self.encode_text(tokens)
        return img, txt, self.temperature()
