"""Model construction for the classification CLI (and for users who want the same rules in Python).

:func:`create_classifier` builds an image classifier with a fresh ``num_classes`` head, from

* a timm model name (``"vit_base_patch16_224"``, ``"vit_large_patch16_dinov3.sat493m"``, ...): random weights,
  ``pretrained=True`` (timm's hub download) or ``checkpoint=FILE`` (local weights, loaded by timm's own
  pretrained path so position embeddings are resampled and the classifier is dropped as for hub weights).
  torchgeo's ViT / ResNet weights are timm state dicts: the timm name plus ``checkpoint=`` their file.
* ``"hf:<spec>"``, a Hugging Face transformers image classifier built from a config (never a download):
  ``<spec>`` is a ``...ForImageClassification`` class name (``hf:ViTForImageClassification``), a
  ``model_type`` (``hf:dinov2``) or a local folder / ``config.json`` path; ``model_args`` go to the config
  (``hidden_size=...``), ``img_size`` to ``config.image_size``. ``checkpoint=`` a local folder
  (``save_pretrained`` layout) or a weights file (safetensors / torch state dict; a classifier of another
  size is left out and re-initialised). The model returns the logits tensor (a forward hook unwraps HF's
  output object), so it drops into the same training loop as a timm model.

Errors are :class:`ModelBuildError` (a ``ValueError``) with a one-line message naming the argument; a CLI turns
them into ``SystemExit(str(e))``.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import torch.nn as nn

__all__ = ["create_classifier", "ModelBuildError"]

# timm families that take the input size at creation (position embeddings / windows sized from it).
_IMG_SIZE_FAMILIES = ("vit", "swin", "deit", "eva")


class ModelBuildError(ValueError):
    """A model could not be built from the given name / checkpoint; the message names the argument."""


def create_classifier(
    name: str,
    *,
    num_classes: int,
    pretrained: bool = False,
    checkpoint: Optional[str] = None,
    img_size: Optional[int] = None,
    global_pool: Optional[str] = None,
    model_args: Optional[Mapping[str, Any]] = None,
) -> nn.Module:
    """Build a classifier ``(B, 3, H, W) -> (B, num_classes)`` by name.

    Args:
        name: a timm model name (ViT, Swin, ConvNeXt, ResNet, Eva, ...) or ``"hf:<spec>"`` (see the module
            docstring).
        num_classes: width of the (freshly initialised) head.
        pretrained: fetch the hub weights (needs network access).
        checkpoint: a local weights file (timm: any state dict timm's pretrained loader reads; the head is
            re-created for ``num_classes``). Takes precedence over ``pretrained``.
        img_size: input size for the families that fix it at creation (ViT, Swin, DeiT, Eva); ignored otherwise.
        global_pool: timm ``global_pool`` (e.g. ``"avg"``, ``"token"``).
        model_args: further keyword arguments for the model constructor.

    Raises:
        ModelBuildError: unknown name, missing checkpoint file, or hub weights that could not be fetched.
    """
    if name.startswith("hf:"):
        return _create_hf(name[3:], num_classes=num_classes, pretrained=pretrained, checkpoint=checkpoint,
                          img_size=img_size, global_pool=global_pool, model_args=model_args)
    import timm

    kw = dict(model_args or {})
    kw["num_classes"] = num_classes
    if global_pool is not None:
        kw["global_pool"] = global_pool
    if img_size is not None and any(k in name for k in _IMG_SIZE_FAMILIES):
        kw["img_size"] = img_size  # ViT / Swin take the input size at creation (pos-embed resampled when loading)
    try:
        if checkpoint:
            if not os.path.isfile(checkpoint):
                raise ModelBuildError(f"--checkpoint {checkpoint}: no such file")
            return timm.create_model(
                name, pretrained=True, pretrained_cfg_overlay={"file": os.path.abspath(checkpoint)}, **kw
            )
        if pretrained:
            try:
                return timm.create_model(name, pretrained=True, **kw)
            except Exception as e:  # network / hub errors come in many types
                raise ModelBuildError(
                    f"--pretrained: could not fetch timm weights for {name!r} ({type(e).__name__}: {e}). "
                    "Without network access, download them elsewhere and pass --checkpoint FILE."
                ) from None
        return timm.create_model(name, pretrained=False, **kw)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            hint = ""
            try:
                import open_clip

                if name in open_clip.list_models():
                    hint = (f"; {name!r} is an open_clip CLIP model: image-text retrieval with it is "
                            f"`python -m rspeft_fast retrieval --model {name}`")
            except ImportError:
                pass
            raise ModelBuildError(f"--model {name!r}: {e}{hint}") from None
        raise


# ----------------------------------------------------------------------------------------- HF transformers
def _logits_only(module, args, output):
    """Forward hook: HF's ``ImageClassifierOutput`` -> its ``logits`` tensor ``(B, num_classes)``."""
    return output.logits if hasattr(output, "logits") else output


def _hf_config(spec: str, num_classes: int, img_size, model_args):
    import transformers as T

    kw = dict(model_args or {})
    kw["num_labels"] = int(num_classes)
    if os.path.isdir(spec) or spec.endswith(".json"):
        if not os.path.exists(spec):
            raise ModelBuildError(f"--model hf:{spec}: no such config file or folder")
        cfg = T.AutoConfig.from_pretrained(spec, **kw)
        cls = None
    elif spec.endswith("ForImageClassification"):
        cls = getattr(T, spec, None)
        if cls is None:
            raise ModelBuildError(f"--model hf:{spec}: transformers {T.__version__} has no class {spec}")
        cfg = cls.config_class(**kw)
    else:
        try:
            cfg = T.AutoConfig.for_model(spec, **kw)
        except ValueError as e:
            raise ModelBuildError(f"--model hf:{spec}: not a ...ForImageClassification class, model_type or local config ({e})") from None
        cls = None
    if img_size is not None and hasattr(cfg, "image_size"):
        cfg.image_size = int(img_size)
    return cfg, cls


def _create_hf(spec, *, num_classes, pretrained, checkpoint, img_size, global_pool, model_args) -> nn.Module:
    try:
        import transformers as T
    except ImportError:
        raise ModelBuildError(f"--model hf:{spec}: needs transformers, an optional dependency: pip install 'rspeft_fast[transformers]'") from None
    if pretrained and not checkpoint:
        raise ModelBuildError(
            f"--model hf:{spec}: HF models are built from their config here (no hub download); "
            "save the weights with save_pretrained elsewhere and pass --checkpoint FOLDER_OR_FILE"
        )
    if global_pool is not None:
        raise ModelBuildError(f"--global-pool applies to timm models; HF's pooling is part of {spec}'s config")
    if checkpoint and not os.path.exists(checkpoint):
        raise ModelBuildError(f"--checkpoint {checkpoint}: no such file")
    cfg, cls = _hf_config(spec, num_classes, img_size, model_args)
    if checkpoint and os.path.isdir(checkpoint):
        model = (cls or T.AutoModelForImageClassification).from_pretrained(
            checkpoint, config=cfg, ignore_mismatched_sizes=True, local_files_only=True)
    else:
        try:
            model = cls(cfg) if cls is not None else T.AutoModelForImageClassification.from_config(cfg)
        except ValueError as e:
            raise ModelBuildError(f"--model hf:{spec}: no image-classification head for {type(cfg).__name__} ({e})") from None
        if checkpoint:
            _load_hf_state(model, checkpoint)
    model.register_forward_hook(_logits_only)
    return model


def _load_hf_state(model: nn.Module, path: str) -> None:
    """Load a weights file into an HF model: keys with another prefix convention (``vit.`` vs bare) are matched,
    tensors of another shape (a classifier of another size) are left at their initialisation."""
    import torch

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    own = model.state_dict()
    prefix = getattr(model, "base_model_prefix", "")
    fixed = {}
    for k, v in sd.items():
        k = k.removeprefix("module.")
        if k not in own and prefix and f"{prefix}.{k}" in own:
            k = f"{prefix}.{k}"
        if k in own and tuple(own[k].shape) == tuple(v.shape):
            fixed[k] = v
    if not fixed:
        raise ModelBuildError(f"--checkpoint {path}: none of its {len(sd)} tensors fits {type(model).__name__}")
    missing = [k for k in own if k not in fixed and not k.startswith("classifier")]
    if missing:
        raise ModelBuildError(
            f"--checkpoint {path}: {len(missing)} backbone tensors of {type(model).__name__} are not in the file "
            f"(e.g. {missing[:3]})"
        )
    model.load_state_dict(fixed, strict=False)
