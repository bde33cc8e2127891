"""UPetu's CAPM after each ConvNeXt stage: ``num_prompts`` prompt vectors per stage."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...modules import CAPM
from .. import _blocks
from ..config import AdapterConfig, OptionError
from ..registry import register
from ._common import check_free, dd


@dataclass
class CAPMConfig(AdapterConfig):
    """UPetu's CAPM after each ConvNeXt stage: ``num_prompts`` prompt vectors per stage."""

    method: ClassVar[str] = "capm"
    num_prompts: int = 8

    def validate(self) -> None:
        super().validate()
        if int(self.num_prompts) <= 0:
            raise OptionError(f"num_prompts must be positive, got {self.num_prompts}")


@register("capm", CAPMConfig, ("convnext",), why_not={"hf-convnext": "not wired for HF ConvNext stages; use timm convnext_*"})
def inject_capm(model, fam, cfg, target) -> list:
    """CAPM after every selected ConvNeXt stage (``cfg``: a :class:`CAPMConfig` or an ``EQAMConfig`` with CAPM)."""
    stages = [(n, m) for n, m in model.named_modules() if isinstance(m, _blocks.ConvNeXtStage)]
    out = []
    for name, st in target.select(stages, "ConvNeXt stages"):
        if type(st) is not _blocks.ConvNeXtStage:
            raise TypeError(f"{name}: unknown ConvNeXtStage subclass {type(st).__name__}")
        check_free(st, name, "capm")
        if not len(st.blocks):  # pragma: no cover
            raise ValueError(f"{name}: empty stage")
        dim = int(st.blocks[-1].norm.normalized_shape[0])
        st.__class__ = _blocks.AdaptedConvNeXtStage
        st.capm = CAPM(dim, num_prompts=int(cfg.num_prompts), channels_last=False).to(**dd(st))
        st.adapter_enabled = True
        out.append(name)
    return out
