"""``inject(model, method, **options)``: a frozen backbone with trainable adapters, in one call.

Supported model families and methods (SPEC §1 for the maths and placements):

=============================  ==========================================================================
family                         methods
=============================  ==========================================================================
timm VisionTransformer (vit)   mufa, adaptformer, adapter, lora, bitfit, layernorm, linear, vpt, full, mga
timm SwinTransformer (swin)    mufa, adaptformer, adapter, lora, bitfit, layernorm, linear, full
timm ConvNeXt (convnext)       eqam, capm, eqam+capm, bitfit, layernorm, linear, full
open_clip CLIP (clip)          mga, bitfit, layernorm, full
=============================  ==========================================================================

Everything that is not an adapter is frozen (``requires_grad=False``) except the classifier head when
the method tunes it (``train_head``; ``linear`` tunes only the head, ``full`` everything). The model is
modified in place and returned; its config is kept as ``model.rspeft_config``.
"""
from __future__ import annotations

import contextlib
import re
import warnings
from typing import Iterator, NamedTuple, Union

import torch
from torch import nn

from ..modules import CAPM, EQAM, BiShareAdapter, MGAdapter, MuFAAdapter
from . import _blocks as B
from .config import (
    AdapterConfig,
    BitFitConfig,
    CAPMConfig,
    EQAMConfig,
    FullConfig,
    LayerNormConfig,
    LinearProbeConfig,
    LoRAConfig,
    MGAConfig,
    MuFAConfig,
    VPTConfig,
    config_for,
)

__all__ = [
    "inject",
    "trainable_parameters",
    "enable_adapters",
    "adapters_disabled",
    "merge_adapters",
    "model_family",
    "TrainableParams",
    "SUPPORTED",
]

SUPPORTED = {
    "vit": ("mufa", "adaptformer", "adapter", "lora", "bitfit", "layernorm", "linear", "vpt", "full", "mga"),
    "swin": ("mufa", "adaptformer", "adapter", "lora", "bitfit", "layernorm", "linear", "full"),
    "convnext": ("eqam", "capm", "eqam+capm", "bitfit", "layernorm", "linear", "full"),
    "clip": ("mga", "bitfit", "layernorm", "full"),
}
_FAMILY_NAMES = {
    "vit": "timm VisionTransformer",
    "swin": "timm SwinTransformer",
    "convnext": "timm ConvNeXt",
    "clip": "open_clip CLIP / CustomTextCLIP",
}
CONFIG_ATTR = "rspeft_config"
_ADAPTER_MODULES = (MuFAAdapter, EQAM, CAPM, MGAdapter, BiShareAdapter)
_ADAPTER_PARAM_LEAVES = ("lora_A", "lora_B", "adapter_gate", "vpt_prompts")


def _supported_text() -> str:
    return "; ".join(f"{_FAMILY_NAMES[f]} ({', '.join(m)})" for f, m in SUPPORTED.items())


def model_family(model: nn.Module) -> str:
    """``"vit" | "swin" | "convnext" | "clip"``; raises ``TypeError`` naming the supported families."""
    from timm.models.convnext import ConvNeXt
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, VisionTransformer):
        return "vit"
    if isinstance(model, SwinTransformer):
        return "swin"
    if isinstance(model, ConvNeXt):
        return "convnext"
    try:
        import open_clip

        if isinstance(model, (open_clip.CLIP, open_clip.CustomTextCLIP)):
            return "clip"
    except Exception:  # pragma: no cover - open_clip missing
        pass
    raise TypeError(f"rspeft_fast.inject: unsupported model {type(model).__module__}.{type(model).__name__}; supported: {_supported_text()}")


# --------------------------------------------------------------------------------------------------
# public API


def inject(model: nn.Module, method: Union[str, AdapterConfig], **options) -> nn.Module:
    """Freeze ``model`` and add the adapters of ``method`` (a name or a config; ``options`` are the
    config's fields). Returns the same (modified) model. See the module docstring for what is supported."""
    cfg = config_for(method, **options)
    if getattr(model, CONFIG_ATTR, None) is not None:
        raise RuntimeError(
            f"model already has adapters injected ({getattr(model, CONFIG_ATTR).to_dict()['method']}); "
            "inject into a fresh model"
        )
    family = model_family(model)
    name = cfg.to_dict()["method"]
    if name not in SUPPORTED[family]:
        raise ValueError(f"method {name!r} is not supported on {_FAMILY_NAMES[family]}; supported there: {', '.join(SUPPORTED[family])}")
    if cfg.num_classes is not None and family == "clip":
        raise ValueError("num_classes applies to timm classifiers; open_clip models have no classifier head")

    head_classes = None
    if family != "clip":
        if cfg.num_classes is not None and cfg.num_classes != model.num_classes:
            model.reset_classifier(int(cfg.num_classes))
        head_classes = int(model.num_classes)

    model.requires_grad_(False)
    target = re.compile(cfg.target) if cfg.target is not None else None

    if isinstance(cfg, MuFAConfig):  # mufa, adaptformer, adapter
        _inject_bottleneck(model, family, cfg, target)
    elif isinstance(cfg, LoRAConfig):
        _inject_lora(model, cfg, target)
    elif isinstance(cfg, VPTConfig):
        _inject_vpt(model, cfg)
    elif isinstance(cfg, EQAMConfig):
        _inject_eqam(model, cfg, target)
        if cfg.with_capm:
            _inject_capm(model, cfg.num_prompts, target)
    elif isinstance(cfg, CAPMConfig):
        _inject_capm(model, cfg.num_prompts, target)
    elif isinstance(cfg, MGAConfig):
        if family == "clip":
            _inject_mga_clip(model, cfg, target)
        else:
            _inject_mga_blocks(model, cfg, target, _blocks_of(model, family), text=False)
    elif isinstance(cfg, BitFitConfig):
        _unfreeze(model, target, lambda mn, m, pn: pn == "bias" or pn.endswith("_bias"), "bias")
    elif isinstance(cfg, LayerNormConfig):
        _unfreeze(model, target, lambda mn, m, pn: isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)) or "norm" in type(m).__name__.lower(), "normalisation")
    elif isinstance(cfg, FullConfig):
        model.requires_grad_(True)
    elif isinstance(cfg, LinearProbeConfig):
        pass
    else:  # pragma: no cover
        raise ValueError(f"unhandled config {type(cfg).__name__}")

    if family != "clip" and (cfg.train_head or isinstance(cfg, LinearProbeConfig)):
        head = model.get_classifier()
        if isinstance(head, nn.Module):
            head.requires_grad_(True)
    if family != "clip":
        cfg = cfg.replace(num_classes=head_classes)
    setattr(model, CONFIG_ATTR, cfg)
    model.rspeft_trainable = tuple(n for n, p in model.named_parameters() if p.requires_grad)
    return model


class TrainableParams(NamedTuple):
    """``trainable`` / ``backbone`` as a percentage is the papers' convention (MuFA's 3.64 % counts the
    tuned parameters, head included, against the original model's size); ``percent_of_total`` is HF
    peft's (against all parameters, adapters included)."""

    trainable: int
    total: int
    backbone: int
    percent: float
    percent_of_total: float

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} || backbone params: {self.backbone:,} || "
            f"all params: {self.total:,} || trainable%: {self.percent:.4f} (of backbone), {self.percent_of_total:.4f} (of all)"
        )


def adapter_parameter_names(model: nn.Module) -> set:
    """Names of the parameters that injection added (adapter modules, LoRA factors, gates, prompts)."""
    names = set()
    for mname, mod in model.named_modules():
        if isinstance(mod, _ADAPTER_MODULES):
            for pn, _ in mod.named_parameters(prefix=mname):
                names.add(pn)
    for pn, _ in model.named_parameters():
        if pn.rsplit(".", 1)[-1] in _ADAPTER_PARAM_LEAVES:
            names.add(pn)
    return names


def trainable_parameters(model: nn.Module) -> TrainableParams:
    """Count the trainable parameters (shared tensors counted once)."""
    params = dict(model.named_parameters())
    added = adapter_parameter_names(model)
    total = sum(p.numel() for p in params.values())
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    backbone = sum(p.numel() for n, p in params.items() if n not in added)
    return TrainableParams(trainable, total, backbone, 100.0 * trainable / max(backbone, 1), 100.0 * trainable / max(total, 1))


def _switchable(model: nn.Module) -> Iterator[nn.Module]:
    for m in model.modules():
        if "adapter_enabled" in m.__dict__:
            yield m


def enable_adapters(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch every injected adapter on or off (off: the forward is exactly the bare backbone's).

    Methods that train the backbone's own tensors (bitfit, layernorm, linear, full) have nothing to
    switch off; a warning says so."""
    cfg = getattr(model, CONFIG_ATTR, None)
    if cfg is None:
        raise RuntimeError("enable_adapters: the model has no injected adapters (call rspeft_fast.inject first)")
    mods = list(_switchable(model))
    if not mods:
        warnings.warn(
            f"method {cfg.to_dict()['method']!r} tunes the backbone's own tensors: there is no adapter to switch off",
            stacklevel=2,
        )
    for m in mods:
        m.adapter_enabled = bool(enabled)
    return model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """``with adapters_disabled(model): y = model(x)`` runs the bare backbone; restores the previous state."""
    mods = list(_switchable(model))
    before = [m.adapter_enabled for m in mods]
    enable_adapters(model, False)
    try:
        yield model
    finally:
        for m, b in zip(mods, before):
            m.adapter_enabled = b


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold linear adapters into the backbone weights: LoRA (``W += scaling * B A``; the LoRA factors
    are removed) and BitFit (already in the biases: nothing to do). Other methods raise."""
    cfg = getattr(model, CONFIG_ATTR, None)
    if cfg is None:
        raise RuntimeError("merge_adapters: the model has no injected adapters")
    if isinstance(cfg, LoRAConfig):
        for m in list(model.modules()):
            if isinstance(m, B.LoRALinear):
                B.merge_lora(m)
        setattr(model, CONFIG_ATTR, None)
        model.rspeft_merged = cfg
        return model
    if isinstance(cfg, BitFitConfig):
        return model
    raise NotImplementedError(
        f"merge_adapters: method {cfg.to_dict()['method']!r} is not linear, so it cannot be folded into the "
        "backbone weights (mergeable: lora, bitfit)"
    )


# --------------------------------------------------------------------------------------------------
# helpers


def _dd(module: nn.Module) -> dict:
    p = next(module.parameters())
    return {"device": p.device, "dtype": p.dtype}


def _check_free(module: nn.Module, name: str, *attrs) -> None:
    for a in attrs:
        if hasattr(module, a):
            raise RuntimeError(f"{name}: the block already has an attribute {a!r}; cannot inject")


def _select(named, target, what: str) -> list:
    named = list(named)
    chosen = [(n, m) for n, m in named if target is None or target.search(n)]
    if not chosen:
        sample = ", ".join(n for n, _ in named[:6])
        raise ValueError(f"target={target.pattern!r} matched none of the {len(named)} {what} (e.g. {sample})")
    return chosen


def _blocks_of(model: nn.Module, family: str) -> list:
    want = {"vit": B.ViTBlock, "swin": B.SwinTransformerBlock}[family]
    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, want)]
    for n, m in blocks:
        if type(m) is not want:
            raise TypeError(
                f"{n}: block class {type(m).__name__} is a subclass of timm's {want.__name__} that rspeft_fast does not "
                "know; its forward may differ, so no adapter was injected"
            )
    if not blocks:
        raise TypeError(f"no {want.__name__} blocks found in the model")
    return blocks


def _block_dim(block: nn.Module) -> int:
    return int(block.norm2.normalized_shape[0])


def _inject_bottleneck(model, family, cfg: MuFAConfig, target) -> None:
    impl = cfg.impl_for("mufa")
    for name, blk in _select(_blocks_of(model, family), target, "transformer blocks"):
        _check_free(blk, name, "adapter")
        ad = MuFAAdapter(_block_dim(blk), rates=cfg.rates, scale=cfg.scale, impl=impl).to(**_dd(blk))
        blk.__class__ = B.AdaptedViTBlock if family == "vit" else B.AdaptedSwinBlock
        blk.adapter = ad
        blk.adapter_kind = cfg.placement
        blk.adapter_enabled = True


def _inject_lora(model, cfg: LoRAConfig, target) -> None:
    pat = re.compile(cfg.modules)
    cands = []
    for mname, mod in model.named_modules():
        if not mname.endswith("attn") and ".attn" not in mname:
            continue
        for cname, child in mod.named_children():
            if isinstance(child, nn.Linear) and pat.search(cname):
                cands.append((f"{mname}.{cname}", child))
    if not cands:
        raise ValueError(f"LoRA: no attention Linear matched modules={cfg.modules!r}")
    for name, lin in _select(cands, target, "attention projections"):
        _check_free(lin, name, "lora_A", "lora_B")
        B.make_lora(lin, int(cfg.rank), cfg.alpha)


def _inject_vpt(model, cfg: VPTConfig) -> None:
    if cfg.target is not None:
        raise ValueError("VPT adds prompts at the input (and every block when deep); target= is not supported for vpt")
    _check_free(model, "model", "vpt_prompts")
    depth = len(model.blocks) if cfg.deep else 1
    dim = model.embed_dim
    model.vpt_prompts = nn.Parameter(torch.randn(depth, int(cfg.num_tokens), dim, **_dd(model)) * cfg.init_std)
    model.adapter_enabled = True
    model.norm_pre.register_forward_hook(B.partial(B.vpt_insert, model))
    if cfg.deep:
        for i in range(1, depth):
            model.blocks[i].register_forward_pre_hook(B.partial(B.vpt_replace, model, i))
    model.norm.register_forward_pre_hook(B.partial(B.vpt_remove, model))


def _convnext_blocks(model) -> list:
    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, B.ConvNeXtBlock)]
    for n, m in blocks:
        if type(m) is not B.ConvNeXtBlock:
            raise TypeError(f"{n}: unknown ConvNeXtBlock subclass {type(m).__name__}")
    return blocks


def _inject_eqam(model, cfg: EQAMConfig, target) -> None:
    impl = cfg.impl_for("eqam")
    for name, blk in _select(_convnext_blocks(model), target, "ConvNeXt blocks"):
        _check_free(blk, name, "adapter")
        dim = int(blk.norm.normalized_shape[0])
        ad = EQAM(dim, reduction=int(cfg.reduction), bits=int(cfg.bits), impl=impl).to(**_dd(blk))
        blk.__class__ = B.AdaptedConvNeXtBlock
        blk.adapter = ad
        blk.adapter_enabled = True


def _inject_capm(model, num_prompts: int, target) -> None:
    stages = [(n, m) for n, m in model.named_modules() if isinstance(m, B.ConvNeXtStage)]
    for name, st in _select(stages, target, "ConvNeXt stages"):
        if type(st) is not B.ConvNeXtStage:
            raise TypeError(f"{name}: unknown ConvNeXtStage subclass {type(st).__name__}")
        _check_free(st, name, "capm")
        dim = int(st.blocks[-1].norm.normalized_shape[0]) if len(st.blocks) else None
        if dim is None:  # pragma: no cover
            raise ValueError(f"{name}: empty stage")
        st.__class__ = B.AdaptedConvNeXtStage
        st.capm = CAPM(dim, num_prompts=int(num_prompts), channels_last=False).to(**_dd(st))
        st.adapter_enabled = True


def _mga_dim(block) -> int:
    norm = block.ln_2 if hasattr(block, "ln_2") else block.norm2
    return int(norm.normalized_shape[0])


def _inject_mga_blocks(model, cfg: MGAConfig, target, blocks, text: bool, ctx=None, shares=None) -> list:
    """One MGAdapter (+ block gate) per block; with ``text`` each adapter holds a new BiShareAdapter,
    with ``shares`` (a list per layer) it uses those. Returns the BiShare modules (text) or []."""
    impl = cfg.impl_for("mga")
    made = []
    chosen = _select(blocks, target, "transformer blocks")
    if shares is not None and len(shares) != len(chosen):
        raise ValueError(
            f"share_across_towers needs the same number of adapted layers in both towers, got {len(chosen)} image and {len(shares)} text"
        )
    for i, (name, blk) in enumerate(chosen):
        _check_free(blk, name, "adapter", "adapter_gate")
        dd = _dd(blk)
        share = None
        if text and cfg.bishare:
            share = BiShareAdapter(int(cfg.hidden), int(cfg.heads)).to(**dd)
            made.append(share)
        elif shares is not None:
            share = shares[i]
        ad = MGAdapter(_mga_dim(blk), hidden=int(cfg.hidden), heads=int(cfg.heads), share=share, impl=impl).to(**dd)
        if B.AdaptedClipBlock is not None and type(blk) is B.ClipBlock:
            blk.__class__ = B.AdaptedClipBlock
            blk.adapter_seq_first = not blk.attn.batch_first
        elif type(blk) is B.ViTBlock:
            blk.__class__ = B.AdaptedViTBlock
        else:
            raise TypeError(f"{name}: MGA placement is defined for open_clip ResidualAttentionBlock and timm ViT Block, got {type(blk).__name__}")
        blk.adapter = ad
        blk.adapter_gate = nn.Parameter(torch.tensor(float(cfg.block_gate_init), **dd))
        blk.adapter_kind = "mga"
        blk.adapter_enabled = True
        if ctx is not None:
            blk.adapter_text_ctx = ctx
    return made


def _inject_mga_clip(model, cfg: MGAConfig, target) -> None:
    import open_clip
    from open_clip.transformer import VisionTransformer as ClipViT

    if not isinstance(model.visual, ClipViT):
        raise TypeError(f"MGA on open_clip needs a ViT image tower, got {type(model.visual).__name__}")
    if isinstance(model, open_clip.CustomTextCLIP):
        text_tower = model.text
        tok, tr = getattr(text_tower, "token_embedding", None), getattr(text_tower, "transformer", None)
        pad_id = getattr(text_tower, "pad_id", cfg.pad_id)
        prefix = "text.transformer."
    else:
        tok, tr, pad_id, prefix = model.token_embedding, model.transformer, cfg.pad_id, "transformer."
    if tr is None:
        raise TypeError("MGA on open_clip needs a transformer text tower (model.transformer or model.text.transformer)")

    def blocks(mod, pre):
        out = []
        for i, b in enumerate(mod.resblocks):
            if type(b) is not B.ClipBlock:
                raise TypeError(f"{pre}resblocks.{i}: MGA supports open_clip ResidualAttentionBlock, got {type(b).__name__}")
            out.append((f"{pre}resblocks.{i}", b))
        return out

    shares = None
    if cfg.towers in ("both", "text"):
        ctx = None
        if cfg.text_padding_mask:
            if tok is None:
                raise TypeError("text_padding_mask=True needs a token_embedding in the text tower; pass text_padding_mask=False")
            ctx = B.TextMaskContext()
            tok.register_forward_pre_hook(B.partial(B.set_text_mask, ctx, int(pad_id)))
            tr.register_forward_hook(B.partial(B.clear_text_mask, ctx))
        shares = _inject_mga_blocks(model, cfg, target, blocks(tr, prefix), text=True, ctx=ctx)
    if cfg.towers in ("both", "image"):
        use = shares if (cfg.share_across_towers and cfg.bishare and shares) else None
        _inject_mga_blocks(model, cfg, target, blocks(model.visual.transformer, "visual.transformer."), text=False, shares=use)


def _unfreeze(model, target, pred, what: str) -> None:
    n = 0
    for mname, mod in model.named_modules():
        if target is not None and not target.search(mname):
            continue
        for pn, p in mod.named_parameters(recurse=False):
            if pred(mname, mod, pn):
                p.requires_grad_(True)
                n += 1
    if n == 0:
        raise ValueError(f"no {what} parameters found" + (f" in modules matching target={target.pattern!r}" if target else ""))
