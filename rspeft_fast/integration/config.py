"""One config dataclass per method, in the shape of HF peft's configs, serialisable to JSON.

``inject(model, config)`` takes one of these (or ``inject(model, "mufa", **options)`` builds it).
Every config carries the options common to all methods:

* ``target``: where the method applies (one meaning for every method, HF peft's rule): a string is a regular
  expression ``re.fullmatch``ed against module names, a list names modules exactly or by dotted suffix; a
  method's units (blocks, stages, attention projections, ...) that are selected or inside a selected module
  are adapted; ``None`` adapts all of them (``integration.inject.Target``).
* ``num_classes``: reset the classifier head to this many classes (timm models); ``None`` keeps it.
  At injection the actual head size is written back into the stored config, so a saved adapter
  file re-creates the same head on a fresh model.
* ``train_head``: whether the classifier head is trainable (methods that tune the head by default).
* ``impl``: kernel switch passed to the adapter modules: ``"auto" | "reference" | "triton"``, or a
  dict per op, keys ``"mufa"``, ``"eqam"``, ``"mga"`` (missing keys mean ``"auto"``). Not part of the
  method's identity: it is not compared when loading adapter weights.

Option values are validated and coerced in ONE place, :func:`coerce_options` (the configs' ``validate``,
hence ``inject(model, "mufa", rates=16)``, the config constructors and the CLI's ``--option key=value``):
``rates=16``, ``rates="8,16,32"``, ``rates=[8, 16]`` all mean what they say, ``"4"`` is an int option's 4,
``"true"``/``"0"`` a bool's; nonsense raises :class:`OptionError` (a ValueError and a TypeError) with one
line naming the option and the method.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

__all__ = [
    "AdapterConfig",
    "MuFAConfig",
    "AdaptFormerConfig",
    "AdapterHoulsbyConfig",
    "LoRAConfig",
    "BitFitConfig",
    "LayerNormConfig",
    "LinearProbeConfig",
    "VPTConfig",
    "FullConfig",
    "EQAMConfig",
    "CAPMConfig",
    "MGAConfig",
    "config_for",
    "coerce_options",
    "OptionError",
    "METHODS",
]

ImplSpec = Union[str, dict]


class OptionError(ValueError, TypeError):
    """A method option that is unknown or whose value means nothing (one line naming the option)."""


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _as_int(v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError("a boolean is not an integer")
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and v.strip().lstrip("+-").isdigit():
        return int(v.strip())
    raise ValueError("expected an integer")


def _as_float(v: Any) -> float:
    if isinstance(v, bool):
        raise ValueError("a boolean is not a number")
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        return float(v.strip())  # ValueError for nonsense
    raise ValueError("expected a number")


def _as_bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in _TRUE + _FALSE:
        return v.strip().lower() in _TRUE
    raise ValueError("expected true/false")


def _as_int_tuple(v: Any) -> tuple:
    """``16`` / ``"16"`` / ``"8,16,32"`` / ``"(8, 16)"`` / ``[8, 16]`` → a tuple of ints."""
    if isinstance(v, str):
        text = v.strip().strip("()[]")
        parts = [t for t in (p.strip() for p in text.split(",")) if t]
        if not parts:
            raise ValueError("expected integers like 8,16,32")
        return tuple(_as_int(t) for t in parts)
    if isinstance(v, (list, tuple)):
        return tuple(_as_int(t) for t in v)
    return (_as_int(v),)


def _as_optional(conv):
    def f(v: Any):
        if v is None or (isinstance(v, str) and v.strip().lower() in ("none", "null")):
            return None
        return conv(v)
    return f


def _as_str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("expected a string")
    return v


# annotation (as written in the dataclasses below) -> converter
_CONVERTERS = {
    "int": _as_int,
    "float": _as_float,
    "bool": _as_bool,
    "str": _as_str,
    "tuple": _as_int_tuple,
    "Optional[int]": _as_optional(_as_int),
}


def _coerce_field(cls: type, name: str, value: Any) -> Any:
    ann = {f.name: f.type for f in dataclasses.fields(cls)}.get(name)
    conv = _CONVERTERS.get(ann if isinstance(ann, str) else getattr(ann, "__name__", ""))
    if conv is None:  # target / impl: checked by AdapterConfig.validate
        return value
    try:
        return conv(value)
    except (TypeError, ValueError) as e:
        raise OptionError(f"{cls.method}: option {name}={value!r} is not valid ({e})") from None


def coerce_options(method: Union[str, "AdapterConfig"], options: dict) -> dict:
    """Validate and coerce ``options`` for ``method`` (a name or a config class/instance): returns the options
    with their values as the config holds them (``{"rates": "8,16"}`` → ``{"rates": (8, 16)}``), after the
    config's own checks. Raises :class:`OptionError` naming the option (unknown key or bad value).
    Used by :func:`config_for` (hence ``inject``) and by the CLI's ``--option``."""
    cfg = config_for(method, **options)
    return {k: getattr(cfg, k) for k in options}

_IMPLS = ("auto", "reference", "triton")
_IMPL_OPS = ("mufa", "eqam", "mga")


@dataclass
class AdapterConfig:
    """Base of every method's config (see the module docstring for the common fields)."""

    method: ClassVar[str] = ""

    target: Optional[str] = None
    num_classes: Optional[int] = None
    train_head: bool = True
    impl: ImplSpec = "auto"

    # fields that do not define the adapter's tensors (not compared when loading weights)
    _RUNTIME_FIELDS: ClassVar[tuple] = ("impl",)

    def __post_init__(self):
        self.validate()

    # -- validation ---------------------------------------------------------------------------
    def validate(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce_field(type(self), f.name, getattr(self, f.name)))
        if isinstance(self.target, (list, tuple)):  # names, exact or dotted suffix (integration.inject.Target)
            if not all(isinstance(t, str) and t for t in self.target):
                raise OptionError(f"{type(self).__name__}.target: a list of target names must hold non-empty strings, got {self.target!r}")
            self.target = list(self.target)
        elif self.target is not None:
            import re

            try:
                re.compile(self.target)
            except re.error as e:
                raise OptionError(f"{type(self).__name__}.target={self.target!r} is not a valid regular expression: {e}") from None
        if self.num_classes is not None and int(self.num_classes) < 0:
            raise OptionError(f"num_classes must be >= 0, got {self.num_classes}")
        self.impl_for("mufa")  # validates impl

    def impl_for(self, op: str) -> str:
        """The ``impl`` string for one op (``"mufa" | "eqam" | "mga"``)."""
        if isinstance(self.impl, str):
            impl = self.impl
        elif isinstance(self.impl, dict):
            bad = set(self.impl) - set(_IMPL_OPS)
            if bad:
                raise OptionError(f"impl dict keys must be among {_IMPL_OPS}, got {sorted(bad)}")
            impl = self.impl.get(op, "auto")
        else:
            raise TypeError(f"impl must be a str or a dict per op, got {type(self.impl).__name__}")
        if impl not in _IMPLS:
            raise OptionError(f"impl={impl!r} is not one of {_IMPLS}")
        return impl

    # -- (de)serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {"method": self.method}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        return d

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, **kw)

    @staticmethod
    def from_dict(d: dict) -> "AdapterConfig":
        d = dict(d)
        method = d.pop("method", None)
        cls = config_class(method)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise OptionError(f"unknown options for method {method!r}: {sorted(unknown)} (known: {sorted(names)})")
        for f in dataclasses.fields(cls):
            if f.name in d and isinstance(f.default, tuple) and isinstance(d[f.name], list):
                d[f.name] = tuple(d[f.name])
        return cls(**d)

    @staticmethod
    def from_json(s: str) -> "AdapterConfig":
        return AdapterConfig.from_dict(json.loads(s))

    def identity(self) -> dict:
        """The fields that define the adapter tensors (everything but runtime options)."""
        d = self.to_dict()
        for k in self._RUNTIME_FIELDS:
            d.pop(k, None)
        return d

    def replace(self, **changes) -> "AdapterConfig":
        return dataclasses.replace(self, **changes)


def _check_rates(rates) -> tuple:
    rates = _as_int_tuple(rates)
    if not rates or any(r <= 0 for r in rates):
        raise OptionError(f"rates must be a non-empty sequence of positive integers, got {rates}")
    return rates


@dataclass
class MuFAConfig(AdapterConfig):
    """MuFA: multi-scale fusion adapter beside (``"parallel"``) or after (``"serial"``) each block's MLP."""

    method: ClassVar[str] = "mufa"
    rates: tuple = (8, 16, 32)
    scale: float = 1.0
    placement: str = "parallel"

    def validate(self) -> None:
        super().validate()
        self.rates = _check_rates(self.rates)
        if self.placement not in ("parallel", "serial"):
            raise OptionError(f"placement must be 'parallel' or 'serial', got {self.placement!r}")


@dataclass
class AdaptFormerConfig(MuFAConfig):
    """AdaptFormer: one bottleneck branch (width ``dim // rate``) parallel to the MLP, scaled by ``scale``."""

    method: ClassVar[str] = "adaptformer"
    rates: tuple = (8,)
    scale: float = 0.1
    placement: str = "parallel"


@dataclass
class AdapterHoulsbyConfig(MuFAConfig):
    """Houlsby-style serial bottleneck adapter on the MLP output: ``y + adapter(y)``."""

    method: ClassVar[str] = "adapter"
    rates: tuple = (8,)
    scale: float = 1.0
    placement: str = "serial"


@dataclass
class LoRAConfig(AdapterConfig):
    """LoRA on the attention ``qkv`` projections: ``W x + (alpha / rank) * B A x`` (``B`` zero-init).

    ``modules``: regex over the attention's child Linear names to adapt (default: ``qkv`` only).
    """

    method: ClassVar[str] = "lora"
    rank: int = 8
    alpha: float = 8.0
    modules: str = r"^qkv$"

    def validate(self) -> None:
        super().validate()
        if int(self.rank) <= 0:
            raise OptionError(f"rank must be positive, got {self.rank}")


@dataclass
class BitFitConfig(AdapterConfig):
    """BitFit: every bias of the backbone is trainable (plus the head)."""

    method: ClassVar[str] = "bitfit"


@dataclass
class LayerNormConfig(AdapterConfig):
    """LayerNorm tuning: the affine parameters of every normalisation layer are trainable (plus the head)."""

    method: ClassVar[str] = "layernorm"


@dataclass
class LinearProbeConfig(AdapterConfig):
    """Linear probe: only the classifier head is trainable."""

    method: ClassVar[str] = "linear"


@dataclass
class FullConfig(AdapterConfig):
    """Full fine-tuning: every parameter is trainable (the saved "adapter" file holds the whole model)."""

    method: ClassVar[str] = "full"


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


@dataclass
class EQAMConfig(AdapterConfig):
    """UPetu's EQAM parallel to each ConvNeXt block's MLP (channels-last), optionally with CAPM
    after each stage (``with_capm=True`` is method ``"eqam+capm"``).

    Bottleneck width: ``hidden`` channels in every block (default 16: UPetu's budget, 0.73 % of ConvNeXt-B
    with CAPM and a 55-class head, SPEC §1), or ``reduction=r`` for ``dim // r`` (``reduction=4`` is eight
    times the paper's budget); not both. Files saved before ``hidden`` existed hold ``reduction`` and load
    as they were saved."""

    method: ClassVar[str] = "eqam"
    DEFAULT_HIDDEN: ClassVar[int] = 16
    hidden: Optional[int] = None
    reduction: Optional[int] = None
    bits: int = 8
    with_capm: bool = False
    num_prompts: int = 8

    def validate(self) -> None:
        super().validate()
        if not 2 <= int(self.bits) <= 8:
            raise OptionError(f"bits must be in [2, 8], got {self.bits}")
        if self.hidden is not None and self.reduction is not None:
            raise OptionError(f"eqam: give hidden={self.hidden} or reduction={self.reduction}, not both")
        if self.reduction is not None and int(self.reduction) <= 0:
            raise OptionError(f"reduction must be positive, got {self.reduction}")
        if self.reduction is None and self.hidden is None:
            self.hidden = self.DEFAULT_HIDDEN
        if self.hidden is not None and int(self.hidden) <= 0:
            raise OptionError(f"hidden must be positive, got {self.hidden}")

    def to_dict(self) -> dict:
        d = super().to_dict()
        if self.with_capm:
            d["method"] = "eqam+capm"
        return d


@dataclass
class CAPMConfig(AdapterConfig):
    """UPetu's CAPM after each ConvNeXt stage: ``num_prompts`` prompt vectors per stage."""

    method: ClassVar[str] = "capm"
    num_prompts: int = 8

    def validate(self) -> None:
        super().validate()
        if int(self.num_prompts) <= 0:
            raise OptionError(f"num_prompts must be positive, got {self.num_prompts}")


@dataclass
class MGAConfig(AdapterConfig):
    """HarMA's MGA in every layer of a CLIP-style model (open_clip) or of a timm ViT.

    Placement: ``y = mlp(ln_2(x)); y = b*MGA(y) + (1-b)*y``, ``b = sigmoid(block_gate)`` (a Parameter
    per layer, init ``block_gate_init``). ``towers``: ``"both" | "image" | "text"`` (open_clip only).
    ``bishare``: the text-tower adapters hold a per-layer BiShareAdapter (SPEC); ``share_across_towers``
    additionally lets the image adapter of layer i use the text tower's BiShare of layer i (HarMA's
    cross-modal sharing; needs equal depths). ``text_padding_mask``: pass the text key padding mask
    (token == pad id, default 0) to the text-tower adapters' attention.
    """

    method: ClassVar[str] = "mga"
    hidden: int = 128
    heads: int = 8
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
        if int(self.hidden) % int(self.heads):
            raise OptionError(f"hidden={self.hidden} must be divisible by heads={self.heads}")


_CLASSES = [
    MuFAConfig,
    AdaptFormerConfig,
    AdapterHoulsbyConfig,
    LoRAConfig,
    BitFitConfig,
    LayerNormConfig,
    LinearProbeConfig,
    VPTConfig,
    FullConfig,
    EQAMConfig,
    CAPMConfig,
    MGAConfig,
]
_BY_METHOD = {c.method: c for c in _CLASSES}
METHODS = tuple(sorted(list(_BY_METHOD) + ["eqam+capm"]))


def config_class(method: Any) -> type:
    if method == "eqam+capm":
        return EQAMConfig
    cls = _BY_METHOD.get(method)
    if cls is None:
        raise OptionError(f"unknown method {method!r}; supported methods: {', '.join(METHODS)}")
    return cls


def config_for(method: Union[str, AdapterConfig], **options) -> AdapterConfig:
    """Build the config of ``method`` (a name or a config, which ``options`` then update)."""
    if isinstance(method, AdapterConfig):
        return method.replace(**options) if options else method
    if not isinstance(method, str):
        raise TypeError(f"method must be a method name or an AdapterConfig, got {type(method).__name__}")
    cls = config_class(method.lower())
    if method.lower() == "eqam+capm":
        options.setdefault("with_capm", True)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(options) - names
    if unknown:
        raise OptionError(f"unknown options for method {method!r}: {sorted(unknown)} (known: {sorted(names)})")
    return cls(**options)
