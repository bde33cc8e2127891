"""Drop-in integration: inject adapters into timm / open_clip models, save/load adapter weights, fine-tune.

* :func:`inject` (model, method or config, **options) → the model, frozen, with trainable adapters;
* :func:`trainable_parameters`, :func:`enable_adapters`, :func:`adapters_disabled`, :func:`merge_adapters`;
* :func:`save_adapters` / :func:`load_adapters` (safetensors, config in the metadata);
* one config dataclass per method (:class:`MuFAConfig`, ...);
* the fine-tuning CLI: ``python -m rspeft_fast train --help`` (:mod:`rspeft_fast.integration.train`).
"""
from . import config as _config
from . import inject as _inject
from . import io as _io
from .config import *  # noqa: F401,F403  (each submodule's __all__ is the one list of its public names)
from .inject import *  # noqa: F401,F403
from .io import *  # noqa: F401,F403

__all__ = [*_inject.__all__, *_io.__all__, *_config.__all__]
