"""The method table: one :class:`Method` per method name, filled by the files of :mod:`.methods` at import.

A method file declares its config class (an :class:`~rspeft_fast.integration.config.AdapterConfig` subclass), the
families it fits (with a reason for the ones it does not, where a user would expect it) and registers its
injector with :func:`register`. ``inject``, ``config_for``, ``SUPPORTED``, the families' ``methods`` and the
error messages all read this one table.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping, Optional, Tuple

__all__ = ["Method", "REGISTRY", "register", "method", "method_names"]


@dataclass(frozen=True)
class Method:
    """One method.

    Attributes:
        name: the method name (``inject(model, name)``, adapter files, the CLI's ``--method``).
        config: its config class (``config.method`` is the name, except for a variant such as ``eqam+capm``).
        inject: ``fn(model, family, cfg, target) -> [names of the adapted modules]``; runs on a model whose every
            parameter is frozen and makes the method's tensors trainable (new adapters are trainable already).
        families: the :class:`~rspeft_fast.integration.families.Family` names it fits.
        why_not: ``{family name: reason}`` for families it does not fit (error messages, the README table).
        defaults: options that a variant name sets (``"eqam+capm"`` → ``{"with_capm": True}``).
        merge: ``fn(model) -> None`` folding the method into the backbone's weights (``merge_adapters``), or
            ``None`` when it cannot be folded; a method with ``unmerge`` also takes ``keep=True`` (the adapter tensors
            stay and ``unmerge`` can undo it).
        named: named adapters (``inject(..., adapter_name=)``, ``set_adapter``): ``{"stash": fn(model, name),
            "unstash": fn(model, name), "drop": fn(model, name)}`` moving the active adapter's tensors aside under
            ``name`` (out of the module tree: the forward and the kernels see only the active one), bringing them back,
            deleting them; ``None`` when the method has one adapter per model.
        unmerge: ``fn(model) -> None`` undoing ``merge(model, keep=True)`` exactly (``unmerge_adapters``), or ``None``.
        merged_keeps_config: after ``merge``, the adapters are still the model's (BitFit: its biases *are* the
            backbone's), so the model still has its config.
        resolve: ``fn(model, family, cfg) -> cfg`` filling the options whose default depends on the model (MGA's
            width), or ``None``; ``inject`` stores the resolved config, so a saved file holds the actual sizes.
    """

    name: str
    config: type
    inject: Callable
    families: Tuple[str, ...]
    why_not: Mapping[str, str] = field(default_factory=dict)
    defaults: Mapping[str, object] = field(default_factory=dict)
    merge: Optional[Callable] = None
    merged_keeps_config: bool = False
    resolve: Optional[Callable] = None
    unmerge: Optional[Callable] = None
    named: Optional[Mapping[str, Callable]] = None


REGISTRY: Dict[str, Method] = {}


def register(name: str, config: type, families, *, why_not: Optional[Mapping[str, str]] = None,
             defaults: Optional[Mapping[str, object]] = None, merge: Optional[Callable] = None,
             merged_keeps_config: bool = False, resolve: Optional[Callable] = None,
             unmerge: Optional[Callable] = None, named: Optional[Mapping[str, Callable]] = None):
    """Decorator: register ``fn(model, family, cfg, target) -> [adapted module names]`` as method ``name``."""

    def deco(fn):
        if name in REGISTRY:
            raise RuntimeError(f"method {name!r} is registered twice ({REGISTRY[name].inject.__module__}, {fn.__module__})")
        REGISTRY[name] = Method(name, config, fn, tuple(families), dict(why_not or {}), dict(defaults or {}), merge,
                                merged_keeps_config, resolve, unmerge, named)
        return fn

    return deco


def method(name: str) -> Method:
    """The :class:`Method` called ``name``; ``KeyError`` if none is."""
    return REGISTRY[name]


def method_names() -> tuple:
    """Every registered method name, sorted."""
    return tuple(sorted(REGISTRY))
