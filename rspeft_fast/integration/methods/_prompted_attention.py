"""timm ``Attention.forward`` (timm 1.0.x) with the two changes the prompt methods make to it: IVPT's temperature
(the logits divided by ``tau``: ``q / tau``, the same logits) and E2VPT's key-value prompts (appended to K and V
after the projections and the q/k norms). With neither, it computes exactly what timm's forward computes."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import maybe_add_mask, resolve_self_attn_mask


def prompted_attention(attn, x: torch.Tensor, attn_mask=None, is_causal: bool = False,
                       tau: Optional[torch.Tensor] = None, kv=None) -> torch.Tensor:
    """``attn``: a timm ``Attention``; ``x (B, N, C)``; ``tau``: 0-d temperature or None; ``kv``: a
    :class:`~rspeft_fast.modules.KVPrompts` (``extend(k, v)``) or None."""
    B, N, C = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if tau is not None:
        q = q / tau.to(q.dtype)
    if kv is not None:
        if attn_mask is not None or is_causal:
            raise ValueError("E2VPT key-value prompts with an attention mask / causal attention are not supported")
        k, v = kv.extend(k, v)
    if attn.fused_attn:
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=attn.attn_drop.p if attn.training else 0.0, is_causal=is_causal)
    else:
        q = q * attn.scale
        a = q @ k.transpose(-2, -1)
        a = maybe_add_mask(a, resolve_self_attn_mask(N, a, attn_mask, is_causal))
        x = attn.attn_drop(a.softmax(dim=-1)) @ v
    x = x.transpose(1, 2).reshape(B, N, attn.attn_dim)
    x = attn.norm(x)
    if gate is not None:
        x = x * gate
    return attn.proj_drop(attn.proj(x))
