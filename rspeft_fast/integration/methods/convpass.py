"""Convpass (Jie & Deng 2022): a convolutional bypass beside both sub-layers of each block (SPEC §1).

``x += attn(n1(x)) + s·CP_attn(n1(x))``, ``x += mlp(n2(x)) + s·CP_mlp(n2(x))``; the two :class:`~rspeft_fast.Convpass`
modules live on the block (``<block>.adapter.attn`` / ``.mlp``). On a timm ViT the conv runs over the model's patch
grid (class and register tokens as their own 1×1 maps); on a timm Swin over the block's ``(H, W)`` feature map (the
reference's ``Convpass_swin``). The deltas are added outside any layer scale, each through the block's drop path.

Fits the families whose block forward we own and whose tokens form a known grid: timm ViT and Swin. Not elsewhere:
Eva (DINOv3 / EVA-02) and the HF families would need a copy of their block forward for the attention-side bypass;
ConvNeXt / ResNet are already convolutional (their adapters are EQAM / the backbone-tuning baselines).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from timm.models.swin_transformer import SwinTransformerBlock
from timm.models.vision_transformer import Block as ViTBlock
from torch import nn

from ...modules import Convpass
from ..config import AdapterConfig, OptionError
from ..registry import register
from ._common import blocks_of, check_free, dd

WHY_NOT = {
    "eva": "the attention-side bypass needs our own copy of Eva's block forward (RoPE), which is not written",
    "convnext": "ConvNeXt is convolutional already; its adapter is EQAM (UPetu)",
    "resnet": "a convolutional backbone: bitfit, layernorm, linear, full",
    "clip": "HarMA's CLIP method is MGA",
    "hf-vit": "the attention-side bypass is wired for timm blocks only", "hf-swin": "wired for timm blocks only",
    "tv-swin": "wired for timm blocks only",
}


@dataclass
class ConvpassConfig(AdapterConfig):
    """Convpass beside the attention and the MLP of every selected block.

    ``width``: bottleneck channels ``w`` (default 68: MuFA's Table 1 budget, 4.12 % of ViT-B/16; the Convpass paper
    uses 8, 0.38 %); ``scale``: ``s`` (1.0); ``dropout``: before ``up`` in training (the reference's 0.1)."""

    method: ClassVar[str] = "convpass"
    width: int = 68
    scale: float = 1.0
    dropout: float = 0.1

    def validate(self) -> None:
        super().validate()
        if self.width <= 0:
            raise OptionError(f"convpass: width must be positive, got {self.width}")
        if not 0.0 <= self.dropout < 1.0:
            raise OptionError(f"convpass: dropout must be in [0, 1), got {self.dropout}")


def _grid(blk, n_tokens: int) -> tuple:
    """The patch grid of a ViT block's input: the model's, or (a resized input) the square one."""
    n = n_tokens - blk.adapter_num_prefix
    H, W = blk.adapter_grid
    if H * W == n:
        return H, W
    s = math.isqrt(n)
    if s * s != n:
        raise RuntimeError(f"Convpass: {n} patch tokens form no {H}x{W} (or square) grid")
    return s, s


class ConvpassViTBlock(ViTBlock):
    """timm ViT ``Block`` with Convpass beside its attention and its MLP."""

    def forward(self, x, attn_mask=None, is_causal: bool = False):
        if not self.adapter_enabled:
            return ViTBlock.forward(self, x, attn_mask=attn_mask, is_causal=is_causal)
        grid, k = _grid(self, x.shape[1]), self.adapter_num_prefix
        n = self.norm1(x)
        x = x + self.drop_path1(self.ls1(self.attn(n, attn_mask=attn_mask, is_causal=is_causal))) \
            + self.drop_path1(self.adapter.attn(n, grid, k))
        n = self.norm2(x)
        return x + self.drop_path2(self.ls2(self.mlp(n))) + self.drop_path2(self.adapter.mlp(n, grid, k))


class ConvpassSwinBlock(SwinTransformerBlock):
    """timm ``SwinTransformerBlock`` with Convpass beside its window attention and its MLP (over the ``(H, W)`` map)."""

    def forward(self, x):
        if not self.adapter_enabled:
            return SwinTransformerBlock.forward(self, x)
        B, H, W, C = x.shape
        n = self.norm1(x)
        x = x + self.drop_path1(self._attn(n)) + self.drop_path1(self.adapter.attn(n))
        n = self.norm2(x)
        x = x.reshape(B, -1, C) + self.drop_path2(self.mlp(n.reshape(B, -1, C))) \
            + self.drop_path2(self.adapter.mlp(n)).reshape(B, -1, C)
        return x.reshape(B, H, W, C)


_SWAP = {ViTBlock: ConvpassViTBlock, SwinTransformerBlock: ConvpassSwinBlock}


@register("convpass", ConvpassConfig, ("vit", "swin"), why_not=WHY_NOT)
def inject_convpass(model, fam, cfg: ConvpassConfig, target) -> list:
    out = []
    for name, blk in target.select(blocks_of(model, fam), "transformer blocks"):
        check_free(blk, name, "adapter")
        d = fam.block_dim(blk)
        blk.__class__ = _SWAP[type(blk)]
        blk.adapter = nn.ModuleDict({
            part: Convpass(d, cfg.width, cfg.scale, cfg.dropout).to(**dd(blk)) for part in ("attn", "mlp")})
        blk.adapter.train(blk.training)  # its dropout follows the model's mode (an eval model stays deterministic)
        if fam.name == "vit":
            blk.adapter_grid = tuple(int(g) for g in model.patch_embed.grid_size)
            blk.adapter_num_prefix = int(model.num_prefix_tokens)
        blk.adapter_enabled = True
        out.append(name)
    return out
