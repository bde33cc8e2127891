"""MuFA, AdaptFormer and the Houlsby adapter: a (multi-scale) bottleneck beside or after each block's MLP.

One :class:`~rspeft_fast.MuFAAdapter` per selected transformer block, ``dim -> sum(dim // rate) -> dim``;
``placement="parallel"`` adds ``adapter(norm(x))`` to the block's MLP branch (SPEC §1: outside any layer scale),
``"serial"`` replaces the MLP output ``y`` by ``y + adapter(y)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...modules import MuFAAdapter
from ..config import AdapterConfig, OptionError
from ..registry import register
from ._common import attach, blocks_of, dd

FAMILIES = ("vit", "swin", "eva", "tv-swin", "hf-vit", "hf-dinov2", "hf-dinov3", "hf-swin")
WHY_NOT = {
    "resnet": "the adapters are placed beside transformer MLPs / ConvNeXt blocks; ResNets get bitfit, layernorm "
              "(BatchNorm), linear, full",
    "convnext": "MuFA/AdaptFormer are placed beside transformer MLPs; ConvNeXt's adapter is EQAM (UPetu)",
    "clip": "HarMA's placement for CLIP towers is MGA; MuFA/AdaptFormer are defined on the image ViT alone",
    "hf-clip": "as for open_clip: MGA is the CLIP-tower method",
}


@dataclass
class MuFAConfig(AdapterConfig):
    """MuFA: multi-scale fusion adapter beside (``"parallel"``) or after (``"serial"``) each block's MLP."""

    method: ClassVar[str] = "mufa"
    rates: tuple = (8, 16, 32)
    scale: float = 1.0
    placement: str = "parallel"

    def validate(self) -> None:
        super().validate()
        if not self.rates or any(r <= 0 for r in self.rates):  # a tuple of ints already (AdapterConfig.validate)
            raise OptionError(f"rates must be a non-empty sequence of positive integers, got {self.rates}")
        if self.placement not in ("parallel", "serial"):
            raise OptionError(f"placement must be 'parallel' or 'serial', got {self.placement!r}")


@dataclass
class AdaptFormerConfig(MuFAConfig):
    """AdaptFormer: one bottleneck branch (width ``dim // rate``) parallel to the MLP, scaled by ``scale``."""

    method: ClassVar[str] = "adaptformer"
    rates: tuple = (8,)
    scale: float = 0.1
    placement: str = "parallel"


@dataclass
class AdapterHoulsbyConfig(MuFAConfig):
    """Houlsby-style serial bottleneck adapter on the MLP output: ``y + adapter(y)``."""

    method: ClassVar[str] = "adapter"
    rates: tuple = (8,)
    scale: float = 1.0
    placement: str = "serial"


@register("adapter", AdapterHoulsbyConfig, FAMILIES, why_not=WHY_NOT)  # decorators apply bottom-up: mufa first
@register("adaptformer", AdaptFormerConfig, FAMILIES, why_not=WHY_NOT)
@register("mufa", MuFAConfig, FAMILIES, why_not=WHY_NOT)
def inject_bottleneck(model, fam, cfg: MuFAConfig, target) -> list:
    impl = cfg.impl_for("mufa")
    out = []
    for name, blk in target.select(blocks_of(model, fam), "transformer blocks"):
        ad = MuFAAdapter(fam.block_dim(blk), rates=cfg.rates, scale=cfg.scale, impl=impl).to(**dd(blk))
        out.append(attach(fam, name, blk, ad, cfg.placement))
    return out
