"""HarMA's gated multimodal adapter (MGAdapter) and its shared BiShareAdapter."""
from __future__ import annotations

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from .._impl import impl_property
from .._validate import check_float, check_last_dim, check_matching_dtypes
from ..reference.mga import bishare_ref

GATE_INIT = 0.6


def _attn_tensors(attn: nn.MultiheadAttention) -> dict:
    return {
        "in_proj_weight": attn.in_proj_weight,
        "in_proj_bias": attn.in_proj_bias,
        "out_proj_weight": attn.out_proj.weight,
        "out_proj_bias": attn.out_proj.bias,
    }


def _check_mask(mask, x):
    if mask is None:
        return
    if mask.shape != x.shape[:2]:
        raise ValueError(f"key_padding_mask must have shape (B, L) = {tuple(x.shape[:2])}, got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be bool (True = padded key), got {mask.dtype}")


class BiShareAdapter(nn.Module):
    """``a = sigmoid(gate); z = down(x); x + up(a * MSA(z) + (1 - a) * z)``.

    ``down: hidden → hidden/2``, ``up: hidden/2 → hidden`` (zero-init), ``attn`` an
    ``nn.MultiheadAttention(hidden/2, heads)`` used as the parameter container, scalar ``gate`` (0.6).
    ``x (B, L, hidden)`` → ``(B, L, hidden)``. Standalone it runs the eager reference; inside an
    :class:`MGAdapter` (``share=``) it runs with the adapter's implementation (the fused MGA kernels
    compute it between the two MSA calls), so it has no ``impl`` of its own.
    """

    def __init__(self, hidden: int = 128, heads: int = 8):
        super().__init__()
        if hidden % 2 or (hidden // 2) % heads:
            raise ValueError(f"BiShareAdapter: hidden/2 = {hidden / 2} must be an integer divisible by heads={heads}")
        self.hidden = int(hidden)
        self.heads = int(heads)
        h2 = self.hidden // 2
        self.down = nn.Linear(self.hidden, h2)
        self.up = nn.Linear(h2, self.hidden)
        self.attn = nn.MultiheadAttention(h2, self.heads, batch_first=True)
        self.gate = nn.Parameter(torch.tensor(GATE_INIT))
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def tensors(self) -> dict:
        """The tensors the reference/fused ops take, keyed as ``bishare_ref``'s arguments."""
        return {
            "down_weight": self.down.weight,
            "down_bias": self.down.bias,
            "up_weight": self.up.weight,
            "up_bias": self.up.bias,
            "attn": _attn_tensors(self.attn),
            "gate": self.gate,
            "heads": self.heads,
        }

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        check_float(x, "x")
        check_last_dim(x, self.hidden, "x")
        _check_mask(key_padding_mask, x)
        check_matching_dtypes("BiShareAdapter", x, *_linear_dtypes(self))
        return bishare_ref(x, key_padding_mask=key_padding_mask, **self.tensors())


class MGAdapter(nn.Module):
    """HarMA's gated multimodal adapter; returns ``x + adapter(x)``.

    ``z = GELU(down(x)); m = z; z = MSA(z); if share: z = share(z); z = MSA(z)``;
    ``a = sigmoid(gate); x + up(a * m + (1 - a) * z)``. ``down: dim → hidden``, ``up: hidden → dim``
    (zero-init), ``attn = nn.MultiheadAttention(hidden, heads)`` (its parameters, used twice), scalar
    ``gate`` (0.6), ``share`` an optional :class:`BiShareAdapter` (may be shared across adapters).

    Forward: ``x (B, L, dim)``, optional ``key_padding_mask (B, L)`` bool (True = padded) → ``(B, L, dim)``.
    ``impl``: ``"auto" | "reference" | "triton"`` (validated here; ``"auto"`` runs the Triton kernels on CUDA
    inside their limits, ``kernels.mga.why_unsupported``, else the reference with one warning per limit).
    Dtypes as eager PyTorch: outside autocast ``x`` and the weights share one dtype (TypeError otherwise).
    """

    impl = impl_property("mga")

    def __init__(self, dim: int, hidden: int = 128, heads: int = 8, share: BiShareAdapter | None = None, impl: str = "auto"):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"MGAdapter: hidden={hidden} must be divisible by heads={heads}")
        if share is not None and share.hidden != hidden:
            raise ValueError(f"MGAdapter: share.hidden={share.hidden} must equal hidden={hidden}")
        self.dim = int(dim)
        self.hidden = int(hidden)
        self.heads = int(heads)
        self.impl = impl
        self.down = nn.Linear(self.dim, self.hidden)
        self.up = nn.Linear(self.hidden, self.dim)
        self.attn = nn.MultiheadAttention(self.hidden, self.heads, batch_first=True)
        self.gate = nn.Parameter(torch.tensor(GATE_INIT))
        self.share = share
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}, heads={self.heads}, impl={self.impl!r}"

    def _check(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> None:
        check_float(x, "x")
        if x.dim() != 3:
            raise ValueError(f"MGAdapter expects x of shape (B, L, {self.dim}), got {tuple(x.shape)}")
        check_last_dim(x, self.dim, "x")
        _check_mask(key_padding_mask, x)
        check_matching_dtypes("MGAdapter", x, *_linear_dtypes(self))
        if self.share is not None:
            check_matching_dtypes("MGAdapter (share)", x, *_linear_dtypes(self.share))

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        from ..ops import mga as ops_mga

        share = self.share.tensors() if self.share is not None else None
        args = (x, self.down.weight, self.down.bias, self.up.weight, self.up.bias, _attn_tensors(self.attn), self.gate,
                self.heads, share, key_padding_mask, self.impl)
        if torch.compiler.is_compiling() or isinstance(x, FakeTensor):
            self._check(x, key_padding_mask)
            return ops_mga.mga(*args[:8], share=share, key_padding_mask=key_padding_mask, impl=self.impl)
        # eager: the checks run once per key of the op's plan cache (shapes, dtypes, devices, autocast)
        return ops_mga.mga_eager(*args, lambda: self._check(x, key_padding_mask))


def _linear_dtypes(m: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The weights an adapter multiplies with its input (eager F.linear / MHA require x's dtype for them)."""
    return [("down.weight", m.down.weight), ("down.bias", m.down.bias), ("up.weight", m.up.weight),
            ("up.bias", m.up.bias), ("attn.in_proj_weight", m.attn.in_proj_weight),
            ("attn.out_proj.weight", m.attn.out_proj.weight)]
