"""IVPT — "Improving Visual Prompt Tuning for Self-supervised ViTs" (Yoo et al., ICML 2023; MuFA's reference [19]):
shallow prompts whose update by each block is gated, and a learnable attention temperature per block (SPEC §1).

The prompts are ``model.vpt_prompts (1, n, D)``, inserted after the class / register tokens and removed before the
final norm (VPT's hooks). Each selected block gets an :class:`~rspeft_fast.IVPTGate` (``<block>.adapter``): its
attention logits are divided by ``τ_i`` and its prompt outputs are mixed with its prompt inputs,
``p_{i+1} = g_i·blk_i(x)[prompts] + (1 − g_i)·p_i``. The last block has no gate (its prompt outputs are dropped
before the final norm; the reference's ``GATE_NUM = depth − 1``), so every trainable tensor gets a gradient (DDP).

timm ViT only, for VPT's reasons: Swin attends inside fixed windows (no window for prompts), Eva / DINOv3's rotary
table has no position for them, the HF families are not wired.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch
from timm.models.vision_transformer import Block as ViTBlock
from torch import nn

from ...modules import IVPTGate
from .. import _blocks
from ..config import AdapterConfig, OptionError
from ..registry import REGISTRY, register
from ._common import blocks_of, check_free, dd
from ._prompted_attention import prompted_attention
from .vpt import inject_vpt as _vpt  # noqa: F401  (vpt registers first: the why-not texts below are its)


@dataclass
class IVPTConfig(AdapterConfig):
    """IVPT on a timm ViT: ``num_tokens`` shallow prompts (5), gates initialised at ``sigmoid(-gate_init)``
    (``gate_init`` 10) and temperatures at 1, clamped to ``[t_min, t_max]`` = [0.01, 10] — the reference's defaults
    (``GatedPromptTuning`` ``src/configs/config.py``; its README's CUB example uses 100 tokens, ``gate_init`` 5).
    MuFA's 0.78 % would need about 850 shallow prompts on ViT-B/16: not a sensible default. ``init_std``: the
    prompts' normal init (VPT's)."""

    method: ClassVar[str] = "ivpt"
    num_tokens: int = 5
    gate_init: float = 10.0
    t_min: float = 0.01
    t_max: float = 10.0
    init_std: float = 0.02

    def validate(self) -> None:
        super().validate()
        if self.num_tokens <= 0:
            raise OptionError(f"ivpt: num_tokens must be positive, got {self.num_tokens}")
        if not 0 < self.t_min < self.t_max:
            raise OptionError(f"ivpt: need 0 < t_min < t_max, got {self.t_min}, {self.t_max}")


class IVPTViTBlock(ViTBlock):
    """timm ViT ``Block`` with IVPT's temperature and prompt gate (``self.adapter``: an :class:`IVPTGate`)."""

    def forward(self, x, attn_mask=None, is_causal: bool = False):
        if not self.adapter_enabled:
            return ViTBlock.forward(self, x, attn_mask=attn_mask, is_causal=is_causal)
        k, n = self.adapter_num_prefix, self.adapter_num_prompts
        p_in = x[:, k:k + n]
        x = x + self.drop_path1(self.ls1(prompted_attention(self.attn, self.norm1(x), attn_mask, is_causal,
                                                            tau=self.adapter.tau())))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        if self.adapter.gate_logit is None:
            return x
        return torch.cat([x[:, :k], self.adapter.mix(p_in, x[:, k:k + n]), x[:, k + n:]], dim=1)


@register("ivpt", IVPTConfig, ("vit",), why_not=dict(REGISTRY["vpt"].why_not))
def inject_ivpt(model, fam, cfg: IVPTConfig, target) -> list:
    check_free(model, "model", "vpt_prompts")
    blocks = blocks_of(model, fam)
    last = blocks[-1][0]
    out = []
    for name, blk in target.select(blocks, "transformer blocks"):
        check_free(blk, name, "adapter")
        blk.__class__ = IVPTViTBlock
        blk.adapter = IVPTGate(gate=name != last, gate_init=cfg.gate_init, t_min=cfg.t_min,
                               t_max=cfg.t_max).to(**dd(blk))
        blk.adapter_num_prefix = int(model.num_prefix_tokens)
        blk.adapter_num_prompts = int(cfg.num_tokens)
        blk.adapter_enabled = True
        out.append(name)
    model.vpt_prompts = nn.Parameter(torch.randn(1, cfg.num_tokens, model.embed_dim, **dd(model)) * cfg.init_std)
    model.adapter_enabled = True
    model.norm_pre.register_forward_hook(functools.partial(_blocks.vpt_insert, model))
    model.norm.register_forward_pre_hook(functools.partial(_blocks.vpt_remove, model))
    return ["vpt_prompts"] + out
