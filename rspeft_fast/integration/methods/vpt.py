"""Visual prompt tuning on a timm ViT: prompt tokens inserted after the class/register tokens (forward hooks)."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .. import _blocks
from ..config import AdapterConfig, OptionError
from ..registry import register
from ._common import check_free, dd

_WINDOWS = "Swin attends inside fixed windows of the patch grid: prompt tokens have no window to sit in"


@dataclass
class VPTConfig(AdapterConfig):
    """Visual prompt tuning on a timm ViT: ``num_tokens`` prompt tokens after the class/register tokens,
    re-set before every block when ``deep`` (one set per block), removed before the final norm."""

    method: ClassVar[str] = "vpt"
    num_tokens: int = 10
    deep: bool = False
    init_std: float = 0.02

    def validate(self) -> None:
        super().validate()
        if int(self.num_tokens) <= 0:
            raise OptionError(f"num_tokens must be positive, got {self.num_tokens}")


@register("vpt", VPTConfig, ("vit",), why_not={
    "swin": _WINDOWS, "hf-swin": _WINDOWS, "tv-swin": _WINDOWS,
    "eva": "Eva's rotary position table is sized to the patch grid: prompt tokens would need positions",
    "hf-vit": "not wired for HF models (prompt tokens would go between the embeddings and the encoder)",
    "hf-dinov2": "not wired for HF models",
    "hf-dinov3": "DINOv3's rotary position table is sized to the patch grid",
})
def inject_vpt(model, fam, cfg: VPTConfig, target) -> list:
    if cfg.target is not None:
        raise ValueError("VPT adds prompts at the input (and every block when deep); target= is not supported for vpt")
    check_free(model, "model", "vpt_prompts")
    depth = len(model.blocks) if cfg.deep else 1
    model.vpt_prompts = nn.Parameter(torch.randn(depth, int(cfg.num_tokens), model.embed_dim, **dd(model)) * cfg.init_std)
    model.adapter_enabled = True
    model.norm_pre.register_forward_hook(functools.partial(_blocks.vpt_insert, model))
    if cfg.deep:
        for i in range(1, depth):
            model.blocks[i].register_forward_pre_hook(functools.partial(_blocks.vpt_replace, model, i))
    model.norm.register_forward_pre_hook(functools.partial(_blocks.vpt_remove, model))
    return ["vpt_prompts"]
