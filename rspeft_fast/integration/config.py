"""The options every method shares, their one validation, and the lookup of a method's config class.

Each method's config is a dataclass subclass of :class:`AdapterConfig` in the shape of HF peft's configs,
serialisable to JSON, declared beside its injector in :mod:`rspeft_fast.integration.methods` (``MuFAConfig`` in
``methods/bottleneck.py``, ...). ``inject(model, config)`` takes one (or ``inject(model, "mufa", **options)`` builds
it with :func:`config_for`). Every config carries the options common to all methods:

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

A config may accept other names for its fields (``aliases``: LoRA takes HF peft's ``r``, ``lora_alpha``,
``lora_dropout``, ``use_rslora``, ``init_lora_weights``, ``target_modules``), wherever options are given by name.

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

__all__ = ["AdapterConfig", "config_for", "config_class", "coerce_options", "OptionError", "METHODS"]

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
    cls = type(cfg)
    return {k: getattr(cfg, cls.aliases.get(k, k)) for k in options}


def _unalias(cls: type, options: dict) -> dict:
    """``options`` with the config's alias names (``cls.aliases``: HF peft's ``r``, ``lora_alpha``, ...) replaced
    by its own field names; :class:`OptionError` when an option is given under both names."""
    out = {}
    for k, v in options.items():
        name = cls.aliases.get(k, k)
        if name in out:
            raise OptionError(f"{cls.method}: option {name!r} is given twice ({k!r} is another name for it)")
        out[name] = v
    return out

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
    # other names accepted for fields ({alias: field}; HF peft's option names, so a peft recipe transfers)
    aliases: ClassVar[dict] = {}

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

            if not isinstance(self.target, str):
                raise OptionError(f"{self.method}: option target={self.target!r} is not valid (expected a regular "
                                  "expression string, a list of module names, or None)")
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


def config_class(method: Any) -> type:
    """The config class of the registered method ``method``; :class:`OptionError` listing the methods otherwise."""
    from .registry import REGISTRY

    spec = REGISTRY.get(method) if isinstance(method, str) else None
    if spec is None:
        raise OptionError(f"unknown method {method!r}; supported methods: {', '.join(sorted(REGISTRY))}")
    return spec.config


def config_for(method: Union[str, AdapterConfig], **options) -> AdapterConfig:
    """Build the config of ``method`` (a name or a config, which ``options`` then update)."""
    from .registry import REGISTRY

    if isinstance(method, AdapterConfig):
        return method.replace(**_unalias(type(method), options)) if options else method
    if not isinstance(method, str):
        raise TypeError(f"method must be a method name or an AdapterConfig, got {type(method).__name__}")
    name = method.lower()
    cls = config_class(name)
    options = _unalias(cls, options)
    for k, v in REGISTRY[name].defaults.items():  # a variant's name sets options ("eqam+capm": with_capm=True)
        options.setdefault(k, v)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(options) - names
    if unknown:
        raise OptionError(f"unknown options for method {method!r}: {sorted(unknown)} (known: {sorted(names)})")
    return cls(**options)


def __getattr__(name: str):
    if name == "METHODS":  # every registered method name, sorted (the table fills when the package is imported)
        from .registry import method_names

        return method_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
