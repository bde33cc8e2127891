"""Model construction for the classification CLI (and for users who want the same rules in Python).

:func:`create_classifier` builds an image classifier with a fresh ``num_classes`` head, from

* a timm model name (``"vit_base_patch16_224"``, ``"vit_large_patch16_dinov3.sat493m"``, ...): random weights,
  ``pretrained=True`` (timm's hub download) or ``checkpoint=FILE`` (local weights, loaded by timm's own
  pretrained path so position embeddings are resampled and the classifier is dropped as for hub weights).

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
        name: a timm model name.
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
            raise ModelBuildError(f"--model {name!r}: {e}") from None
        raise
