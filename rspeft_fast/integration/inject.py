r"""``inject(model, method, **options)``: a frozen backbone with trainable adapters, in one call.

The supported model families and their methods are one table, :data:`~rspeft_fast.integration.families.FAMILIES`
(the block protocol: where each family's blocks, MLPs and norms are); the methods are one table too,
:data:`INJECTORS` (method name -> injector). SPEC §1 gives the maths and placements; ``SUPPORTED`` maps family
name -> methods.

``target=`` selects where a method applies, with one meaning for every method (HF peft's rule): a string is a
regular expression ``re.fullmatch``ed against module names, a list names modules exactly or by dotted suffix
(``["blocks.1", "attn.qkv"]``). A method adapts each of its units (transformer / ConvNeXt blocks for mufa,
adaptformer, adapter, eqam and mga; stages for capm; attention ``nn.Linear`` for lora; the parameters of
modules for bitfit / layernorm) that is selected or lies inside a selected module: ``target="blocks.1"``
adapts block 1 and not block 10; ``target=r"blocks\.(0|1)\.attn\.qkv"`` gives LoRA on two projections.

Everything that is not an adapter is frozen (``requires_grad=False``) except the classifier head when
the method tunes it (``train_head``; ``linear`` tunes only the head, ``full`` everything). The model is
modified in place and returned; its config is kept as ``model.rspeft_config``, the names of the modules
it adapted as ``model.rspeft_adapted`` (also in :func:`trainable_parameters` and logged at INFO level).
"""
from __future__ import annotations

import contextlib
import logging
import re
import warnings
from typing import Callable, Iterator, NamedTuple, Optional, Sequence, Union

import torch
from torch import nn

from ..modules import CAPM, EQAM, BiShareAdapter, MGAdapter, MuFAAdapter
from . import _blocks
from .config import (
    AdapterConfig,
    EQAMConfig,
    LoRAConfig,
    MGAConfig,
    MuFAConfig,
    config_for,
)
from .families import FAMILIES, WHY_NOT, Family, family_of

__all__ = [
    "inject",
    "trainable_parameters",
    "enable_adapters",
    "adapters_disabled",
    "merge_adapters",
    "model_family",
    "TrainableParams",
    "SUPPORTED",
    "INJECTORS",
    "Target",
]

log = logging.getLogger("rspeft_fast")

SUPPORTED = {f.name: f.methods for f in FAMILIES}
CONFIG_ATTR = "rspeft_config"
MERGED_ATTR = "rspeft_merged"  # the config of adapters merge_adapters folded into the backbone's weights
ADAPTED_ATTR = "rspeft_adapted"
_ADAPTER_MODULES = (MuFAAdapter, EQAM, CAPM, MGAdapter, BiShareAdapter)
_ADAPTER_PARAM_LEAVES = ("lora_A", "lora_B", "adapter_gate", "vpt_prompts")


def model_family(model: nn.Module) -> str:
    """The family name (``"vit" | "swin" | "convnext" | "eva" | "clip" | "hf-vit" | ...``); raises ``TypeError``
    naming the supported families."""
    return family_of(model).name


# --------------------------------------------------------------------------------------------------
# target=


class Target:
    """``target=`` (see the module docstring): ``None`` selects everything; a string is ``re.fullmatch``ed
    against module names; a list/tuple of names matches a module by exact name or dotted suffix."""

    def __init__(self, spec: Union[None, str, Sequence[str]]):
        self.spec = spec
        if spec is None:
            self._match = lambda name: True
        elif isinstance(spec, str):
            rx = re.compile(spec)
            self._match = lambda name: rx.fullmatch(name) is not None
        else:
            names = tuple(str(t) for t in spec)
            self._match = lambda name: any(name == t or name.endswith("." + t) for t in names)

    def matches(self, name: str) -> bool:
        return self._match(name)

    def selects(self, name: str) -> bool:
        """``name`` or one of its ancestors (``a.b`` for ``a.b.c``; the root ``""`` too) matches."""
        if self.spec is None:
            return True
        parts = name.split(".") if name else []
        return any(self._match(".".join(parts[:i])) for i in range(len(parts), -1, -1))

    def select(self, named, what: str) -> list:
        """The ``(name, module)`` pairs of ``named`` that are selected; ``ValueError`` when none is."""
        named = list(named)
        chosen = [(n, m) for n, m in named if self.selects(n)]
        if not chosen:
            sample = ", ".join(n for n, _ in named[:6])
            raise ValueError(
                f"target={self.spec!r} matched none of the {len(named)} {what}"
                + (f" (e.g. {sample})" if sample else "")
                + "; a string is re.fullmatch-ed against module names, a list matches names exactly or by dotted suffix"
            )
        return chosen


# --------------------------------------------------------------------------------------------------
# injector table

Injector = Callable[[nn.Module, Family, AdapterConfig, Target], list]
INJECTORS: "dict[str, Injector]" = {}


def injector(*methods: str):
    """Register ``fn(model, family, cfg, target) -> [adapted module names]`` for ``methods``."""

    def deco(fn):
        for m in methods:
            INJECTORS[m] = fn
        return fn

    return deco


# --------------------------------------------------------------------------------------------------
# public API


def _head(model: nn.Module, fam: Family) -> Optional[nn.Module]:
    if fam.head == "timm":
        h = model.get_classifier()
        return h if isinstance(h, nn.Module) else None
    if fam.head is not None:
        h = getattr(model, fam.head, None)
        return h if isinstance(h, nn.Module) else None
    return None


def inject(model: nn.Module, method: Union[str, AdapterConfig], **options) -> nn.Module:
    """Freeze ``model`` and add the adapters of ``method`` (a name or a config; ``options`` are the
    config's fields). Returns the same (modified) model. See the module docstring for what is supported."""
    cfg = config_for(method, **options)
    if getattr(model, CONFIG_ATTR, None) is not None:
        raise RuntimeError(
            f"model already has adapters injected ({getattr(model, CONFIG_ATTR).to_dict()['method']}); "
            "inject into a fresh model"
        )
    fam = family_of(model)
    name = cfg.to_dict()["method"]
    if name not in fam.methods:
        why = WHY_NOT.get((fam.name, name.split("+")[0]))
        raise ValueError(
            f"method {name!r} is not supported on {fam.label}" + (f" ({why})" if why else "")
            + f"; supported there: {', '.join(fam.methods)}"
        )
    if cfg.num_classes is not None and fam.head != "timm":
        raise ValueError(
            f"num_classes applies to timm classifiers; {fam.label} models get their head from the model class "
            "(open_clip / CLIP: none; HF: the ...ForImageClassification class with config.num_labels)"
        )

    head_classes = None
    if fam.head == "timm":
        if cfg.num_classes is not None and cfg.num_classes != model.num_classes:
            model.reset_classifier(int(cfg.num_classes))
        head_classes = int(model.num_classes)
    head = _head(model, fam)
    if name == "linear" and head is None:
        raise ValueError(f"method 'linear' tunes the classifier head, and this {fam.label} model has none")

    model.requires_grad_(False)
    adapted = list(INJECTORS[name](model, fam, cfg, Target(cfg.target)))

    if head is not None and (cfg.train_head or name == "linear"):
        head.requires_grad_(True)
    if fam.head == "timm":
        cfg = cfg.replace(num_classes=head_classes)
    setattr(model, CONFIG_ATTR, cfg)
    setattr(model, ADAPTED_ATTR, tuple(adapted))
    model.rspeft_trainable = tuple(n for n, p in model.named_parameters() if p.requires_grad)
    shown = ", ".join(adapted[:4]) + (f", ... ({len(adapted)} in all)" if len(adapted) > 4 else "")
    log.info("rspeft_fast.inject %s into %s: adapted %s", name, fam.label, shown or "no module (head only)")
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
    adapted: tuple = ()  # names of the modules ``inject`` adapted (``model.rspeft_adapted``)

    def __str__(self) -> str:
        shown = ", ".join(self.adapted[:4]) + (", ..." if len(self.adapted) > 4 else "")
        return (
            f"trainable params: {self.trainable:,} || backbone params: {self.backbone:,} || "
            f"all params: {self.total:,} || trainable%: {self.percent:.4f} (of backbone), {self.percent_of_total:.4f} (of all)"
            + (f" || adapted {len(self.adapted)} modules: {shown}" if self.adapted else "")
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
    return TrainableParams(trainable, total, backbone, 100.0 * trainable / max(backbone, 1), 100.0 * trainable / max(total, 1),
                           tuple(getattr(model, ADAPTED_ATTR, ()) or ()))


def _switchable(model: nn.Module) -> Iterator[nn.Module]:
    for m in model.modules():
        if "adapter_enabled" in m.__dict__:
            yield m


def injected_config(model: nn.Module, what: str, after_merge: str) -> AdapterConfig:
    """The :class:`AdapterConfig` ``inject`` recorded on ``model``, else a RuntimeError starting ``what:``.
    If :func:`merge_adapters` folded the adapters into the weights, the error is ``after_merge`` (formatted with
    the merged ``method``: what happened and what to do instead)."""
    cfg = getattr(model, CONFIG_ATTR, None)
    if cfg is not None:
        return cfg
    merged = getattr(model, MERGED_ATTR, None)
    if merged is not None:
        raise RuntimeError(f"{what}: " + after_merge.format(method=merged.to_dict()["method"]))
    raise RuntimeError(f"{what}: the model has no injected adapters (call rspeft_fast.inject first)")


def enable_adapters(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch every injected adapter on or off (off: the forward is exactly the bare backbone's).

    Methods that train the backbone's own tensors (bitfit, layernorm, linear, full) have nothing to
    switch off; a warning says so."""
    cfg = injected_config(
        model, "enable_adapters",
        "the {method!r} adapters were merged into the backbone's weights (merge_adapters): there is nothing left to "
        "switch off. Switch adapters off on an unmerged model (merge a copy: copy.deepcopy(model)), or reload the "
        "backbone and load_adapters again")
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
    method = cfg.to_dict()["method"]
    if method == "lora":
        for m in list(model.modules()):
            if isinstance(m, _blocks.LoRALinear):
                _blocks.merge_lora(m)
        setattr(model, CONFIG_ATTR, None)
        setattr(model, MERGED_ATTR, cfg)
        return model
    if method == "bitfit":
        return model
    raise NotImplementedError(
        f"merge_adapters: method {method!r} is not linear, so it cannot be folded into the "
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


def _blocks_of(model: nn.Module, fam: Family) -> list:
    """The ``(name, block)`` pairs of the family's block classes; a subclass the family does not declare is
    refused (its forward may differ)."""
    want = fam.block_classes()
    if not want:
        raise TypeError(f"{fam.label}: no block classes declared (or the library that defines them is missing)")
    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, want)]
    for n, m in blocks:
        if type(m) not in want:
            raise TypeError(
                f"{n}: block class {type(m).__name__} is a subclass of {', '.join(c.__name__ for c in want)} that "
                "rspeft_fast does not know; its forward may differ, so no adapter was injected"
            )
    if not blocks:
        raise TypeError(f"no {', '.join(c.__name__ for c in want)} blocks found in the model")
    return blocks


def _attach(fam: Family, name: str, blk: nn.Module, adapter: nn.Module, kind: str, gate=None, ctx=None) -> str:
    """Put ``adapter`` on block ``blk`` by the family's protocol; returns the name of the adapted module."""
    holder = blk  # the adapter, its gate and switches live on the block in both cases
    _check_free(blk, name, "adapter", "adapter_gate")
    if fam.swap_block:
        swapped = _blocks.ADAPTED_BLOCKS.get(type(blk))
        if swapped is None:
            raise TypeError(f"{name}: no adapted forward for {type(blk).__name__}")
        blk.__class__ = swapped
        if _blocks.ClipBlock is not None and swapped is _blocks.AdaptedClipBlock:
            blk.adapter_seq_first = not blk.attn.batch_first
    else:
        _blocks.wrap_mlp(getattr(blk, fam.mlp), blk)
    holder.adapter = adapter
    holder.adapter_kind = kind
    if gate is not None:
        holder.adapter_gate = gate
    if ctx is not None:
        holder.adapter_text_ctx = ctx
    holder.adapter_enabled = True
    return name


# --------------------------------------------------------------------------------------------------
# injectors (one per method; registered in INJECTORS)


@injector("mufa", "adaptformer", "adapter")
def _inject_bottleneck(model, fam: Family, cfg: MuFAConfig, target: Target) -> list:
    impl = cfg.impl_for("mufa")
    out = []
    for name, blk in target.select(_blocks_of(model, fam), "transformer blocks"):
        ad = MuFAAdapter(fam.block_dim(blk), rates=cfg.rates, scale=cfg.scale, impl=impl).to(**_dd(blk))
        out.append(_attach(fam, name, blk, ad, cfg.placement))
    return out


_LORA_DEFAULT = LoRAConfig.__dataclass_fields__["modules"].default


@injector("lora")
def _inject_lora(model, fam: Family, cfg: LoRAConfig, target: Target) -> list:
    # the config's default (`^qkv$`) means "the family's q/k/v projections" (fused qkv in timm, query/key/value in HF)
    pat = re.compile(fam.attn_linears if cfg.modules == _LORA_DEFAULT else cfg.modules)
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
        _check_free(lin, name, "lora_A", "lora_B")
        parent = model.get_submodule(name.rpartition(".")[0])
        if getattr(parent, "q_bias", None) is not None and hasattr(parent, "qkv_bias_separate"):
            # timm EvaAttention with q/k/v biases (EVA-02) runs F.linear(x, qkv.weight, bias) and never calls the
            # qkv module; its own switch makes it call qkv(x) and add the biases after (same maths, last-bit rounding)
            parent.qkv_bias_separate = True
        _blocks.make_lora(lin, int(cfg.rank), cfg.alpha)
        out.append(name)
    return out


@injector("vpt")
def _inject_vpt(model, fam: Family, cfg, target: Target) -> list:
    if cfg.target is not None:
        raise ValueError("VPT adds prompts at the input (and every block when deep); target= is not supported for vpt")
    _check_free(model, "model", "vpt_prompts")
    depth = len(model.blocks) if cfg.deep else 1
    dim = model.embed_dim
    model.vpt_prompts = nn.Parameter(torch.randn(depth, int(cfg.num_tokens), dim, **_dd(model)) * cfg.init_std)
    model.adapter_enabled = True
    model.norm_pre.register_forward_hook(_blocks.partial(_blocks.vpt_insert, model))
    if cfg.deep:
        for i in range(1, depth):
            model.blocks[i].register_forward_pre_hook(_blocks.partial(_blocks.vpt_replace, model, i))
    model.norm.register_forward_pre_hook(_blocks.partial(_blocks.vpt_remove, model))
    return ["vpt_prompts"]


def _eqam_kwargs(cfg: EQAMConfig) -> dict:
    """The EQAM constructor arguments the config holds (``hidden`` / ``reduction`` / ``bits``, whichever both
    sides define and the config sets)."""
    import inspect

    accepted = inspect.signature(EQAM.__init__).parameters
    kw = {}
    for k in ("hidden", "reduction", "bits"):
        v = getattr(cfg, k, None)
        if k in accepted and v is not None:
            kw[k] = int(v)
    return kw


@injector("eqam", "eqam+capm")
def _inject_eqam(model, fam: Family, cfg: EQAMConfig, target: Target) -> list:
    impl = cfg.impl_for("eqam")
    out = []
    for name, blk in target.select(_blocks_of(model, fam), "ConvNeXt blocks"):
        ad = EQAM(fam.block_dim(blk), **_eqam_kwargs(cfg), impl=impl).to(**_dd(blk))
        out.append(_attach(fam, name, blk, ad, "eqam"))
    if cfg.with_capm:
        out += _inject_capm(model, fam, cfg, target)
    return out


@injector("capm")
def _inject_capm(model, fam: Family, cfg, target: Target) -> list:
    stages = [(n, m) for n, m in model.named_modules() if isinstance(m, _blocks.ConvNeXtStage)]
    out = []
    for name, st in target.select(stages, "ConvNeXt stages"):
        if type(st) is not _blocks.ConvNeXtStage:
            raise TypeError(f"{name}: unknown ConvNeXtStage subclass {type(st).__name__}")
        _check_free(st, name, "capm")
        if not len(st.blocks):  # pragma: no cover
            raise ValueError(f"{name}: empty stage")
        dim = int(st.blocks[-1].norm.normalized_shape[0])
        st.__class__ = _blocks.AdaptedConvNeXtStage
        st.capm = CAPM(dim, num_prompts=int(cfg.num_prompts), channels_last=False).to(**_dd(st))
        st.adapter_enabled = True
        out.append(name)
    return out


def _inject_mga_blocks(fam: Family, cfg: MGAConfig, target: Target, blocks, text: bool, ctx=None, shares=None):
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
        dd = _dd(blk)
        share = None
        if text and cfg.bishare:
            share = BiShareAdapter(int(cfg.hidden), int(cfg.heads)).to(**dd)
            made.append(share)
        elif shares is not None:
            share = shares[i]
        ad = MGAdapter(fam.block_dim(blk), hidden=int(cfg.hidden), heads=int(cfg.heads), share=share, impl=impl).to(**dd)
        gate = nn.Parameter(torch.tensor(float(cfg.block_gate_init), **dd))
        names.append(_attach(fam, name, blk, ad, "mga", gate=gate, ctx=ctx))
    return names, made


@injector("mga")
def _inject_mga(model, fam: Family, cfg: MGAConfig, target: Target) -> list:
    if fam.name == "clip":
        return _inject_mga_open_clip(model, fam, cfg, target)
    if fam.name == "hf-clip":
        return _inject_mga_hf_clip(model, fam, cfg, target)
    return _inject_mga_blocks(fam, cfg, target, _blocks_of(model, fam), text=False)[0]


def _towers(cfg: MGAConfig, target: Target, fam_text: Family, text_blocks, fam_img: Family, img_blocks, ctx) -> list:
    names, shares = [], None
    if cfg.towers in ("both", "text"):
        n, shares = _inject_mga_blocks(fam_text, cfg, target, text_blocks, text=True, ctx=ctx)
        names += n
    if cfg.towers in ("both", "image"):
        use = shares if (cfg.share_across_towers and cfg.bishare and shares) else None
        names += _inject_mga_blocks(fam_img, cfg, target, img_blocks, text=False, shares=use)[0]
    return names


def _exact_blocks(seq, prefix: str, allowed: tuple) -> list:
    out = []
    for i, b in enumerate(seq):
        if type(b) not in allowed:
            raise TypeError(f"{prefix}{i}: MGA supports {', '.join(c.__name__ for c in allowed)}, got {type(b).__name__}")
        out.append((f"{prefix}{i}", b))
    return out


def _inject_mga_open_clip(model, fam: Family, cfg: MGAConfig, target: Target) -> list:
    import open_clip
    from open_clip.transformer import VisionTransformer as ClipViT

    # image tower: open_clip's ViT, or a timm ViT trunk (SigLIP / SigLIP2 and other timm towers)
    trunk = getattr(model.visual, "trunk", None)  # open_clip's TimmModel tower
    img_fam = fam
    if isinstance(model.visual, ClipViT):
        img_blocks = _exact_blocks(model.visual.transformer.resblocks, "visual.transformer.resblocks.", (_blocks.ClipBlock,))
    elif trunk is not None and model_family_or_none(trunk) in ("vit", "eva"):
        img_fam = family_of(trunk)  # the timm tower's own protocol (SigLIP / SigLIP2: timm ViT)
        img_blocks = [(f"visual.trunk.{n}", b) for n, b in _blocks_of(trunk, img_fam)]
    else:
        raise TypeError(f"MGA on open_clip needs a ViT image tower (open_clip or timm ViT / Eva), got {type(model.visual).__name__}")
    if isinstance(model, open_clip.CustomTextCLIP):
        text_tower = model.text
        tok, tr = getattr(text_tower, "token_embedding", None), getattr(text_tower, "transformer", None)
        pad_id = getattr(text_tower, "pad_id", cfg.pad_id)
        prefix = "text.transformer."
    else:
        tok, tr, pad_id, prefix = model.token_embedding, model.transformer, cfg.pad_id, "transformer."
    if tr is None and cfg.towers != "image":
        raise TypeError("MGA on open_clip needs a transformer text tower (model.transformer or model.text.transformer)")
    ctx = None
    if cfg.towers in ("both", "text") and cfg.text_padding_mask:
        if tok is None:
            raise TypeError("text_padding_mask=True needs a token_embedding in the text tower; pass text_padding_mask=False")
        ctx = _blocks.TextMaskContext()
        tok.register_forward_pre_hook(_blocks.partial(_blocks.set_text_mask, ctx, int(pad_id if pad_id is not None else cfg.pad_id)))
        tr.register_forward_hook(_blocks.partial(_blocks.clear_text_mask, ctx))
    text_blocks = _exact_blocks(tr.resblocks, f"{prefix}resblocks.", (_blocks.ClipBlock,)) if tr is not None else []
    return _towers(cfg, target, fam, text_blocks, img_fam, img_blocks, ctx)


def model_family_or_none(model: nn.Module) -> Optional[str]:
    try:
        return family_of(model).name
    except TypeError:
        return None


def _inject_mga_hf_clip(model, fam: Family, cfg: MGAConfig, target: Target) -> list:
    allowed = fam.block_classes()
    text_blocks, img_blocks = [], []
    text_model = getattr(model, "text_model", None)
    vision_model = getattr(model, "vision_model", None)
    if text_model is not None:
        text_blocks = _exact_blocks(text_model.encoder.layers, "text_model.encoder.layers.", allowed)
    if vision_model is not None:
        img_blocks = _exact_blocks(vision_model.encoder.layers, "vision_model.encoder.layers.", allowed)
    ctx = None
    if text_model is not None and cfg.towers in ("both", "text") and cfg.text_padding_mask:
        ctx = _blocks.TextMaskContext()
        for _, layer in text_blocks:  # each layer derives the mask from its own attention_mask (checkpoint-safe)
            layer.register_forward_pre_hook(_blocks.partial(_blocks.hf_layer_text_mask, ctx), with_kwargs=True)
    return _towers(cfg, target, fam, text_blocks, fam, img_blocks, ctx)


@injector("bitfit")
def _inject_bitfit(model, fam: Family, cfg, target: Target) -> list:
    return _unfreeze(model, target, lambda mn, m, pn: pn == "bias" or pn.endswith("_bias"), "bias")


@injector("layernorm")
def _inject_layernorm(model, fam: Family, cfg, target: Target) -> list:
    return _unfreeze(
        model, target,
        lambda mn, m, pn: isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)) or "norm" in type(m).__name__.lower(),
        "normalisation",
    )


@injector("full")
def _inject_full(model, fam: Family, cfg, target: Target) -> list:
    if cfg.target is None:
        model.requires_grad_(True)
        return [""]
    chosen = [n for n, m in target.select(model.named_modules(), "modules") if target.matches(n)]
    for n in chosen:
        model.get_submodule(n).requires_grad_(True)
    return chosen


@injector("linear")
def _inject_linear(model, fam: Family, cfg, target: Target) -> list:
    return []


def _unfreeze(model, target: Target, pred, what: str) -> list:
    n, names = 0, []
    for mname, mod in model.named_modules():
        if not target.selects(mname):
            continue
        hit = False
        for pn, p in mod.named_parameters(recurse=False):
            if pred(mname, mod, pn):
                p.requires_grad_(True)
                n += 1
                hit = True
        if hit:
            names.append(mname)
    if n == 0:
        raise ValueError(f"no {what} parameters found" + (f" in modules selected by target={target.spec!r}" if target.spec is not None else ""))
    return names
