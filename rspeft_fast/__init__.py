"""rspeft_fast: fused, drop-in parameter-efficient fine-tuning adapters for remote-sensing models.

Public API (imported lazily, so ``import rspeft_fast`` is cheap and never needs a GPU):

* modules: :class:`MuFAAdapter`, :class:`QLinear`, :class:`EQAM`, :class:`CAPM`,
  :class:`BiShareAdapter`, :class:`MGAdapter`, :class:`WeightedTripletLoss`, :class:`Convpass`, :class:`LoRand`,
  :class:`IVPTGate`, :class:`KVPrompts`;
* functional: :func:`weighted_triplet_loss` (features L2-normalised by the caller);
* eager references: :mod:`rspeft_fast.reference`;
* integration: :func:`inject`, :func:`trainable_parameters`, :func:`save_adapters`, :func:`load_adapters`, ...
"""
from importlib import import_module as _import_module

__version__ = "0.1.0"

_LAZY = {
    "MuFAAdapter": ".modules.mufa",
    "QLinear": ".modules.qlinear",
    "EQAM": ".modules.qlinear",
    "CAPM": ".modules.capm",
    "BiShareAdapter": ".modules.mga",
    "MGAdapter": ".modules.mga",
    "WeightedTripletLoss": ".modules.triplet",
    "Convpass": ".modules.convpass",
    "LoRand": ".modules.lorand",
    "IVPTGate": ".modules.ivpt",
    "KVPrompts": ".modules.e2vpt",
    "weighted_triplet_loss": ".ops.triplet",
    "contrastive_loss": ".ops.contrastive",
    "ImplUnavailableError": "._impl",
    "reference": ".reference",
    "pack_adapters": ".modules.qlinear",
    # integration (rspeft_fast/integration/__init__.py exports these)
    "inject": ".integration",
    "trainable_parameters": ".integration",
    "save_adapters": ".integration",
    "load_adapters": ".integration",
    "enable_adapters": ".integration",
    "adapters_disabled": ".integration",
    "merge_adapters": ".integration",
    "unmerge_adapters": ".integration",
    "unload_adapters": ".integration",
    "merge_and_unload": ".integration",
    "set_adapter": ".integration",
    "delete_adapter": ".integration",
    "adapter_names": ".integration",
    "AdapterConfig": ".integration",
    "coerce_options": ".integration",
    "OptionError": ".integration",
    "MuFAConfig": ".integration",
    "AdaptFormerConfig": ".integration",
    "AdapterHoulsbyConfig": ".integration",
    "LoRAConfig": ".integration",
    "BitFitConfig": ".integration",
    "LayerNormConfig": ".integration",
    "LinearProbeConfig": ".integration",
    "VPTConfig": ".integration",
    "FullConfig": ".integration",
    "EQAMConfig": ".integration",
    "CAPMConfig": ".integration",
    "MGAConfig": ".integration",
    "ConvpassConfig": ".integration",
    "LoRandConfig": ".integration",
    "IVPTConfig": ".integration",
    "E2VPTConfig": ".integration",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'rspeft_fast' has no attribute {name!r}")
    m = _import_module(mod, __name__)
    value = m if name == "reference" else getattr(m, name)
    globals()[name] = value
    return value


def __dir__():
    """The public API (``__all__``) and the module's dunder attributes; no private helpers or imports."""
    return sorted({n for n in globals() if n.startswith("__")} | set(__all__) | {"__version__"})
