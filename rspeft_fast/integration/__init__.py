"""Drop-in integration: inject adapters into timm / open_clip / HF / torchvision models, save and load them.

* :func:`inject` (model, method or config, **options) → the model, frozen, with trainable adapters;
* :func:`trainable_parameters`, :func:`enable_adapters`, :func:`adapters_disabled`, :func:`merge_adapters`
  (``keep=True``: :func:`unmerge_adapters` undoes it), :func:`unload_adapters`, :func:`merge_and_unload`;
* named adapters (LoRA): ``inject(..., adapter_name=)``, :func:`set_adapter`, :func:`delete_adapter`;
* :func:`save_adapters` / :func:`load_adapters` (safetensors, config in the metadata), :func:`trainable_state_dict`;
* one config dataclass per method (:class:`MuFAConfig`, ...).

Layout (HF peft's, one home per method family):

* ``families.py``: the model families (:data:`~.families.FAMILIES`: where each family's blocks, MLPs and norms are);
* ``registry.py``: the method table (:data:`~.registry.REGISTRY`: name → config class, injector, families);
* ``methods/<family of methods>.py``: each method's config and injector, registered in that table
  (``bottleneck.py``: mufa, adaptformer, adapter; ``lora.py``; ``vpt.py``; ``eqam.py``: eqam, eqam+capm;
  ``capm.py``; ``mga.py``; ``backbone_tuning.py``: bitfit, layernorm, linear, full);
* ``_blocks.py``: the adapted block / MLP / norm classes the injectors swap in; ``config.py``: the options every
  method shares and their one validation; ``inject.py``: :func:`inject` and the switches; ``io.py``: files.

Adding a method is one new file, ``methods/<name>.py`` (every module there is imported with the package); the
shape of one (``methods/convpass.py`` is the real thing)::

    from dataclasses import dataclass
    from typing import ClassVar

    from ..config import AdapterConfig, OptionError
    from ..registry import register
    from ._common import attach, blocks_of, dd

    @dataclass
    class MyConfig(AdapterConfig):
        \"\"\"My method: ... (each option, its default and its rule, stated once here).\"\"\"
        method: ClassVar[str] = "mine"
        width: int = 8

        def validate(self) -> None:      # option checks raise OptionError naming the option
            super().validate()
            if self.width <= 0:
                raise OptionError(f"width must be positive, got {self.width}")

    @register("mine", MyConfig, families=("vit", "eva", "hf-vit"),
              why_not={"swin": "..."})   # shown when someone tries it there
    def inject_mine(model, fam, cfg, target) -> list:
        out = []
        for name, blk in target.select(blocks_of(model, fam), "transformer blocks"):
            ad = MyAdapter(fam.block_dim(blk), cfg.width).to(**dd(blk))
            out.append(attach(fam, name, blk, ad, "parallel"))   # or "serial"; a new placement: _blocks
        return out                       # the names of the modules adapted

The injector runs on a model whose every parameter is frozen; new modules are trainable, and it unfreezes any
backbone tensor the method tunes. ``register`` also takes ``merge=`` (fold into the weights; ``unmerge=`` undoes a
``keep=True`` merge), ``named=`` (named adapters: stash / unstash / drop, see ``registry.Method``), ``resolve=`` (defaults
that depend on the model, e.g. a width) and ``defaults=`` (a variant name that sets options, as ``eqam+capm``).
Config, ``inject``, ``SUPPORTED``, the CLI's ``--method`` choices, ``save_adapters`` / ``load_adapters`` and the error
messages then know the method; add its tests (``tests/test_inject.py``'s method list, a save/load round trip).
"""
from . import config as _config
from . import inject as _inject
from . import io as _io
from .config import *  # noqa: F401,F403  (each submodule's __all__ is the one list of its public names)
from .inject import *  # noqa: F401,F403
from .io import *  # noqa: F401,F403
from .methods.backbone_tuning import BitFitConfig, FullConfig, LayerNormConfig, LinearProbeConfig
from .methods.bottleneck import AdapterHoulsbyConfig, AdaptFormerConfig, MuFAConfig
from .methods.capm import CAPMConfig
from .methods.convpass import ConvpassConfig
from .methods.e2vpt import E2VPTConfig
from .methods.eqam import EQAMConfig
from .methods.ivpt import IVPTConfig
from .methods.lora import LoRAConfig
from .methods.lorand import LoRandConfig
from .methods.mga import MGAConfig
from .methods.vpt import VPTConfig

__all__ = [*_inject.__all__, *_io.__all__, *_config.__all__,
           "MuFAConfig", "AdaptFormerConfig", "AdapterHoulsbyConfig", "LoRAConfig", "BitFitConfig", "LayerNormConfig",
           "LinearProbeConfig", "VPTConfig", "FullConfig", "EQAMConfig", "CAPMConfig", "MGAConfig", "ConvpassConfig",
           "LoRandConfig", "IVPTConfig", "E2VPTConfig"]
