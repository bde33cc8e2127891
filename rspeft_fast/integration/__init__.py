"""Drop-in integration: inject adapters into timm / open_clip models, save/load adapter weights, fine-tune.

* :func:`inject` (model, method or config, **options) → the model, frozen, with trainable adapters;
* :func:`trainable_parameters`, :func:`enable_adapters`, :func:`adapters_disabled`, :func:`merge_adapters`;
* :func:`save_adapters` / :func:`load_adapters` (safetensors, config in the metadata);
* one config dataclass per method (:class:`MuFAConfig`, ...);
* the fine-tuning CLI: ``python -m rspeft_fast train --help`` (:mod:`rspeft_fast.integration.train`).
"""
from .config import (
    AdapterConfig,
    AdaptFormerConfig,
    AdapterHoulsbyConfig,
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
    METHODS,
    OptionError,
    coerce_options,
    config_for,
)
from .inject import (
    SUPPORTED,
    TrainableParams,
    adapters_disabled,
    enable_adapters,
    inject,
    merge_adapters,
    model_family,
    trainable_parameters,
)
from .io import load_adapters, save_adapters, read_adapter_config

__all__ = [
    "inject",
    "trainable_parameters",
    "save_adapters",
    "load_adapters",
    "read_adapter_config",
    "enable_adapters",
    "adapters_disabled",
    "merge_adapters",
    "model_family",
    "TrainableParams",
    "SUPPORTED",
    "METHODS",
    "config_for",
    "coerce_options",
    "OptionError",
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
]
