"""E2VPT's key-value prompts (Han et al., ICCV 2023): learnable tokens appended to one block's keys and values."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class KVPrompts(nn.Module):
    """``key`` and ``value`` ``(heads, n, head_dim)`` (truncated-normal, std ``init_std``: the reference's
    ``ORIGIN_INIT=1``), appended to every sample's keys / values after the projections (SPEC §1).

    ``keep``: optional bool mask ``(n,)`` of the tokens still in use (E2VPT's token pruning; ``prune``)."""

    def __init__(self, num_heads: int, head_dim: int, num_tokens: int, init_std: float = 0.02):
        super().__init__()
        if int(num_tokens) <= 0:
            raise ValueError(f"num_tokens must be positive, got {num_tokens}")
        self.num_heads, self.head_dim, self.num_tokens = int(num_heads), int(head_dim), int(num_tokens)
        shape = (self.num_heads, self.num_tokens, self.head_dim)
        self.key = nn.Parameter(nn.init.trunc_normal_(torch.empty(shape), std=init_std))
        self.value = nn.Parameter(nn.init.trunc_normal_(torch.empty(shape), std=init_std))
        self.register_buffer("keep", torch.ones(self.num_tokens, dtype=torch.bool))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, tokens={self.num_tokens}, head_dim={self.head_dim}"

    def prune(self, keep: torch.Tensor) -> None:
        """Keep only the tokens where ``keep (n,)`` is True (E2VPT's token-level pruning; the pruned tokens stay in
        the state dict, unused, so a pruned adapter file loads into the same shapes)."""
        keep = torch.as_tensor(keep, dtype=torch.bool, device=self.keep.device)
        if keep.shape != self.keep.shape:
            raise ValueError(f"keep must have shape {tuple(self.keep.shape)}, got {tuple(keep.shape)}")
        self.keep.copy_(keep)

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple:
        """``k``, ``v`` ``(B, heads, N, head_dim)`` → ``(B, heads, N + n_kept, head_dim)`` each."""
        key, value = self.key, self.value
        if not bool(self.keep.all()):
            key, value = key[:, self.keep], value[:, self.keep]
        B = k.shape[0]
        return (torch.cat([k, key.to(k.dtype).expand(B, -1, -1, -1)], dim=2),
                torch.cat([v, value.to(v.dtype).expand(B, -1, -1, -1)], dim=2))
