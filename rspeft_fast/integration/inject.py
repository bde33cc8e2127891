r"""``inject(model, method, **options)``: a frozen backbone with trainable adapters, in one call.

The supported model families are one table, :data:`~rspeft_fast.integration.families.FAMILIES` (the block
protocol: where each family's blocks, MLPs and norms are); the methods are one table too,
:data:`~rspeft_fast.integration.registry.REGISTRY` (method name -> config class, injector, families), filled by the
files of :mod:`rspeft_fast.integration.methods`. SPEC §1 gives the maths and placements; ``SUPPORTED`` maps family
name -> methods.

``target=`` selects where a method applies, with one meaning for every method (HF peft's rule): a string is a
regular expression ``re.fullmatch``ed against module names, a list names modules exactly or by dotted suffix
(``["blocks.1", "attn.qkv"]``). A method adapts each of its units (transformer / ConvNeXt blocks for mufa,
adaptformer, adapter, eqam and mga; stages for capm; attention projections for lora, which also adapts any
``nn.Linear`` the target names itself, peft's ``target_modules``; the parameters of modules for bitfit /
layernorm) that is selected or lies inside a selected module: ``target="blocks.1"`` adapts block 1 and not block
10; ``target=r"blocks\.(0|1)\.attn\.qkv"`` gives LoRA on two projections, ``target=["qkv", "fc1", "fc2"]`` LoRA on
every block's qkv and MLP.

Everything that is not an adapter is frozen (``requires_grad=False``) except the classifier head when
the method tunes it (``train_head``; ``linear`` tunes only the head, ``full`` everything). A frozen BatchNorm
stays frozen in training: its class is swapped for a subclass whose ``train()`` keeps it in eval mode while none
of its parameters requires grad (timm's ``freeze_batch_norm_2d`` idea, re-applied at every ``model.train()``,
under DDP too), so its running statistics never move; a BatchNorm the method tunes (``layernorm``, ``bitfit``,
``full``, or one unfrozen by hand before ``model.train()``) trains as usual. The model is
modified in place and returned; its config is kept as ``model.rspeft_config``, the names of the modules
it adapted as ``model.rspeft_adapted`` (also in :func:`trainable_parameters` and logged at INFO level).

The ways back (HF peft's): :func:`unload_adapters` (the backbone as it was before ``inject``: classes, hooks,
attributes, ``requires_grad``), :func:`merge_adapters` ``(keep=True)`` / :func:`unmerge_adapters`,
:func:`merge_and_unload`. Named adapters (LoRA): ``inject(..., adapter_name=)``, :func:`set_adapter`,
:func:`delete_adapter`, :func:`adapter_names`.
"""
from __future__ import annotations

import contextlib
import logging
import re
import warnings
from typing import Iterator, NamedTuple, Optional, Sequence, Union

from torch import nn

from . import _blocks, methods  # noqa: F401  (methods: importing it fills the registry)
from .config import AdapterConfig, config_for
from .families import FAMILIES, Family, family_of, why_not
from .registry import REGISTRY

__all__ = [
    "inject",
    "trainable_parameters",
    "enable_adapters",
    "adapters_disabled",
    "merge_adapters",
    "unmerge_adapters",
    "unload_adapters",
    "merge_and_unload",
    "set_adapter",
    "delete_adapter",
    "adapter_names",
    "model_family",
    "TrainableParams",
    "SUPPORTED",
    "Target",
]

log = logging.getLogger("rspeft_fast")

SUPPORTED = {f.name: f.methods for f in FAMILIES}
CONFIG_ATTR = "rspeft_config"
MERGED_ATTR = "rspeft_merged"  # the config of adapters merge_adapters folded into the backbone's weights
ADAPTED_ATTR = "rspeft_adapted"
ADDED_ATTR = "rspeft_added"  # names of the parameters the injector added (adapters, LoRA factors, gates, prompts)
NAMED_ATTR = "rspeft_adapters"  # {adapter name: its record}; the active one is rspeft_active
ORIGINAL_ATTR = "rspeft_original"  # what inject changes, recorded before it does (unload_adapters puts it back)


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
# public API


def _head(model: nn.Module, fam: Family) -> Optional[nn.Module]:
    if fam.head == "timm":
        h = model.get_classifier()
        return h if isinstance(h, nn.Module) else None
    if fam.head is not None:
        h = getattr(model, fam.head, None)
        return h if isinstance(h, nn.Module) else None
    return None


def inject(model: nn.Module, method: Union[str, AdapterConfig], *, adapter_name: Optional[str] = None,
           **options) -> nn.Module:
    """Freeze ``model`` and add the adapters of ``method`` (a name or a config; ``options`` are the
    config's fields). Returns the same (modified) model. See the module docstring for what is supported.

    ``adapter_name`` (HF peft's): name this adapter (default ``"default"``); on a model that has adapters, a new name
    adds a second one beside them (LoRA: each its own ``target`` / rank / ...) and makes it the active one: the
    others are put aside, :func:`set_adapter` switches, one adapter runs at a time."""
    cfg = config_for(method, **options)
    name = cfg.to_dict()["method"]
    spec = REGISTRY[name]
    current = getattr(model, CONFIG_ATTR, None)
    if current is not None:
        if adapter_name is None:
            raise RuntimeError(
                f"model already has adapters injected ({current.to_dict()['method']}); inject into a fresh model, or "
                "pass adapter_name= to add a named adapter beside them (LoRA)")
        return _add_named(model, cfg, str(adapter_name))
    fam = family_of(model)
    if name not in fam.methods:
        why = why_not(fam.name, name)
        raise ValueError(
            f"method {name!r} is not supported on {fam.label}" + (f" ({why})" if why else "")
            + f"; supported there: {', '.join(fam.methods)}"
        )
    if cfg.num_classes is not None and fam.head != "timm":
        raise ValueError(
            f"num_classes applies to timm classifiers; {fam.label} models get their head from the model class "
            "(open_clip / CLIP: none; HF: the ...ForImageClassification class with config.num_labels)"
        )

    original = _snapshot(model)
    head_classes = None
    if fam.head == "timm":
        if cfg.num_classes is not None and cfg.num_classes != model.num_classes:
            model.reset_classifier(int(cfg.num_classes))
        head_classes = int(model.num_classes)
    head = _head(model, fam)
    if name == "linear" and head is None:
        raise ValueError(f"method 'linear' tunes the classifier head, and this {fam.label} model has none")

    if spec.resolve is not None:
        cfg = spec.resolve(model, fam, cfg)
    model.requires_grad_(False)
    before = {n for n, _ in model.named_parameters()}
    adapted = list(spec.inject(model, fam, cfg, Target(cfg.target)))
    setattr(model, ADDED_ATTR, tuple(n for n, _ in model.named_parameters() if n not in before))

    if head is not None and (cfg.train_head or name == "linear"):
        head.requires_grad_(True)
    if fam.head == "timm":
        cfg = cfg.replace(num_classes=head_classes)
    setattr(model, CONFIG_ATTR, cfg)
    _keep_changed_scalars(model, original)
    setattr(model, ORIGINAL_ATTR, original)
    setattr(model, ADAPTED_ATTR, tuple(adapted))
    model.rspeft_trainable = tuple(n for n, p in model.named_parameters() if p.requires_grad)
    setattr(model, NAMED_ATTR, {})
    _record(model, "default" if adapter_name is None else str(adapter_name))
    _blocks.keep_frozen_batchnorm_in_eval(model, stats_train_without_params=(name == "full"))
    shown = ", ".join(adapted[:4]) + (f", ... ({len(adapted)} in all)" if len(adapted) > 4 else "")
    log.info("rspeft_fast.inject %s into %s: adapted %s", name, fam.label, shown or "no module (head only)")
    return model


# --------------------------------------------------------------------------------------------------
# named adapters


def _record(model: nn.Module, name: str) -> None:
    """Record the active adapter's config, adapted modules and trainable parameters under ``name``."""
    getattr(model, NAMED_ATTR)[name] = (getattr(model, CONFIG_ATTR), getattr(model, ADAPTED_ATTR),
                                        tuple(model.rspeft_trainable))
    model.rspeft_active = name


def _named_ops(model: nn.Module, what: str) -> dict:
    cfg = injected_config(model, what, "the {method!r} adapters were merged into the weights; named adapters need "
                                       "unmerged ones")
    spec = REGISTRY[cfg.to_dict()["method"]]
    if spec.named is None:
        named = ", ".join(m.name for m in REGISTRY.values() if m.named is not None)
        raise NotImplementedError(f"{what}: method {spec.name!r} has one adapter per model (named adapters: {named})")
    return spec.named


def adapter_names(model: nn.Module) -> tuple:
    """The names of the model's adapters (``"default"`` for an unnamed ``inject``), the active one first."""
    named = getattr(model, NAMED_ATTR, None) or {}
    active = getattr(model, "rspeft_active", None)
    return tuple(sorted(named, key=lambda n: (n != active, n)))


def _add_named(model: nn.Module, cfg: AdapterConfig, name: str) -> nn.Module:
    ops = _named_ops(model, "inject(adapter_name=...)")
    current = getattr(model, CONFIG_ATTR)
    if cfg.to_dict()["method"] != current.to_dict()["method"]:
        raise NotImplementedError(f"inject(adapter_name={name!r}): the model's adapters are "
                                  f"{current.to_dict()['method']}; a named adapter of another method is not supported")
    if name in getattr(model, NAMED_ATTR):
        raise ValueError(f"inject: the model already has an adapter named {name!r} (delete_adapter first)")
    fam = family_of(model)
    if cfg.num_classes is not None and cfg.num_classes != current.num_classes:
        raise ValueError("inject(adapter_name=...): named adapters share the model's classifier head; num_classes "
                         f"must stay {current.num_classes}")
    active = model.rspeft_active
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ops["stash"](model, active)
    original = {n for n in getattr(model, ORIGINAL_ATTR)["grad"]}
    model.requires_grad_(False)
    spec = REGISTRY[cfg.to_dict()["method"]]
    try:
        adapted = list(spec.inject(model, fam, cfg, Target(cfg.target)))
    except BaseException:  # the model as it was: what was added removed, the active adapter back
        ops["stash"](model, "\0failed")
        ops["drop"](model, "\0failed")
        ops["unstash"](model, active)
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, False))
        raise
    head = _head(model, fam)
    if head is not None and cfg.train_head:
        head.requires_grad_(True)
    setattr(model, ADDED_ATTR, tuple(n for n, _ in model.named_parameters() if n not in original))
    setattr(model, CONFIG_ATTR, cfg.replace(num_classes=current.num_classes))
    setattr(model, ADAPTED_ATTR, tuple(adapted))
    model.rspeft_trainable = tuple(n for n, p in model.named_parameters() if p.requires_grad)
    _record(model, name)
    return model


def set_adapter(model: nn.Module, name: str) -> nn.Module:
    """Make the named adapter the one that runs (and trains: only its parameters, and the head where its config
    trains it, require grad; build the optimiser after switching). The others are put aside."""
    ops = _named_ops(model, "set_adapter")
    named = getattr(model, NAMED_ATTR)
    if name not in named:
        raise ValueError(f"set_adapter: no adapter named {name!r}; the model has {', '.join(adapter_names(model))}")
    if name == model.rspeft_active:
        return model
    ops["stash"](model, model.rspeft_active)
    ops["unstash"](model, name)
    cfg, adapted, trainable = named[name]
    setattr(model, CONFIG_ATTR, cfg)
    setattr(model, ADAPTED_ATTR, adapted)
    original = getattr(model, ORIGINAL_ATTR)["grad"]
    setattr(model, ADDED_ATTR, tuple(n for n, _ in model.named_parameters() if n not in original))
    model.rspeft_trainable = trainable
    keep = set(trainable)
    for n, p in model.named_parameters():
        p.requires_grad_(n in keep)
    model.rspeft_active = name
    return model


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Delete a named adapter that is not the active one (switch with :func:`set_adapter` first)."""
    ops = _named_ops(model, "delete_adapter")
    named = getattr(model, NAMED_ATTR)
    if name not in named:
        raise ValueError(f"delete_adapter: no adapter named {name!r}; the model has {', '.join(adapter_names(model))}")
    if name == model.rspeft_active:
        raise ValueError(f"delete_adapter: {name!r} is the active adapter; set_adapter to another one first "
                         "(or unload_adapters to remove them all)")
    ops["drop"](model, name)
    del named[name]
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
        return (  # HF peft's print_trainable_parameters line first, the papers' share (of the backbone) beside it
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: "
            f"{self.percent_of_total:.4f} || backbone params: {self.backbone:,} || of backbone: {self.percent:.4f}%"
            + (f" || adapted {len(self.adapted)} modules: {shown}" if self.adapted else "")
        )


def adapter_parameter_names(model: nn.Module) -> set:
    """Names of the parameters that injection added (adapter modules, LoRA factors, gates, prompts) and that the
    model still has (``merge_adapters`` removes LoRA's)."""
    return set(getattr(model, ADDED_ATTR, ())) & {n for n, _ in model.named_parameters()}


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


def merge_adapters(model: nn.Module, keep: bool = False) -> nn.Module:
    """Fold linear adapters into the backbone weights: LoRA (``W += scaling * B A``) and BitFit (already in the
    biases: nothing to do). Other methods raise.

    ``keep=False``: the LoRA factors are removed (the model has no adapters left: ``save_adapters`` and
    ``enable_adapters`` say so). ``keep=True`` (HF peft's ``merge_adapter``): the factors and the pre-merge weights
    are kept, the model stays injected (saving, switching off: the pre-merge weights run) and
    :func:`unmerge_adapters` restores the pre-merge outputs exactly."""
    cfg = getattr(model, CONFIG_ATTR, None)
    if cfg is None:
        raise RuntimeError("merge_adapters: the model has no injected adapters")
    method = cfg.to_dict()["method"]
    spec = REGISTRY[method]
    if spec.merge is None:
        mergeable = ", ".join(m.name for m in REGISTRY.values() if m.merge is not None)
        raise NotImplementedError(
            f"merge_adapters: method {method!r} is not linear, so it cannot be folded into the "
            f"backbone weights (mergeable: {mergeable})"
        )
    if not keep:
        spec.merge(model)
    elif spec.unmerge is not None:
        spec.merge(model, keep=True)
    elif not spec.merged_keeps_config:  # (BitFit: merged already, nothing to keep)
        raise NotImplementedError(f"merge_adapters(keep=True): method {method!r} cannot be unmerged; merge a copy "
                                  "(copy.deepcopy(model)) to keep the adapters")
    if not keep and not spec.merged_keeps_config:
        setattr(model, CONFIG_ATTR, None)
        setattr(model, MERGED_ATTR, cfg)
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_adapters` ``(keep=True)``: the backbone weights are the pre-merge ones again (bit for bit)
    and the adapters run beside them. After a plain ``merge_adapters`` the factors are gone: the error says so."""
    cfg = injected_config(
        model, "unmerge_adapters",
        "merge_adapters folded the {method!r} adapters into the weights and removed them; merge with keep=True to "
        "be able to unmerge")
    spec = REGISTRY[cfg.to_dict()["method"]]
    if spec.unmerge is not None:
        spec.unmerge(model)
    return model


def _snapshot(model: nn.Module) -> dict:
    """What injection may change, per module name: the class, the attribute / parameter / buffer / child / hook
    names, the plain scalar attributes' values; and each parameter's ``requires_grad``."""
    mods = {}
    for name, m in model.named_modules():
        mods[name] = (
            type(m),
            {k: v for k, v in m.__dict__.items() if isinstance(v, (bool, int, float, str, type(None)))},
            set(m.__dict__), set(m._parameters), set(m._buffers), set(m._modules),
            set(m._forward_hooks), set(m._forward_pre_hooks),
        )
    return {"modules": mods, "grad": {n: p.requires_grad for n, p in model.named_parameters()}}


def _keep_changed_scalars(model: nn.Module, original: dict) -> None:
    """Keep, of the recorded scalar attributes, only those injection changed (EVA's ``qkv_bias_separate``): what
    the user changes later (a checkpointing flag) is not undone by :func:`unload_adapters`."""
    mods = original["modules"]
    for name, m in model.named_modules():
        if name in mods:
            rec = mods[name]
            changed = {k: v for k, v in rec[1].items() if k != "training" and m.__dict__.get(k, v) != v}
            mods[name] = (rec[0], changed, *rec[2:])


def unload_adapters(model: nn.Module) -> nn.Module:
    """Remove every adapter and give the backbone's modules back as they were before :func:`inject` (HF peft's
    ``unload``): classes swapped back, adapter modules, LoRA factors, gates, prompts and hooks removed, attributes
    and ``requires_grad`` flags as before. LoRA merged with ``keep=True`` is unmerged first.

    The backbone's state dict then has its original names; its values are the original ones except the backbone
    tensors the method trained (BitFit's biases, ``bias="all"``, a trained classifier head, a head that
    ``num_classes`` replaced). After a plain :func:`merge_adapters`, the merged weights stay: that is
    :func:`merge_and_unload`."""
    original = getattr(model, ORIGINAL_ATTR, None)
    if original is None:
        raise RuntimeError("unload_adapters: the model has no injected adapters (call rspeft_fast.inject first)")
    if getattr(model, CONFIG_ATTR, None) is not None:
        unmerge_adapters(model)
    mods = original["modules"]
    for name, m in list(model.named_modules()):
        if name not in mods:
            continue
        cls, scalars, keys, params, buffers, children, hooks, pre_hooks = mods[name]
        m.__class__ = cls
        for k in set(m._parameters) - params:
            del m._parameters[k]
        for k in set(m._buffers) - buffers:
            del m._buffers[k]
            m._non_persistent_buffers_set.discard(k)
        for k in set(m._modules) - children:
            del m._modules[k]
        for k in set(m._forward_hooks) - hooks:
            for d in (m._forward_hooks, m._forward_hooks_with_kwargs, m._forward_hooks_always_called):
                d.pop(k, None)
        for k in set(m._forward_pre_hooks) - pre_hooks:
            for d in (m._forward_pre_hooks, m._forward_pre_hooks_with_kwargs):
                d.pop(k, None)
        for k in set(m.__dict__) - keys:
            del m.__dict__[k]
        m.__dict__.update(scalars)
    for n, p in model.named_parameters():
        if n in original["grad"]:
            p.requires_grad_(original["grad"][n])
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """:func:`merge_adapters` then :func:`unload_adapters` (HF peft's name): a plain backbone whose weights hold the
    adapters (LoRA), with the original module classes; nothing of rspeft_fast is left on it."""
    return unload_adapters(merge_adapters(model))
