"""Adapted versions of the backbone blocks we inject into.

Injection keeps every backbone module where it is (so the backbone's state-dict keys are unchanged and
a backbone checkpoint still loads) and swaps the class of the adapted module for a subclass defined
here, whose ``forward`` is the backbone's own computation plus the adapter. The adapter lives as a
child module (``<block>.adapter``; the MGA block gate is ``<block>.adapter_gate``). Every adapted
module has a plain bool attribute ``adapter_enabled``; when False the forward is exactly the
backbone's.

The forwards mirror timm 1.0.x / open_clip 3.x; ``tests/test_inject.py`` checks that an adapted model
at initialisation returns exactly what the backbone returns. Every BatchNorm gets a subclass too, whose ``train()``
keeps it in eval mode while it is frozen (:func:`keep_frozen_batchnorm_in_eval`).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from timm.models.convnext import ConvNeXtBlock, ConvNeXtStage
from timm.models.eva import EvaBlock
from timm.models.swin_transformer import SwinTransformerBlock
from timm.models.vision_transformer import Block as ViTBlock

try:  # open_clip is optional
    from open_clip.transformer import ResidualAttentionBlock as ClipBlock
except Exception:  # pragma: no cover - depends on the environment
    ClipBlock = None


class TextMaskContext:
    """Holds the text key padding mask of the forward pass in flight (set by a pre-hook on the text
    tower's token embedding, cleared by a hook after the text transformer).

    Each adapted block also keys the mask by its own input tensor (:meth:`for_input`): gradient
    checkpointing recomputes a block in the backward pass, after the hook has cleared ``mask``, with the
    same input tensor object (``use_reentrant=False``, open_clip's and timm's choice); the recomputation finds
    the mask of the forward that produced that input. An entry lives as long as its input tensor."""

    def __init__(self):
        self.mask = None
        self._by_input = {}

    def for_input(self, x: torch.Tensor):
        """The mask for the block input ``x``: the pass in flight's (remembered for ``x``), or the one
        remembered when ``x`` was first seen (a checkpoint recomputation)."""
        if torch.compiler.is_compiling():  # Dynamo cannot trace id()/weakref bookkeeping; no recompute there
            return self.mask
        key = id(x)
        if self.mask is not None:
            if key not in self._by_input:
                weakref.finalize(x, self._by_input.pop, key, None)
            self._by_input[key] = (weakref.ref(x), self.mask)
            return self.mask
        hit = self._by_input.get(key)
        if hit is not None and hit[0]() is x:
            return hit[1]
        return None


def set_text_mask(ctx: TextMaskContext, pad_id: int, module, args):
    text = args[0]
    ctx.mask = (text == pad_id) if isinstance(text, torch.Tensor) and not text.is_floating_point() else None


def clear_text_mask(ctx: TextMaskContext, module, args, output):
    ctx.mask = None


def hf_layer_text_mask(ctx: TextMaskContext, module, args, kwargs):
    """Pre-hook on an HF CLIP text encoder layer: the key padding mask ``(B, L)`` (True = padded) from the
    layer's own ``attention_mask`` (additive float or bool, ``(B, 1, L, L)``, causal and padding combined).
    The last query row of a causal mask sees every key, so a key masked there is padding. The hook runs at
    every call of the layer, so a checkpoint recomputation sees the same mask."""
    am = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    if not isinstance(am, torch.Tensor) or am.dim() != 4:
        mask = None
    else:  # no data-dependent test here (torch.compile would graph-break): an all-False mask means no padding
        row = am[:, 0, -1, :]
        mask = ~row if row.dtype == torch.bool else row < torch.finfo(row.dtype).min / 2
        x = args[0] if args else kwargs.get("hidden_states")
        if isinstance(x, torch.Tensor) and mask.shape[0] == 1 and x.shape[0] != 1:
            mask = mask.expand(x.shape[0], -1)  # a mask broadcast over the batch
    module.adapter_text_mask = mask
    return None


def _mlp_branch(block, x: torch.Tensor, norm, mlp, post, x_in=None) -> torch.Tensor:
    """``x + post(mlp(norm(x)))`` with the block's adapter (``block.adapter_kind``) applied; ``x_in``: the
    block's input (the key of the MGA text mask under checkpoint recomputation; default ``x``)."""
    x_in = x if x_in is None else x_in
    adapter = getattr(block, "adapter", None)
    if adapter is None or not block.adapter_enabled:
        return x + post(mlp(norm(x)))
    kind = block.adapter_kind
    n = norm(x)
    if kind == "parallel":
        # x + mlp-path + adapter(n): the adapter adds its delta to the residual sum in its epilogue
        return adapter(n, base=x + post(mlp(n)))
    y = mlp(n)
    if kind == "serial":
        # base: a view, not y itself (same values, free): Dynamo graph-breaks on an autograd.Function given
        # the same tensor twice ("duplicate tensor input"), which the fused MuFA op would otherwise get
        y = adapter(y, base=y.view_as(y))
    elif kind == "mga":
        ctx = getattr(block, "adapter_text_ctx", None)
        y = _gated_mga(block, y, ctx.for_input(x_in) if ctx is not None else None)
    else:  # pragma: no cover - guarded at injection
        raise RuntimeError(f"unknown adapter kind {kind!r}")
    return x + post(y)


def _gated_mga(holder, y: torch.Tensor, mask) -> torch.Tensor:
    """HarMA: ``y = b*MGA(y) + (1-b)*y``, written as ``y + b*(MGA(y) - y)`` (same maths; exactly y at init);
    ``b = sigmoid(holder.adapter_gate)``; ``mask (B, L)`` bool, True at padded text tokens, or None."""
    b = torch.sigmoid(holder.adapter_gate).to(y.dtype)
    seq_first = getattr(holder, "adapter_seq_first", False)
    yb = y.transpose(0, 1) if seq_first else y
    if mask is not None and mask.shape != yb.shape[:2]:
        raise RuntimeError(
            f"MGA text padding mask of shape {tuple(mask.shape)} does not match the text tokens {tuple(yb.shape[:2])}; "
            "inject with MGAConfig(text_padding_mask=False) for this model"
        )
    m = holder.adapter(yb, key_padding_mask=mask)
    m = m.transpose(0, 1) if seq_first else m
    return y + b * (m - y)


def adapt_mlp_output(holder, n: torch.Tensor, y: torch.Tensor, mask=None) -> torch.Tensor:
    """The generic placement (families without a class-swapped block): ``n`` the MLP input, ``y`` its output;
    returns the adapted MLP output (``holder`` carries ``adapter``, ``adapter_kind`` and, for MGA, the gate)."""
    kind = holder.adapter_kind
    if kind == "parallel":
        return holder.adapter(n, base=y)
    if kind == "serial":
        return holder.adapter(y, base=y.view_as(y))  # a view: see _mlp_branch
    if kind == "mga":
        return _gated_mga(holder, y, mask)
    raise RuntimeError(f"unknown adapter kind {kind!r}")  # pragma: no cover - guarded at injection


def _adapted_mlp_forward(self, x, *args, **kwargs):
    y = self._rspeft_base_cls.forward(self, x, *args, **kwargs)
    # the adapter and its switches live on the block (``holder``), not on the MLP: an MLP that is an
    # nn.Sequential (torchvision, open_clip) would otherwise run the adapter as one more layer
    holder = self.__dict__.get("_rspeft_holder")
    if holder is None or getattr(holder, "adapter", None) is None or not holder.adapter_enabled:
        return y
    mask = holder.__dict__.get("adapter_text_mask") if getattr(holder, "adapter_text_ctx", None) is not None else None
    return adapt_mlp_output(holder, x, y, mask)


def wrap_mlp(mlp: nn.Module, holder: nn.Module) -> None:
    """Swap ``mlp``'s class for its adapted subclass, reading the adapter from ``holder`` (its block; a plain
    attribute, not a registered child: the module tree and state-dict keys stay as they are)."""
    mlp.__class__ = adapted_mlp_class(type(mlp))
    object.__setattr__(mlp, "_rspeft_holder", holder)


_ADAPTED_MLP_CLASSES: dict = {}


def adapted_mlp_class(cls: type) -> type:
    """A subclass of the MLP class ``cls`` whose forward adds the adapter (one class per ``cls``, cached;
    state-dict keys unchanged: the MLP's own children stay where they are)."""
    if cls not in _ADAPTED_MLP_CLASSES:
        _ADAPTED_MLP_CLASSES[cls] = type(
            f"Adapted{cls.__name__}", (cls,),
            {"forward": _adapted_mlp_forward, "_rspeft_base_cls": cls, "__module__": __name__,
             "__doc__": f"{cls.__name__} with an rspeft_fast adapter on its output (see _blocks.adapt_mlp_output)."},
        )
    return _ADAPTED_MLP_CLASSES[cls]


class AdaptedViTBlock(ViTBlock):
    """timm ``vision_transformer.Block`` with an adapter on its MLP branch."""

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        return _mlp_branch(self, x, self.norm2, self.mlp, lambda y: self.drop_path2(self.ls2(y)))


class AdaptedEvaBlock(EvaBlock):
    """timm ``eva.EvaBlock`` (DINOv3, EVA-02: RoPE, SwiGLU / GluMlp, layer scale) with an adapter on its MLP
    branch; the delta is added outside the layer scale ``gamma_2``, as on the other timm blocks."""

    def forward(self, x: torch.Tensor, rope=None, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        x_attn = self.attn(self.norm1(x), rope=rope, attn_mask=attn_mask, is_causal=is_causal)
        if self.gamma_1 is not None:
            x_attn = self.gamma_1 * x_attn
        x = x + self.drop_path1(x_attn)
        g2 = self.gamma_2
        post = self.drop_path2 if g2 is None else (lambda y: self.drop_path2(g2 * y))
        return _mlp_branch(self, x, self.norm2, self.mlp, post)


class AdaptedSwinBlock(SwinTransformerBlock):
    """timm ``SwinTransformerBlock`` with an adapter on its MLP branch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = x + self.drop_path1(self._attn(self.norm1(x)))
        x = x.reshape(B, -1, C)
        x = _mlp_branch(self, x, self.norm2, self.mlp, self.drop_path2)
        return x.reshape(B, H, W, C)


class AdaptedConvNeXtBlock(ConvNeXtBlock):
    """timm ``ConvNeXtBlock`` with EQAM parallel to its MLP on the channels-last normalised features:
    ``out = block(x) + EQAM(norm(conv_dw(x)))`` (the delta is added outside the layer scale ``gamma``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        adapter = getattr(self, "adapter", None)
        active = adapter is not None and self.adapter_enabled
        shortcut = x
        x = self.conv_dw(x)
        if self.use_conv_mlp:
            n = self.norm(x)
            x = self.mlp(n)
            n_cl = n.permute(0, 2, 3, 1) if active else None
        else:
            x = x.permute(0, 2, 3, 1)
            n = self.norm(x)
            n_cl = n
            x = self.mlp(n)
            x = x.permute(0, 3, 1, 2)
        if self.gamma is not None:
            x = x.mul(self.gamma.reshape(1, -1, 1, 1))
        x = self.drop_path(x) + self.shortcut(shortcut)
        if active:
            x = x + adapter(n_cl).permute(0, 3, 1, 2)
        return x


class AdaptedConvNeXtStage(ConvNeXtStage):
    """timm ``ConvNeXtStage`` followed by CAPM on its output feature map ``(B, C, H, W)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        capm = getattr(self, "capm", None)
        if capm is not None and self.adapter_enabled:
            x = capm(x)
        return x


if ClipBlock is not None:

    class AdaptedClipBlock(ClipBlock):
        """open_clip ``ResidualAttentionBlock`` with HarMA's gated MGA after its MLP."""

        def forward(self, q_x: torch.Tensor, k_x=None, v_x=None, attn_mask=None):
            k_x = self.ln_1_kv(k_x) if hasattr(self, "ln_1_kv") and k_x is not None else None
            v_x = self.ln_1_kv(v_x) if hasattr(self, "ln_1_kv") and v_x is not None else None
            x = q_x + self.ls_1(self.attention(q_x=self.ln_1(q_x), k_x=k_x, v_x=v_x, attn_mask=attn_mask))
            return _mlp_branch(self, x, self.ln_2, self.mlp, self.ls_2, x_in=q_x)

else:  # pragma: no cover
    AdaptedClipBlock = None


def _lora_delta(mod: nn.Module, a: str, b: str) -> torch.Tensor:
    """``scaling * B A`` of the factors ``a`` / ``b`` of ``mod`` (in the weights' dtype; autograd flows)."""
    return (getattr(mod, b) @ getattr(mod, a)) * mod.lora_scaling


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus a low-rank update: ``x Wᵀ + b + scaling * (drop(x) Aᵀ) Bᵀ`` (``B`` zero-init; HF peft's
    ``lora.Linear`` forward, same op order). After ``merge_lora(keep=True)`` the weight holds ``W + scaling B A``
    and the branch is skipped; the pre-merge weight is kept (``lora_premerge``) so unmerging is exact."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        premerge = self.__dict__.get("lora_premerge")
        if premerge is not None:  # merged, factors kept
            return F.linear(x, self.weight if self.adapter_enabled else premerge, self.bias)
        out = F.linear(x, self.weight, self.bias)
        if not self.adapter_enabled or "lora_A" not in self._parameters:  # off, or another named adapter is active
            return out
        p = self.lora_dropout
        x = F.dropout(x, p, self.training) if p > 0 else x
        return out + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.lora_scaling


class LoRAConv1x1(nn.Conv2d):
    """A 1×1 ``nn.Conv2d`` (a linear map per pixel) plus LoRA, as HF peft's ``lora.Conv2d``: ``A`` a 1×1 conv with
    the base's stride and padding, ``B`` a 1×1 conv; factors ``(rank, in, 1, 1)`` / ``(out, rank, 1, 1)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        premerge = self.__dict__.get("lora_premerge")
        if premerge is not None:
            return self._conv_forward(x, self.weight if self.adapter_enabled else premerge, self.bias)
        out = self._conv_forward(x, self.weight, self.bias)
        if not self.adapter_enabled or "lora_A" not in self._parameters:
            return out
        p = self.lora_dropout
        x = F.dropout(x, p, self.training) if p > 0 else x
        return out + F.conv2d(F.conv2d(x, self.lora_A, None, self.stride, self.padding), self.lora_B) * self.lora_scaling


class LoRAMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with LoRA on its packed ``in_proj`` (``lora_A`` / ``lora_B`` here) and / or its
    ``out_proj`` (a :class:`LoRALinear` child). ``F.multi_head_attention_forward`` reads the weights directly and
    never calls ``out_proj``, so the update runs as weights ``W + scaling B A`` (HF peft's MHA LoRA does the same:
    no dropout on this branch); the reference is :func:`rspeft_fast.reference.lora_mha_ref`."""

    def _lora_weights(self):
        w_in = self.in_proj_weight
        if "lora_A" in self._parameters and "lora_premerge" not in self.__dict__:
            w_in = w_in + _lora_delta(self, "lora_A", "lora_B")
        o = self.out_proj
        w_out = o.weight
        if isinstance(o, LoRALinear) and "lora_premerge" not in o.__dict__:
            w_out = w_out + _lora_delta(o, "lora_A", "lora_B")
        return w_in, w_out

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not self.adapter_enabled:
            pre_in = self.__dict__.get("lora_premerge")
            pre_out = self.out_proj.__dict__.get("lora_premerge")
            if pre_in is None and pre_out is None:
                return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                       average_attn_weights, is_causal)
            w_in = self.in_proj_weight if pre_in is None else pre_in
            w_out = self.out_proj.weight if pre_out is None else pre_out
        else:
            w_in, w_out = self._lora_weights()
        batched = query.dim() == 3
        if self.batch_first and batched:  # keep the "is" identities F.multi_head_attention_forward tests
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (t.transpose(1, 0) for t in (query, key))
                    value = key
            else:
                query, key, value = (t.transpose(1, 0) for t in (query, key, value))
        out, weights = F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, w_in, self.in_proj_bias, self.bias_k, self.bias_v,
            self.add_zero_attn, self.dropout, w_out, self.out_proj.bias, training=self.training,
            key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            average_attn_weights=average_attn_weights, is_causal=is_causal)
        if self.batch_first and batched:
            out = out.transpose(1, 0)
        return out, weights


LORA_INITS = ("kaiming", "gaussian")


def _add_factors(mod: nn.Module, in_features: int, out_features: int, rank: int, init: str, like: torch.Tensor) -> None:
    dd = {"device": like.device, "dtype": like.dtype}
    mod.lora_A = nn.Parameter(torch.empty(rank, in_features, **dd))
    mod.lora_B = nn.Parameter(torch.zeros(out_features, rank, **dd))
    if init == "gaussian":  # peft's init_lora_weights="gaussian"
        nn.init.normal_(mod.lora_A, std=1.0 / rank)
    else:  # peft's default (init_lora_weights=True): nn.Linear's own init of A
        nn.init.kaiming_uniform_(mod.lora_A, a=5**0.5)


def make_lora(lin: nn.Linear, rank: int, alpha: float, *, dropout: float = 0.0, rslora: bool = False,
              init: str = "kaiming", inside_mha: bool = False) -> LoRALinear:
    """Give ``lin`` (a plain ``nn.Linear``; MHA's ``out_proj`` subclass with ``inside_mha``) LoRA factors; its
    class becomes :class:`LoRALinear` (``unload_adapters`` restores it). ``scaling`` is ``alpha / rank``
    (``alpha / sqrt(rank)`` with ``rslora``)."""
    if type(lin) not in (nn.Linear, LoRALinear) and not (inside_mha and isinstance(lin, nn.Linear)):
        raise TypeError(f"LoRA adapts plain nn.Linear modules, got {type(lin).__name__}")
    _add_factors(lin, lin.in_features, lin.out_features, rank, init, lin.weight)
    lin.__class__ = LoRALinear
    lin.lora_scaling = lora_scaling(rank, alpha, rslora)
    lin.lora_dropout = float(dropout)
    lin.adapter_enabled = True
    return lin


def make_lora_conv(conv: nn.Conv2d, rank: int, alpha: float, *, dropout: float = 0.0, rslora: bool = False,
                   init: str = "kaiming") -> LoRAConv1x1:
    """LoRA on a 1×1 ``nn.Conv2d`` (groups 1, zero padding mode); see :class:`LoRAConv1x1`."""
    if (type(conv) not in (nn.Conv2d, LoRAConv1x1) or tuple(conv.kernel_size) != (1, 1) or conv.groups != 1
            or conv.padding_mode != "zeros"):
        raise TypeError(f"LoRA adapts 1x1 nn.Conv2d layers (groups 1), where a convolution is a linear map; got "
                        f"{type(conv).__name__} kernel {tuple(conv.kernel_size)} groups {conv.groups}")
    _add_factors(conv, conv.in_channels, conv.out_channels, rank, init, conv.weight)
    with torch.no_grad():
        conv.lora_A = nn.Parameter(conv.lora_A[:, :, None, None].contiguous())
        conv.lora_B = nn.Parameter(conv.lora_B[:, :, None, None].contiguous())
    conv.__class__ = LoRAConv1x1
    conv.lora_scaling = lora_scaling(rank, alpha, rslora)
    conv.lora_dropout = float(dropout)
    conv.adapter_enabled = True
    return conv


def make_lora_mha(mha: nn.MultiheadAttention, in_proj: bool, out_proj: bool, rank: int, alpha: float, *,
                  rslora: bool = False, init: str = "kaiming") -> LoRAMultiheadAttention:
    """LoRA on ``mha``'s packed ``in_proj`` and / or its ``out_proj`` (see :class:`LoRAMultiheadAttention`)."""
    if type(mha) not in (nn.MultiheadAttention, LoRAMultiheadAttention) or not mha._qkv_same_embed_dim:
        raise TypeError("LoRA adapts nn.MultiheadAttention with the packed in_proj (kdim = vdim = embed_dim), got "
                        f"{type(mha).__name__}")
    if in_proj:
        _add_factors(mha, mha.embed_dim, 3 * mha.embed_dim, rank, init, mha.in_proj_weight)
    if out_proj:
        make_lora(mha.out_proj, rank, alpha, rslora=rslora, init=init, inside_mha=True)
    mha.__class__ = LoRAMultiheadAttention
    mha.lora_scaling = lora_scaling(rank, alpha, rslora)
    mha.adapter_enabled = True
    return mha


def lora_scaling(rank: int, alpha: float, rslora: bool) -> float:
    return float(alpha) / (float(rank) ** 0.5 if rslora else float(rank))


def _lora_holders(mod: nn.Module):
    """The modules of ``mod`` (itself, an MHA's ``out_proj``) that hold LoRA factors."""
    out = [mod] if "lora_A" in mod._parameters else []
    if isinstance(mod, LoRAMultiheadAttention) and isinstance(mod.out_proj, LoRALinear):
        out.append(mod.out_proj)
    return out


def merge_lora(mod: nn.Module, keep: bool = False) -> None:
    """``W += scaling * B A`` in a :class:`LoRALinear` / :class:`LoRAMultiheadAttention`. ``keep``: the factors
    stay and the pre-merge weights are kept for :func:`unmerge_lora`; else the factors are removed and the class
    is the plain one again."""
    for h in _lora_holders(mod):
        w = h.in_proj_weight if isinstance(h, nn.MultiheadAttention) else h.weight
        if "lora_premerge" in h.__dict__:
            continue  # merged already
        with torch.no_grad():
            if keep:
                h.lora_premerge = w.detach().clone()
            delta = (h.lora_B.float().flatten(1) @ h.lora_A.float().flatten(1)) * h.lora_scaling
            w.add_(delta.reshape(w.shape).to(w.dtype))  # a 1x1 conv: (out, in) -> (out, in, 1, 1)
    if not keep:
        strip_lora(mod)


def unmerge_lora(mod: nn.Module) -> None:
    """Undo :func:`merge_lora` ``(keep=True)``: the weights are the pre-merge ones again, bit for bit."""
    for h in _lora_holders(mod):
        pre = h.__dict__.pop("lora_premerge", None)
        if pre is not None:
            w = h.in_proj_weight if isinstance(h, nn.MultiheadAttention) else h.weight
            with torch.no_grad():
                w.copy_(pre)


_LORA_TENSORS = ("lora_A", "lora_B")
_LORA_VALUES = ("lora_scaling", "lora_dropout")


def stash_lora(mod: nn.Module, name: str) -> None:
    """Move ``mod``'s active LoRA factors (and their scaling / dropout) aside under ``name`` (a plain attribute
    ``lora_stash``: out of the module tree, the state dict and the optimiser's reach)."""
    if "lora_A" not in mod._parameters:
        return
    if "lora_premerge" in mod.__dict__:
        raise RuntimeError("a merged LoRA adapter cannot be switched; unmerge_adapters first")
    entry = {k: mod._parameters.pop(k) for k in _LORA_TENSORS}
    entry.update({k: mod.__dict__[k] for k in _LORA_VALUES if k in mod.__dict__})
    mod.__dict__.setdefault("lora_stash", {})[name] = entry


def unstash_lora(mod: nn.Module, name: str) -> None:
    """Make the factors stashed under ``name`` the active ones (moved to the weights' device)."""
    entry = mod.__dict__.get("lora_stash", {}).pop(name, None)
    if entry is None:
        return
    dev = (mod.in_proj_weight if isinstance(mod, nn.MultiheadAttention) else mod.weight).device
    for k in _LORA_TENSORS:
        p = entry[k]
        mod._parameters[k] = p if p.device == dev else nn.Parameter(p.detach().to(dev), requires_grad=p.requires_grad)
    for k in _LORA_VALUES:
        if k in entry:
            mod.__dict__[k] = entry[k]


def strip_lora(mod: nn.Module) -> None:
    """Remove the LoRA factors and attributes of ``mod`` and give it back its plain class (weights as they are)."""
    for h in _lora_holders(mod) + [mod]:
        for pn in ("lora_A", "lora_B"):
            h._parameters.pop(pn, None)
        for a in ("lora_scaling", "lora_dropout", "lora_premerge", "lora_stash", "adapter_enabled"):
            h.__dict__.pop(a, None)
    if isinstance(mod, LoRAMultiheadAttention):
        if isinstance(mod.out_proj, LoRALinear):
            mod.out_proj.__class__ = NonDynamicallyQuantizableLinear
        mod.__class__ = nn.MultiheadAttention
    elif isinstance(mod, LoRALinear):
        mod.__class__ = nn.Linear
    elif isinstance(mod, LoRAConv1x1):
        mod.__class__ = nn.Conv2d


# -- VPT on a timm VisionTransformer (forward hooks; the prompts are ``model.vpt_prompts (depth|1, n, d)``) --

def vpt_insert(model, module, args, output):
    """After ``norm_pre``: insert the (first) prompts after the prefix tokens."""
    if not model.adapter_enabled:
        return output
    p = model.vpt_prompts[0].to(output.dtype).expand(output.shape[0], -1, -1)
    k = model.num_prefix_tokens
    return torch.cat([output[:, :k], p, output[:, k:]], dim=1)


def vpt_replace(model, layer: int, module, args):
    """Before block ``layer`` (deep VPT): replace the prompt tokens with that layer's prompts."""
    if not model.adapter_enabled:
        return None
    x = args[0]
    n = model.vpt_prompts.shape[1]
    k = model.num_prefix_tokens
    p = model.vpt_prompts[layer].to(x.dtype).expand(x.shape[0], -1, -1)
    return (torch.cat([x[:, :k], p, x[:, k + n :]], dim=1),) + tuple(args[1:])


def vpt_remove(model, module, args):
    """Before the final norm: drop the prompt tokens."""
    if not model.adapter_enabled:
        return None
    x = args[0]
    n = model.vpt_prompts.shape[1]
    k = model.num_prefix_tokens
    return (torch.cat([x[:, :k], x[:, k + n :]], dim=1),) + tuple(args[1:])


# -- frozen BatchNorm stays in eval mode (its running statistics belong to the frozen backbone) --

def _norm_train(self, mode: bool = True):
    own = list(self.parameters(recurse=False))
    tuned = any(p.requires_grad for p in own) if own else self.__dict__.get("rspeft_stats_train", False)
    return self._rspeft_base_cls.train(self, bool(mode) and tuned)


_FROZEN_NORM_CLASSES: dict = {}


def keep_frozen_batchnorm_in_eval(model: nn.Module, stats_train_without_params: bool) -> None:
    """Swap the class of every BatchNorm in ``model`` for a subclass whose ``train(mode)`` sets the mode only
    while one of its parameters requires grad (a BatchNorm without parameters: ``stats_train_without_params``,
    True under ``full``); a frozen BatchNorm stays in eval mode, so its running statistics are not updated and
    the forward uses them. ``Module.train`` reaches it from any parent (DDP, torch.compile's wrapper included);
    state-dict keys do not change. Applied at once to the model's current mode."""
    for m in model.modules():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        cls = type(m)
        if "_rspeft_base_cls" not in cls.__dict__:
            if cls not in _FROZEN_NORM_CLASSES:
                _FROZEN_NORM_CLASSES[cls] = type(
                    cls.__name__, (cls,),
                    {"train": _norm_train, "_rspeft_base_cls": cls, "__module__": __name__,
                     "__doc__": f"{cls.__name__} that stays in eval mode while its parameters are frozen (rspeft_fast)."})
            m.__class__ = _FROZEN_NORM_CLASSES[cls]
        m.rspeft_stats_train = bool(stats_train_without_params)
        m.train(m.training)


# block class -> its class-swap subclass (the families with ``swap_block=True``)
ADAPTED_BLOCKS = {
    ViTBlock: AdaptedViTBlock,
    SwinTransformerBlock: AdaptedSwinBlock,
    EvaBlock: AdaptedEvaBlock,
    ConvNeXtBlock: AdaptedConvNeXtBlock,
}
if ClipBlock is not None:
    ADAPTED_BLOCKS[ClipBlock] = AdaptedClipBlock
