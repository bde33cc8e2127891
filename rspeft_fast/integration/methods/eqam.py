"""UPetu's EQAM (a bottleneck of quantised Q-Linear layers) parallel to each ConvNeXt block's MLP; with
``"eqam+capm"`` also CAPM after each stage (:mod:`.capm`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from ...modules import EQAM
from ..config import AdapterConfig, OptionError
from ..registry import register
from ._common import attach, blocks_of, dd
from .capm import inject_capm

WHY_NOT = {
    "resnet": "EQAM is placed in ConvNeXt blocks (UPetu)",
    "hf-convnext": "HF ConvNextLayer computes its MLP inline (pwconv1/act/pwconv2): no MLP module to wrap; use timm "
                   "convnext_* for EQAM/CAPM",
}


@dataclass
class EQAMConfig(AdapterConfig):
    """UPetu's EQAM parallel to each ConvNeXt block's MLP (channels-last), optionally with CAPM
    after each stage (``with_capm=True`` is method ``"eqam+capm"``).

    Bottleneck width: ``hidden`` channels in every block, or ``reduction=r`` for ``dim // r``; neither means
    :class:`~rspeft_fast.EQAM`'s default, which also owns the rule (not both; ``dim`` divisible by ``r``):
    16 channels, UPetu's budget (0.73 % of ConvNeXt-B with CAPM and a 55-class head, SPEC §1); ``reduction=4``
    is eight times that budget. A width the module refuses raises :class:`OptionError` at ``inject``."""

    method: ClassVar[str] = "eqam"
    hidden: Optional[int] = None
    reduction: Optional[int] = None
    bits: int = 8
    with_capm: bool = False
    num_prompts: int = 8

    def validate(self) -> None:
        super().validate()
        if not 2 <= int(self.bits) <= 8:
            raise OptionError(f"bits must be in [2, 8], got {self.bits}")
        if int(self.num_prompts) <= 0:
            raise OptionError(f"num_prompts must be positive, got {self.num_prompts}")

    def to_dict(self) -> dict:
        d = super().to_dict()
        if self.with_capm:
            d["method"] = "eqam+capm"
        return d


def _eqam(dim: int, cfg: EQAMConfig, impl: str) -> EQAM:
    try:
        return EQAM(dim, hidden=cfg.hidden, reduction=cfg.reduction, bits=cfg.bits, impl=impl)
    except ValueError as e:
        raise OptionError(f"{cfg.to_dict()['method']}: options hidden={cfg.hidden}, reduction={cfg.reduction} "
                          f"do not fit a {dim}-channel block ({e})") from None


@register("eqam+capm", EQAMConfig, ("convnext",), why_not=WHY_NOT, defaults={"with_capm": True})
@register("eqam", EQAMConfig, ("convnext",), why_not=WHY_NOT)
def inject_eqam(model, fam, cfg: EQAMConfig, target) -> list:
    impl = cfg.impl_for("eqam")
    out = []
    for name, blk in target.select(blocks_of(model, fam), "ConvNeXt blocks"):
        ad = _eqam(fam.block_dim(blk), cfg, impl).to(**dd(blk))
        out.append(attach(fam, name, blk, ad, "eqam"))
    if cfg.with_capm:
        out += inject_capm(model, fam, cfg, target)
    return out
