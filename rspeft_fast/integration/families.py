"""The block protocol: one declaration per model family, in one table (:data:`FAMILIES`).

A :class:`Family` says how to recognise a model, which of its modules are the transformer / ConvNeXt
blocks, where a block's MLP and the norm feeding it are (the norm gives the width) and how a block is
adapted. Which methods fit a family is said by the methods (each method file in :mod:`.methods` names its
families, and why not the others a user might expect): adding a family is one declaration here, its name in
the method files that fit it, plus tests.

How a block is adapted (``swap_block``):

* ``True`` (timm / open_clip families): the block's class is swapped for a subclass whose
  forward is the backbone's plus the adapter, placed exactly as SPEC §1 says (``x + ls(mlp(n)) + adapter(n)``:
  the delta outside any layer scale); these forwards are the ones the timm tests pin bit for bit;
* ``False`` (every other family): the block's MLP module (``mlp``: it takes the normalised input ``n`` and
  returns the MLP output) gets its class swapped for a generated subclass that returns
  ``mlp(n) + adapter(n)`` (parallel), ``adapter(mlp(n))`` (serial) or HarMA's gated MGA on ``mlp(n)``.
  The delta therefore joins the MLP output *before* anything the block applies after its MLP (HF Dinov2 /
  DINOv3: ``layer_scale2``; the others have none). No forward is copied.

Methods per family: :attr:`Family.methods`; why not the others: :func:`why_not` (the error messages and the
README table).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

from torch import nn

__all__ = ["Family", "FAMILIES", "family_of", "family_by_name", "block_modules", "set_grad_checkpointing", "supported_text",
           "why_not"]


def _classes(*paths: str) -> Tuple[type, ...]:
    """Import ``"module:Class"`` paths; those whose library is missing are left out."""
    import importlib

    out = []
    for p in paths:
        mod, _, name = p.partition(":")
        try:
            out.append(getattr(importlib.import_module(mod), name))
        except (ImportError, AttributeError):
            continue
    return tuple(out)


@dataclass(frozen=True)
class Family:
    """One model family's block protocol.

    Attributes:
        name: short key (stored in adapter files, ``SUPPORTED``).
        label: what error messages and the README call it.
        models: ``"module:Class"`` paths of the top-level model classes (exact class or subclass).
        blocks: ``"module:Class"`` paths of the block classes to adapt (exact class: a subclass may change the
            forward, so it is refused).
        norm: attribute of a block holding the norm that feeds the MLP (its ``normalized_shape[0]`` is the width).
        mlp: attribute of a block holding the MLP module (input: that norm's output).
        swap_block: adapt by swapping the block's class for its subclass in ``_blocks.ADAPTED_BLOCKS`` (timm /
            open_clip), else by the generic MLP wrap.
        head: ``"timm"`` (``get_classifier`` / ``reset_classifier``), the attribute holding the classifier
            (``"classifier"``: HF ``...ForImageClassification``; ``"head"``: torchvision) or ``None``.
        attn_linears: regex over the child ``nn.Linear`` names of an attention module that LoRA adapts when
            ``LoRAConfig.modules`` keeps its default (``^qkv$``).
        attn: regex a module name must ``search`` to count as an attention module (LoRA).
        grad_ckpt: how to switch gradient checkpointing on (``"timm"``: ``set_grad_checkpointing``, ``"hf"``:
            ``gradient_checkpointing_enable``, ``None``: the model has no switch).
        hf_model_types: for HF models, the ``config.model_type`` values of the family (the model class may be any
            head class: ``ViTModel``, ``ViTForImageClassification``, ...).
    """

    name: str
    label: str
    models: Tuple[str, ...]
    blocks: Tuple[str, ...]
    norm: str = "norm2"
    mlp: str = "mlp"
    swap_block: bool = False
    head: Optional[str] = "timm"
    attn_linears: str = r"^qkv$"
    attn: str = r"(^|\.)attn$"
    grad_ckpt: Optional[str] = "timm"
    hf_model_types: Tuple[str, ...] = field(default=())

    @property
    def methods(self) -> Tuple[str, ...]:
        """The registered methods that fit this family (each method names its families)."""
        from .registry import REGISTRY

        return tuple(m.name for m in REGISTRY.values() if self.name in m.families)

    def model_classes(self) -> Tuple[type, ...]:
        return _classes(*self.models)

    def block_classes(self) -> Tuple[type, ...]:
        return _classes(*self.blocks)

    def matches(self, model: nn.Module) -> bool:
        if self.hf_model_types:
            cfg = getattr(model, "config", None)
            base = _classes("transformers:PreTrainedModel")
            return bool(base) and isinstance(model, base) and getattr(cfg, "model_type", None) in self.hf_model_types
        cls = self.model_classes()
        return bool(cls) and isinstance(model, cls)

    def block_dim(self, block: nn.Module) -> int:
        return int(getattr(block, self.norm).normalized_shape[0])


_HF = "transformers.models"
# transformers 5.x names the attention projections q_proj / k_proj / v_proj in every vision family
_HF_ATTN = dict(attn_linears=r"^(q_proj|k_proj|v_proj)$", attn=r"(^|\.)(attention|self_attn)$")

FAMILIES: Tuple[Family, ...] = (
    Family("vit", "timm VisionTransformer", ("timm.models.vision_transformer:VisionTransformer",),
           ("timm.models.vision_transformer:Block",), swap_block=True),
    Family("swin", "timm SwinTransformer", ("timm.models.swin_transformer:SwinTransformer",),
           ("timm.models.swin_transformer:SwinTransformerBlock",), swap_block=True),
    Family("convnext", "timm ConvNeXt", ("timm.models.convnext:ConvNeXt",), ("timm.models.convnext:ConvNeXtBlock",),
           norm="norm", swap_block=True),
    Family("resnet", "timm ResNet", ("timm.models.resnet:ResNet",), ()),
    Family("eva", "timm Eva (DINOv3, EVA-02)", ("timm.models.eva:Eva",), ("timm.models.eva:EvaBlock",), swap_block=True),
    Family("clip", "open_clip CLIP / CustomTextCLIP", ("open_clip:CLIP", "open_clip:CustomTextCLIP"),
           ("open_clip.transformer:ResidualAttentionBlock",), norm="ln_2", swap_block=True, head=None),
    # torchvision Swin V1 / V2 (Satlas' swin_v2_b); V2 is post-norm: its MLP takes the block's stream `x` itself
    Family("tv-swin", "torchvision SwinTransformer (V1, V2)", ("torchvision.models.swin_transformer:SwinTransformer",),
           ("torchvision.models.swin_transformer:SwinTransformerBlock", "torchvision.models.swin_transformer:SwinTransformerBlockV2"),
           head="head", grad_ckpt=None),
    # ---- Hugging Face transformers: the generic MLP wrap (every block has `mlp` fed by a norm)
    Family("hf-vit", "HF transformers ViT", (), (f"{_HF}.vit.modeling_vit:ViTLayer",), norm="layernorm_after",
           head="classifier",
           **_HF_ATTN, grad_ckpt="hf", hf_model_types=("vit",)),
    Family("hf-dinov2", "HF transformers Dinov2", (), (f"{_HF}.dinov2.modeling_dinov2:Dinov2Layer",), head="classifier",
           **_HF_ATTN, grad_ckpt="hf", hf_model_types=("dinov2",)),
    Family("hf-dinov3", "HF transformers DINOv3ViT", (), (f"{_HF}.dinov3_vit.modeling_dinov3_vit:DINOv3ViTLayer",),
           head="classifier",
           **_HF_ATTN, grad_ckpt="hf", hf_model_types=("dinov3_vit",)),
    Family("hf-swin", "HF transformers Swin", (), (f"{_HF}.swin.modeling_swin:SwinLayer",), norm="layernorm_after",
           head="classifier",
           **_HF_ATTN, grad_ckpt="hf", hf_model_types=("swin",)),
    Family("hf-convnext", "HF transformers ConvNext", (), (), head="classifier", grad_ckpt="hf", hf_model_types=("convnext",)),
    Family("hf-clip", "HF transformers CLIP", (), (f"{_HF}.clip.modeling_clip:CLIPEncoderLayer",),
           norm="layer_norm2", head=None, **_HF_ATTN, grad_ckpt="hf", hf_model_types=("clip",)),
)


def why_not(family: str, method: str):
    """Why ``method`` does not fit ``family`` (its method file says), or None."""
    from .registry import REGISTRY

    m = REGISTRY.get(method)
    return None if m is None else m.why_not.get(family)


def family_of(model: nn.Module) -> Family:
    """The model's :class:`Family`; ``TypeError`` naming the supported families otherwise."""
    for fam in FAMILIES:
        if fam.matches(model):
            return fam
    raise TypeError(
        f"rspeft_fast.inject: unsupported model {type(model).__module__}.{type(model).__name__}; supported: {supported_text()}"
    )


def block_modules(model: nn.Module) -> list:
    """The blocks of ``model`` by its family's declaration, in module order (e.g. FSDP wrap units), including the
    blocks of open_clip / HF CLIP towers and of a timm trunk inside open_clip; ``[]`` for a family without blocks."""
    fam = family_of(model)
    kinds = fam.block_classes()
    if fam.name == "clip":  # a timm ViT / Eva image trunk has timm blocks
        kinds = kinds + family_by_name("vit").block_classes() + family_by_name("eva").block_classes()
    return [m for m in model.modules() if kinds and isinstance(m, kinds)]


def set_grad_checkpointing(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch gradient checkpointing of ``model``'s blocks on (or off) the way its family does it (timm
    ``set_grad_checkpointing``, HF ``gradient_checkpointing_enable`` / ``_disable``); ``ValueError`` for a family
    with no switch."""
    fam = family_of(model)
    if fam.grad_ckpt == "hf":
        # non-reentrant: a frozen backbone's inputs need no requires_grad for the adapters' grads;
        # transformers 5.x names it activation_checkpointing_* (the old name warns)
        new = hasattr(model, "activation_checkpointing_enable")
        if enabled and new:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif enabled:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            (model.activation_checkpointing_disable if new else model.gradient_checkpointing_disable)()
    elif fam.grad_ckpt == "timm" and hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(enabled)
    else:
        raise ValueError(f"{fam.label} ({type(model).__name__}) has no gradient-checkpointing switch")
    return model


def family_by_name(name: str) -> Family:
    for fam in FAMILIES:
        if fam.name == name:
            return fam
    raise KeyError(name)


def supported_text() -> str:
    return "; ".join(f"{f.label} ({', '.join(f.methods)})" for f in FAMILIES)
