"""The baselines that tune the backbone's own tensors: BitFit (biases), LayerNorm tuning (the affine parameters
of every normalisation layer, BatchNorm included), the linear probe (the head only) and full fine-tuning.

Nothing is added to the model; ``inject`` has frozen every parameter and these make some trainable again (the head
too, by ``train_head``). A normalisation layer left frozen stays frozen in training (``inject`` keeps frozen
BatchNorm in eval mode); a BatchNorm these make trainable updates its running statistics, which
``save_adapters`` saves with it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..config import AdapterConfig
from ..families import FAMILIES
from ..registry import register
from ._common import unfreeze

EVERY_FAMILY = tuple(f.name for f in FAMILIES)
_NO_HEAD = "CLIP models have no classifier head"


@dataclass
class BitFitConfig(AdapterConfig):
    """BitFit: every bias of the backbone is trainable (plus the head)."""

    method: ClassVar[str] = "bitfit"


@dataclass
class LayerNormConfig(AdapterConfig):
    """LayerNorm tuning: the affine parameters of every normalisation layer are trainable (plus the head)."""

    method: ClassVar[str] = "layernorm"


@dataclass
class LinearProbeConfig(AdapterConfig):
    """Linear probe: only the classifier head is trainable."""

    method: ClassVar[str] = "linear"


@dataclass
class FullConfig(AdapterConfig):
    """Full fine-tuning: every parameter is trainable (the saved "adapter" file holds the whole state dict)."""

    method: ClassVar[str] = "full"


def _merge_bitfit(model: nn.Module) -> None:
    """BitFit's tensors are the backbone's biases: merged already."""


@register("bitfit", BitFitConfig, EVERY_FAMILY, merge=_merge_bitfit, merged_keeps_config=True)
def inject_bitfit(model, fam, cfg, target) -> list:
    return unfreeze(model, target, lambda mn, m, pn: pn == "bias" or pn.endswith("_bias"), "bias")


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer (LayerNorm, GroupNorm, BatchNorm, RMSNorm, or a class named ``*Norm*``)."""
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)) or "norm" in type(module).__name__.lower()


@register("layernorm", LayerNormConfig, EVERY_FAMILY)
def inject_layernorm(model, fam, cfg, target) -> list:
    return unfreeze(model, target, lambda mn, m, pn: is_norm(m), "normalisation")


@register("full", FullConfig, EVERY_FAMILY)
def inject_full(model, fam, cfg, target) -> list:
    if cfg.target is None:
        model.requires_grad_(True)
        return [""]
    chosen = [n for n, m in target.select(model.named_modules(), "modules") if target.matches(n)]
    for n in chosen:
        model.get_submodule(n).requires_grad_(True)
    return chosen


@register("linear", LinearProbeConfig, tuple(f for f in EVERY_FAMILY if f not in ("clip", "hf-clip")),
          why_not={"clip": _NO_HEAD, "hf-clip": _NO_HEAD})
def inject_linear(model, fam, cfg, target) -> list:
    return []
