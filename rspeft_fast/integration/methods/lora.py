"""LoRA on any linear map: ``W x + scaling * B A drop(x)`` (``B`` zero-init); mergeable, unmergeable.

Where (HF peft's rule, plus the attention default): a ``target=`` that names an ``nn.Linear`` or a 1×1 ``nn.Conv2d``
itself (``fc1``, ``mlp.fc2``, ``head``, ``q_proj``, a ResNet's ``conv1`` / ``conv3``, a regex such as
``r".*mlp\\.fc1"``) adapts it (on ConvNeXt and ResNet, which have no attention, ``target=`` is required); a
target that names a container (a block, ``blocks.1``) or none adapts the attention projections inside it that ``modules`` selects (the
family's q/k/v projections by default). ``nn.MultiheadAttention`` (open_clip's towers) has no Linear for its packed
q/k/v projection: its pseudo-children are ``in_proj`` (the default) and ``out_proj``; there the update runs as the
weights ``W + scaling B A`` (:class:`~.._blocks.LoRAMultiheadAttention`, as peft's MHA LoRA: no dropout).
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from .. import _blocks
from ..config import AdapterConfig, OptionError
from ..registry import register
from ._common import check_free


@dataclass
class LoRAConfig(AdapterConfig):
    """LoRA: ``W x + scaling * B A dropout(x)`` with ``B`` zero-init, ``scaling = alpha / rank``.

    HF peft's option names are accepted too (``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora``,
    ``init_lora_weights``, ``target_modules`` = ``target``), so a peft ``LoraConfig`` recipe transfers.

    * ``rank`` (peft ``r``): the rank of ``B A``.
    * ``alpha`` (``lora_alpha``): ``scaling = alpha / rank`` (``alpha / sqrt(rank)`` with ``rslora``).
    * ``dropout`` (``lora_dropout``): dropout on the LoRA branch's input (training only; not on
      ``nn.MultiheadAttention``, whose update runs as weights).
    * ``rslora`` (``use_rslora``): rank-stabilised scaling.
    * ``init`` (``init_lora_weights``): ``"kaiming"`` (peft's default, ``True``: A as nn.Linear's init) or
      ``"gaussian"`` (A ~ N(0, 1/rank)); ``B`` is zero either way, so the adapted model starts as the backbone.
    * ``bias``: ``"none"``; ``"lora_only"`` (the biases of the adapted layers train); ``"all"`` (every parameter
      whose name contains ``bias``, peft's rule). Trained biases are the backbone's: unloading keeps their values.
    * ``modules``: regex ``search``ed over the child names of an attention module, for the attention projections
      adapted when ``target`` names no Linear (default ``^qkv$``: the family's q/k/v projections, the fused
      ``qkv`` in timm, ``q_proj`` / ``k_proj`` / ``v_proj`` in HF, ``in_proj`` of an ``nn.MultiheadAttention``).
    """

    method: ClassVar[str] = "lora"
    aliases: ClassVar[dict] = {"r": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout", "use_rslora": "rslora",
                               "init_lora_weights": "init", "target_modules": "target"}
    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    rslora: bool = False
    init: str = "kaiming"
    bias: str = "none"
    modules: str = r"^qkv$"

    def validate(self) -> None:
        if self.init is True:  # peft's init_lora_weights=True
            self.init = "kaiming"
        super().validate()
        if int(self.rank) <= 0:
            raise OptionError(f"rank must be positive, got {self.rank}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise OptionError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.init not in _blocks.LORA_INITS:
            raise OptionError(f"init={self.init!r} is not one of {_blocks.LORA_INITS} (peft: init_lora_weights=True "
                              "is 'kaiming')")
        if self.bias not in _BIAS:
            raise OptionError(f"bias={self.bias!r} is not one of {_BIAS}")
        try:
            re.compile(self.modules)
        except re.error as e:
            raise OptionError(f"modules={self.modules!r} is not a valid regular expression: {e}") from None


_BIAS = ("none", "lora_only", "all")
_LORA_CLASSES = (_blocks.LoRALinear, _blocks.LoRAConv1x1, _blocks.LoRAMultiheadAttention)
_DEFAULT_MODULES = LoRAConfig.__dataclass_fields__["modules"].default
_MHA_DEFAULT = r"^in_proj$"
_MHA_PARTS = ("in_proj", "out_proj")  # the pseudo-children of nn.MultiheadAttention


def merge(model: nn.Module, keep: bool = False) -> None:
    """``W += scaling * B A`` in every LoRA layer; the factors are removed unless ``keep`` (then
    :func:`unmerge` restores the pre-merge weights exactly)."""
    for m in list(model.modules()):
        if isinstance(m, _LORA_CLASSES):
            _blocks.merge_lora(m, keep=keep)


def unmerge(model: nn.Module) -> None:
    for m in list(model.modules()):
        if isinstance(m, _LORA_CLASSES):
            _blocks.unmerge_lora(m)


def _lora_modules(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, _LORA_CLASSES)]


def stash(model: nn.Module, name: str) -> None:
    for m in _lora_modules(model):
        _blocks.stash_lora(m, name)


def unstash(model: nn.Module, name: str) -> None:
    for m in _lora_modules(model):
        _blocks.unstash_lora(m, name)


def drop(model: nn.Module, name: str) -> None:
    """Delete the stashed adapter ``name``; a layer left with no adapter at all gets its plain class back."""
    for m in _lora_modules(model):
        m.__dict__.get("lora_stash", {}).pop(name, None)

    def empty(m):
        return "lora_A" not in m._parameters and not m.__dict__.get("lora_stash")

    outs = {id(m.out_proj) for m in model.modules() if isinstance(m, _blocks.LoRAMultiheadAttention)}
    for m in _lora_modules(model):
        if isinstance(m, _blocks.LoRAMultiheadAttention):
            if empty(m) and (not isinstance(m.out_proj, _blocks.LoRALinear) or empty(m.out_proj)):
                _blocks.strip_lora(m)
        elif id(m) not in outs and empty(m):
            _blocks.strip_lora(m)


def _candidates(model, fam, cfg, target) -> list:
    """``[(name, module, parts)]``: the Linears / MHAs to adapt (``parts``: the MHA projections, else ``None``)."""
    mha_of = {id(m.out_proj): n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    default = cfg.modules == _DEFAULT_MODULES
    pat = re.compile(fam.attn_linears if default else cfg.modules)
    mha_pat = re.compile(_MHA_DEFAULT if default else cfg.modules)
    attn = re.compile(fam.attn)
    chosen: dict = {}  # name -> (module, set of MHA parts or None)

    def add(name, mod, part=None):
        if part is None:
            chosen.setdefault(name, (mod, None))
        else:
            chosen.setdefault(name, (mod, set()))[1].add(part)

    for mname, mod in model.named_modules():
        if target.spec is not None and target.matches(mname) and isinstance(mod, nn.Conv2d):
            add(mname, mod)  # make_lora_conv refuses what is not a 1x1 conv, naming it
            continue
        if target.spec is not None and target.matches(mname) and isinstance(mod, nn.Linear):
            if id(mod) in mha_of:  # MHA's out_proj: its forward never runs, the MHA adds the update
                p = mha_of[id(mod)]
                add(p, model.get_submodule(p), "out_proj")
            else:
                add(mname, mod)
            continue
        if isinstance(mod, nn.MultiheadAttention):
            for part in _MHA_PARTS:  # "attn.out_proj" names the part; "attn", a block or None selects by modules=
                if target.spec is not None and target.matches(f"{mname}.{part}"):
                    add(mname, mod, part)
                elif (mod._qkv_same_embed_dim and target.selects(mname) and (attn.search(mname) or target.spec is not None)
                      and mha_pat.search(part)):
                    add(mname, mod, part)
            continue
        if not target.selects(mname):
            continue
        if attn.search(mname):
            for cname, child in mod.named_children():
                if isinstance(child, nn.Linear) and pat.search(cname):
                    add(f"{mname}.{cname}", child)
    return [(n, m, parts) for n, (m, parts) in chosen.items() if parts is None or parts]


@register("lora", LoRAConfig, ("vit", "swin", "eva", "clip", "hf-vit", "hf-dinov2", "hf-dinov3", "hf-swin", "hf-clip",
                                "convnext", "resnet"),
          merge=merge, unmerge=unmerge, named={"stash": stash, "unstash": unstash, "drop": drop},
          why_not={"tv-swin": "torchvision's window attention reads qkv.weight directly (F.linear), so a LoRA Linear "
                              "would never run; use timm swin* or HF Swin for LoRA"})
def inject_lora(model, fam, cfg: LoRAConfig, target) -> list:
    cands = _candidates(model, fam, cfg, target)
    if not cands:
        if target.spec is None and fam.name in ("convnext", "resnet"):
            raise ValueError(f"LoRA on {fam.label}: there is no attention; name the layers with target= (Linears, 1x1 "
                             r"convolutions), e.g. target_modules=['fc1', 'fc2'] or r'layer\d\.\d\.conv[13]'")
        if target.spec is None:
            raise ValueError(f"LoRA: no attention Linear of {fam.label} matched modules={cfg.modules!r}")
        raise ValueError(f"LoRA: target={target.spec!r} names no nn.Linear / nn.MultiheadAttention of {fam.label} "
                         f"and selects no attention projection matching modules={cfg.modules!r}; a string is "
                         "re.fullmatch-ed against module names, a list matches names exactly or by dotted suffix")
    rank, alpha = int(cfg.rank), cfg.alpha
    out = []
    for name, mod, parts in cands:
        if parts is not None:
            check_free(mod, name, "lora_A", "lora_B")
            if cfg.dropout > 0:
                warnings.warn(f"LoRA: {name} is an nn.MultiheadAttention, whose update runs as weights: "
                              f"dropout={cfg.dropout} does not apply there (as in HF peft)", stacklevel=3)
            _blocks.make_lora_mha(mod, "in_proj" in parts, "out_proj" in parts, rank, alpha, rslora=cfg.rslora,
                                  init=cfg.init)
            out += [f"{name}.{p}" for p in _MHA_PARTS if p in parts]
            biases = ([mod.in_proj_bias] if "in_proj" in parts else []) + (
                [mod.out_proj.bias] if "out_proj" in parts else [])
        else:
            check_free(mod, name, "lora_A", "lora_B")
            parent = model.get_submodule(name.rpartition(".")[0])
            if getattr(parent, "q_bias", None) is not None and hasattr(parent, "qkv_bias_separate"):
                # timm EvaAttention with q/k/v biases (EVA-02) runs F.linear(x, qkv.weight, bias) and never calls the
                # qkv module; its own switch makes it call qkv(x) and add the biases after (same maths, last-bit
                # rounding)
                parent.qkv_bias_separate = True
            make = _blocks.make_lora_conv if isinstance(mod, nn.Conv2d) else _blocks.make_lora
            make(mod, rank, alpha, dropout=cfg.dropout, rslora=cfg.rslora, init=cfg.init)
            out.append(name)
            biases = [mod.bias]
        if cfg.bias == "lora_only":
            for b in biases:
                if b is not None:
                    b.requires_grad_(True)
    if cfg.bias == "all":
        for pn, p in model.named_parameters():
            if "bias" in pn and "lora_" not in pn:
                p.requires_grad_(True)
    return out
