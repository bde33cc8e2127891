"""LoRand (Yin et al., CVPR 2023): a serial low-rank-synthesised bottleneck after the attention and after the MLP of
each block (SPEC §1): ``y ← y + up(GELU(down(y)))`` on each sub-layer's output, before the residual (the reference's
``lorand1(attn(norm1(x))) + identity``, ``lorand2(ffn(norm2(x))) + identity``). The bottleneck runs through the fused
MuFA kernel (one branch, serial: :class:`~rspeft_fast.LoRand`); the two adapters live on the block
(``<block>.adapter.attn`` / ``.mlp``).

Fits timm ViT and Swin (the families whose block forward we own). Not elsewhere: Eva and the HF families would need
our copy of their block forward for the attention-side adapter; ConvNeXt / ResNet have no transformer sub-layers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from timm.models.swin_transformer import SwinTransformerBlock
from timm.models.vision_transformer import Block as ViTBlock
from torch import nn

from ...modules import LoRand
from ..config import AdapterConfig, OptionError
from ..registry import register
from ._common import blocks_of, check_free, dd
from .convpass import WHY_NOT as _CONVPASS_WHY_NOT

WHY_NOT = dict(_CONVPASS_WHY_NOT, eva="the attention-side adapter needs our own copy of Eva's block forward (RoPE)")


@dataclass
class LoRandConfig(AdapterConfig):
    """LoRand after the attention and after the MLP of every selected block.

    ``branches`` ``α`` (4), ``kernel`` ``β`` (8), bottleneck ``hidden`` (None: ``dim // reduction``, ``reduction``
    4) — the reference's ``Lorand(in_dim, factor=4)`` with ``num_branch=4, kernel_dim=8``: 1.76 % of ViT-B/16
    (1.78 % with a 21-class head) against MuFA's 1.84 %, which no round setting reproduces (``hidden=226`` would).
    ``zero_init_up``: ``up`` starts at zero, the adapter at the identity (False: the reference's init)."""

    method: ClassVar[str] = "lorand"
    branches: int = 4
    kernel: int = 8
    hidden: Optional[int] = None
    reduction: int = 4
    zero_init_up: bool = True

    def validate(self) -> None:
        super().validate()
        for k in ("branches", "kernel", "reduction"):
            if getattr(self, k) <= 0:
                raise OptionError(f"lorand: {k} must be positive, got {getattr(self, k)}")
        if self.hidden is not None and self.hidden <= 0:
            raise OptionError(f"lorand: hidden must be positive, got {self.hidden}")


class LoRandViTBlock(ViTBlock):
    """timm ViT ``Block`` with LoRand on its attention output and on its MLP output."""

    def forward(self, x, attn_mask=None, is_causal: bool = False):
        if not self.adapter_enabled:
            return ViTBlock.forward(self, x, attn_mask=attn_mask, is_causal=is_causal)
        x = x + self.drop_path1(self.ls1(self.adapter.attn(self.attn(self.norm1(x), attn_mask=attn_mask,
                                                                        is_causal=is_causal))))
        return x + self.drop_path2(self.ls2(self.adapter.mlp(self.mlp(self.norm2(x)))))


class LoRandSwinBlock(SwinTransformerBlock):
    """timm ``SwinTransformerBlock`` with LoRand on its window-attention output and on its MLP output."""

    def forward(self, x):
        if not self.adapter_enabled:
            return SwinTransformerBlock.forward(self, x)
        B, H, W, C = x.shape
        x = x + self.drop_path1(self.adapter.attn(self._attn(self.norm1(x))))
        x = x.reshape(B, -1, C)
        x = x + self.drop_path2(self.adapter.mlp(self.mlp(self.norm2(x))))
        return x.reshape(B, H, W, C)


_SWAP = {ViTBlock: LoRandViTBlock, SwinTransformerBlock: LoRandSwinBlock}


@register("lorand", LoRandConfig, ("vit", "swin"), why_not=WHY_NOT)
def inject_lorand(model, fam, cfg: LoRandConfig, target) -> list:
    impl = cfg.impl_for("mufa")
    out = []
    for name, blk in target.select(blocks_of(model, fam), "transformer blocks"):
        check_free(blk, name, "adapter")
        d = fam.block_dim(blk)
        hidden = cfg.hidden if cfg.hidden is not None else max(1, d // cfg.reduction)
        blk.__class__ = _SWAP[type(blk)]
        blk.adapter = nn.ModuleDict({
            part: LoRand(d, hidden, cfg.branches, cfg.kernel, zero_init_up=cfg.zero_init_up, impl=impl).to(**dd(blk))
            for part in ("attn", "mlp")})
        blk.adapter_enabled = True
        out.append(name)
    return out
