"""LoRA on the attention projections: ``W x + (alpha / rank) * B A x`` (``B`` zero-init); mergeable."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from .. import _blocks
from ..config import AdapterConfig, OptionError
from ..registry import register
from ._common import check_free


@dataclass
class LoRAConfig(AdapterConfig):
    """LoRA on the attention ``qkv`` projections: ``W x + (alpha / rank) * B A x`` (``B`` zero-init).

    ``modules``: regex over the attention's child Linear names to adapt (default: ``qkv`` only, which means the
    family's q/k/v projections: the fused ``qkv`` in timm, ``q_proj`` / ``k_proj`` / ``v_proj`` in HF).
    """

    method: ClassVar[str] = "lora"
    rank: int = 8
    alpha: float = 8.0
    modules: str = r"^qkv$"

    def validate(self) -> None:
        super().validate()
        if int(self.rank) <= 0:
            raise OptionError(f"rank must be positive, got {self.rank}")


_DEFAULT_MODULES = LoRAConfig.__dataclass_fields__["modules"].default


def merge(model: nn.Module) -> None:
    """``W += scaling * B A`` in every LoRA Linear; the LoRA factors are removed."""
    for m in list(model.modules()):
        if isinstance(m, _blocks.LoRALinear):
            _blocks.merge_lora(m)


@register("lora", LoRAConfig, ("vit", "swin", "eva", "hf-vit", "hf-dinov2", "hf-dinov3", "hf-swin"), merge=merge,
          why_not={"tv-swin": "torchvision's window attention reads qkv.weight directly (F.linear), so a LoRA Linear "
                              "would never run; use timm swin* or HF Swin for LoRA"})
def inject_lora(model, fam, cfg: LoRAConfig, target) -> list:
    pat = re.compile(fam.attn_linears if cfg.modules == _DEFAULT_MODULES else cfg.modules)
    attn = re.compile(fam.attn)
    cands = []
    for mname, mod in model.named_modules():
        if not attn.search(mname):
            continue
        for cname, child in mod.named_children():
            if isinstance(child, nn.Linear) and pat.search(cname):
                cands.append((f"{mname}.{cname}", child))
    if not cands:
        raise ValueError(f"LoRA: no attention Linear of {fam.label} matched modules={pat.pattern!r}")
    out = []
    for name, lin in target.select(cands, "attention projections"):
        check_free(lin, name, "lora_A", "lora_B")
        parent = model.get_submodule(name.rpartition(".")[0])
        if getattr(parent, "q_bias", None) is not None and hasattr(parent, "qkv_bias_separate"):
            # timm EvaAttention with q/k/v biases (EVA-02) runs F.linear(x, qkv.weight, bias) and never calls the
            # qkv module; its own switch makes it call qkv(x) and add the biases after (same maths, last-bit rounding)
            parent.qkv_bias_separate = True
        _blocks.make_lora(lin, int(cfg.rank), cfg.alpha)
        out.append(name)
    return out
