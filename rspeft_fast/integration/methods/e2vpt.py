"""E2VPT (Han et al., ICCV 2023): deep visual prompts plus key-value prompts (SPEC §1).

The visual prompts are deep VPT's, ``model.vpt_prompts (depth, p, D)`` (re-set before every block; ``p = 0``: none);
each selected block gets :class:`~rspeft_fast.KVPrompts` (``<block>.adapter``): ``n`` key and ``n`` value tokens per
head appended to K and V after the projections, so the output keeps its length. Token pruning (E2VPT's): call
``<block>.adapter.prune(keep)`` with a bool mask of the key-value tokens to keep (the file keeps every token, so a
pruned adapter loads into the same shapes; the mask is a saved buffer).

timm ViT only, for VPT's reasons (the visual prompts): Swin's fixed windows, Eva's rotary table, HF not wired.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch
from timm.models.vision_transformer import Block as ViTBlock
from torch import nn

from ...modules import KVPrompts
from .. import _blocks
from ..config import AdapterConfig, OptionError
from ..registry import REGISTRY, register
from ._common import blocks_of, check_free, dd
from ._prompted_attention import prompted_attention
from .vpt import inject_vpt as _vpt  # noqa: F401  (vpt registers first: the why-not texts below are its)


@dataclass
class E2VPTConfig(AdapterConfig):
    """E2VPT on a timm ViT: ``num_tokens`` deep visual prompts per block (15) and ``kv_tokens`` key + value prompts per
    head per block (10). ``p + 2n = 35`` tokens of width D per block: 0.39 % of ViT-B/16 with a 21-class head, MuFA's
    Table 1 figure (the E2VPT paper's abstract: 0.32 % on VTAB-1k, after pruning). ``init_std``: both inits
    (truncated normal)."""

    method: ClassVar[str] = "e2vpt"
    num_tokens: int = 15
    kv_tokens: int = 10
    init_std: float = 0.02

    def validate(self) -> None:
        super().validate()
        if self.num_tokens < 0:
            raise OptionError(f"e2vpt: num_tokens must be >= 0, got {self.num_tokens}")
        if self.kv_tokens <= 0:
            raise OptionError(f"e2vpt: kv_tokens must be positive, got {self.kv_tokens}")


class E2VPTViTBlock(ViTBlock):
    """timm ViT ``Block`` whose attention attends to E2VPT's key-value prompts (``self.adapter``: :class:`KVPrompts`)."""

    def forward(self, x, attn_mask=None, is_causal: bool = False):
        if not self.adapter_enabled:
            return ViTBlock.forward(self, x, attn_mask=attn_mask, is_causal=is_causal)
        x = x + self.drop_path1(self.ls1(prompted_attention(self.attn, self.norm1(x), attn_mask, is_causal,
                                                            kv=self.adapter)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


@register("e2vpt", E2VPTConfig, ("vit",), why_not=dict(REGISTRY["vpt"].why_not))
def inject_e2vpt(model, fam, cfg: E2VPTConfig, target) -> list:
    out = []
    for name, blk in target.select(blocks_of(model, fam), "transformer blocks"):
        check_free(blk, name, "adapter")
        attn = blk.attn
        blk.__class__ = E2VPTViTBlock
        blk.adapter = KVPrompts(attn.num_heads, attn.head_dim, cfg.kv_tokens, cfg.init_std).to(**dd(blk))
        blk.adapter_enabled = True
        out.append(name)
    if cfg.num_tokens:
        check_free(model, "model", "vpt_prompts")
        depth = len(model.blocks)
        p = torch.empty(depth, cfg.num_tokens, model.embed_dim, **dd(model))
        model.vpt_prompts = nn.Parameter(nn.init.trunc_normal_(p, std=cfg.init_std))
        model.adapter_enabled = True
        model.norm_pre.register_forward_hook(functools.partial(_blocks.vpt_insert, model))
        for i in range(1, depth):
            model.blocks[i].register_forward_pre_hook(functools.partial(_blocks.vpt_replace, model, i))
        model.norm.register_forward_pre_hook(functools.partial(_blocks.vpt_remove, model))
        out = ["vpt_prompts"] + out
    return out
