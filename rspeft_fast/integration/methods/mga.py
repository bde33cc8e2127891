"""HarMA's gated MGA after each block's MLP: open_clip / HF CLIP (both towers, BiShare, text padding mask) and
the timm / HF ViT-style families (one tower)."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar, NamedTuple, Optional

import torch
from torch import nn

from ...modules import BiShareAdapter, MGAdapter
from .. import _blocks
from ..config import AdapterConfig, OptionError
from ..families import Family, family_of
from ..registry import register
from ._common import attach, blocks_of, dd

_NOT_GLOBAL = "MGA is HarMA's adapter for CLIP-style towers (global-attention ViT blocks)"
MAX_HIDDEN = 128  # HarMA's width on CLIP ViT-B (768 / 512 wide towers)
HEAD_DIM = 16


@dataclass
class MGAConfig(AdapterConfig):
    """HarMA's MGA in every layer of a CLIP-style model (open_clip, HF CLIP) or of a ViT (timm, HF).

    Placement: ``y = mlp(ln_2(x)); y = b*MGA(y) + (1-b)*y``, ``b = sigmoid(block_gate)`` (a Parameter
    per layer, init ``block_gate_init``). ``towers``: ``"both" | "image" | "text"`` (CLIP models only).
    ``bishare``: the text-tower adapters hold a per-layer BiShareAdapter (SPEC); ``share_across_towers``
    additionally lets the image adapter of layer i use the text tower's BiShare of layer i (HarMA's
    cross-modal sharing; needs equal depths). ``text_padding_mask``: pass the text key padding mask
    (token == pad id, default 0) to the text-tower adapters' attention.

    Sizes follow the model's width ``W`` (the widest adapted tower) unless given: ``hidden`` = ``W / 6``
    rounded down to a multiple of 16, between 16 and 128; ``heads`` = ``hidden / 16`` (head dim 16; 1 for a
    ``hidden`` that is not a multiple of 16). HarMA's 128 / 8 on CLIP ViT-B (768 / 512 wide) follows, and
    every model gets about the same share: MGA tunes ≈ 3.5 % of a ViT-Ti / S / B (a fixed 128 / 8 would
    tune 25 % of the 192-wide ViT-Ti). ``inject`` stores the sizes it chose in the config (and so in a
    saved adapter file).
    """

    method: ClassVar[str] = "mga"
    hidden: Optional[int] = None
    heads: Optional[int] = None
    block_gate_init: float = 0.6
    towers: str = "both"
    bishare: bool = True
    share_across_towers: bool = False
    text_padding_mask: bool = True
    pad_id: int = 0

    def validate(self) -> None:
        super().validate()
        if self.towers not in ("both", "image", "text"):
            raise OptionError(f"towers must be 'both', 'image' or 'text', got {self.towers!r}")
        for k in ("hidden", "heads"):
            if getattr(self, k) is not None and getattr(self, k) <= 0:
                raise OptionError(f"mga: option {k}={getattr(self, k)} must be positive")
        if self.hidden is not None and self.heads is not None and self.hidden % self.heads:
            raise OptionError(f"hidden={self.hidden} must be divisible by heads={self.heads}")


def default_sizes(width: int, hidden: Optional[int] = None, heads: Optional[int] = None) -> tuple:
    """``(hidden, heads)`` for a model ``width`` wide, by :class:`MGAConfig`'s rule; given values are kept."""
    if hidden is None:
        hidden = min(MAX_HIDDEN, max(HEAD_DIM, width // 6 // HEAD_DIM * HEAD_DIM))
    if heads is None:
        heads = hidden // HEAD_DIM if hidden % HEAD_DIM == 0 else 1
    return int(hidden), int(heads)


class _Towers(NamedTuple):
    """Where MGA goes in a model: each tower's family and ``(name, block)`` pairs, and the text tower's
    token embedding / transformer (the padding-mask hooks; open_clip)."""

    text_fam: Family
    text: list
    image_fam: Family
    image: list
    token_embedding: Optional[nn.Module] = None
    text_transformer: Optional[nn.Module] = None
    pad_id: Optional[int] = None


def _exact_blocks(seq, prefix: str, allowed: tuple) -> list:
    out = []
    for i, b in enumerate(seq):
        if type(b) not in allowed:
            raise TypeError(f"{prefix}{i}: MGA supports {', '.join(c.__name__ for c in allowed)}, got {type(b).__name__}")
        out.append((f"{prefix}{i}", b))
    return out


def _family_or_none(model: nn.Module) -> Optional[str]:
    try:
        return family_of(model).name
    except TypeError:
        return None


def _open_clip_towers(model, fam: Family, cfg: MGAConfig) -> _Towers:
    import open_clip
    from open_clip.transformer import VisionTransformer as ClipViT

    # image tower: open_clip's ViT, or a timm ViT trunk (SigLIP / SigLIP2 and other timm towers)
    trunk = getattr(model.visual, "trunk", None)  # open_clip's TimmModel tower
    img_fam = fam
    if isinstance(model.visual, ClipViT):
        img = _exact_blocks(model.visual.transformer.resblocks, "visual.transformer.resblocks.", (_blocks.ClipBlock,))
    elif trunk is not None and _family_or_none(trunk) in ("vit", "eva"):
        img_fam = family_of(trunk)  # the timm tower's own protocol (SigLIP / SigLIP2: timm ViT)
        img = [(f"visual.trunk.{n}", b) for n, b in blocks_of(trunk, img_fam)]
    else:
        raise TypeError(f"MGA on open_clip needs a ViT image tower (open_clip or timm ViT / Eva), got {type(model.visual).__name__}")
    if isinstance(model, open_clip.CustomTextCLIP):
        tower = model.text
        tok, tr = getattr(tower, "token_embedding", None), getattr(tower, "transformer", None)
        pad_id, prefix = getattr(tower, "pad_id", cfg.pad_id), "text.transformer."
    else:
        tok, tr, pad_id, prefix = model.token_embedding, model.transformer, cfg.pad_id, "transformer."
    if tr is None and cfg.towers != "image":
        raise TypeError("MGA on open_clip needs a transformer text tower (model.transformer or model.text.transformer)")
    text = _exact_blocks(tr.resblocks, f"{prefix}resblocks.", (_blocks.ClipBlock,)) if tr is not None else []
    return _Towers(fam, text, img_fam, img, tok, tr, pad_id)


def _hf_clip_towers(model, fam: Family) -> _Towers:
    allowed = fam.block_classes()
    text_model, vision_model = getattr(model, "text_model", None), getattr(model, "vision_model", None)
    text = _exact_blocks(text_model.encoder.layers, "text_model.encoder.layers.", allowed) if text_model is not None else []
    img = _exact_blocks(vision_model.encoder.layers, "vision_model.encoder.layers.", allowed) if vision_model is not None else []
    return _Towers(fam, text, fam, img)


def _towers(model, fam: Family, cfg: MGAConfig) -> _Towers:
    if fam.name == "clip":
        return _open_clip_towers(model, fam, cfg)
    if fam.name == "hf-clip":
        return _hf_clip_towers(model, fam)
    return _Towers(fam, [], fam, blocks_of(model, fam))


def _adapted(t: _Towers, fam: Family, cfg: MGAConfig) -> list:
    """``[(family, blocks)]`` of the towers MGA adapts (``towers=`` applies to CLIP models; a ViT has one)."""
    if fam.name not in ("clip", "hf-clip"):
        return [(t.image_fam, t.image)]
    return ([(t.text_fam, t.text)] if cfg.towers in ("both", "text") else []) + (
        [(t.image_fam, t.image)] if cfg.towers in ("both", "image") else [])


def resolve(model, fam: Family, cfg: MGAConfig) -> MGAConfig:
    """Fill ``hidden`` / ``heads`` from the width of the towers MGA adapts (:class:`MGAConfig`'s rule)."""
    if cfg.hidden is not None and cfg.heads is not None:
        return cfg
    widths = [f.block_dim(b) for f, blocks in _adapted(_towers(model, fam, cfg), fam, cfg) for _, b in blocks]
    hidden, heads = default_sizes(max(widths, default=6 * MAX_HIDDEN), cfg.hidden, cfg.heads)
    return cfg.replace(hidden=hidden, heads=heads)


def _adapt(fam: Family, cfg: MGAConfig, target, blocks, text: bool, ctx=None, shares=None):
    """One MGAdapter (+ block gate) per selected block; with ``text`` each adapter holds a new BiShareAdapter,
    with ``shares`` (a list per layer) it uses those. Returns (adapted names, BiShare modules made)."""
    impl = cfg.impl_for("mga")
    made, names = [], []
    chosen = target.select(blocks, "transformer blocks")
    if shares is not None and len(shares) != len(chosen):
        raise ValueError(
            f"share_across_towers needs the same number of adapted layers in both towers, got {len(chosen)} image and {len(shares)} text"
        )
    for i, (name, blk) in enumerate(chosen):
        kw = dd(blk)
        share = None
        if text and cfg.bishare:
            share = BiShareAdapter(int(cfg.hidden), int(cfg.heads)).to(**kw)
            made.append(share)
        elif shares is not None:
            share = shares[i]
        ad = MGAdapter(fam.block_dim(blk), hidden=int(cfg.hidden), heads=int(cfg.heads), share=share, impl=impl).to(**kw)
        gate = nn.Parameter(torch.tensor(float(cfg.block_gate_init), **kw))
        names.append(attach(fam, name, blk, ad, "mga", gate=gate, ctx=ctx))
    return names, made


@register("mga", MGAConfig, ("vit", "eva", "clip", "hf-vit", "hf-dinov2", "hf-dinov3", "hf-clip"), resolve=resolve,
          why_not={"swin": _NOT_GLOBAL, "hf-swin": _NOT_GLOBAL, "tv-swin": _NOT_GLOBAL})
def inject_mga(model, fam: Family, cfg: MGAConfig, target) -> list:
    t = _towers(model, fam, cfg)
    ctx = None
    if t.text and cfg.towers in ("both", "text") and cfg.text_padding_mask:
        ctx = _blocks.TextMaskContext()
        if fam.name == "hf-clip":  # each layer derives the mask from its own attention_mask (checkpoint-safe)
            for _, layer in t.text:
                layer.register_forward_pre_hook(functools.partial(_blocks.hf_layer_text_mask, ctx), with_kwargs=True)
        else:
            if t.token_embedding is None:
                raise TypeError("text_padding_mask=True needs a token_embedding in the text tower; pass text_padding_mask=False")
            pad = int(t.pad_id if t.pad_id is not None else cfg.pad_id)
            t.token_embedding.register_forward_pre_hook(functools.partial(_blocks.set_text_mask, ctx, pad))
            t.text_transformer.register_forward_hook(functools.partial(_blocks.clear_text_mask, ctx))
    if fam.name not in ("clip", "hf-clip"):
        return _adapt(t.image_fam, cfg, target, t.image, text=False)[0]
    names, shares = [], None
    if cfg.towers in ("both", "text"):
        n, shares = _adapt(t.text_fam, cfg, target, t.text, text=True, ctx=ctx)
        names += n
    if cfg.towers in ("both", "image"):
        use = shares if (cfg.share_across_towers and cfg.bishare and shares) else None
        names += _adapt(t.image_fam, cfg, target, t.image, text=False, shares=use)[0]
    return names
