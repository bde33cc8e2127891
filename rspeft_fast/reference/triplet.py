"""HarMA's adaptive (weighted) triplet loss with hard-negative mining, eager reference (SPEC §1).

This is the memory-hungry formulation: it materialises several ``B×B`` matrices.
"""
from __future__ import annotations

import torch


def focal_weighted(c: torch.Tensor, gamma: float) -> torch.Tensor:
    """``W(c)·c`` with ``W(c) = (1 - exp(-c))^gamma``."""
    return (1 - torch.exp(-c)).pow(gamma) * c


def _max_first(cost: torch.Tensor, dim: int) -> torch.Tensor:
    """``cost.max(dim)`` values, selected at the lowest index among ties (so autograd routes the gradient
    there, whatever the device's ``max`` kernel would pick)."""
    top = cost.amax(dim=dim, keepdim=True)
    n = cost.shape[dim]
    idx = torch.arange(n, device=cost.device).view([-1 if k == dim else 1 for k in range(cost.dim())])
    hit = (cost == top) | (cost.isnan() & top.isnan())  # NaN propagates like max: the first NaN is the max
    first = torch.where(hit, idx, n).amin(dim=dim, keepdim=True)
    return cost.gather(dim, first).squeeze(dim)


def weighted_triplet_ref(
    img: torch.Tensor,
    txt: torch.Tensor,
    margin: float = 0.2,
    gamma: float = 2.0,
    max_violation: bool = False,
    ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """``img (B, D)``, ``txt (B, D)`` (L2-normalised by the caller), ``ids (B,)`` or None → scalar loss.

    ``S = img txtᵀ``, ``d = diag(S)``; ``Cs[i,j] = max(0, margin + S[i,j] - d[i])`` (row i),
    ``Ci[i,j] = max(0, margin + S[i,j] - d[j])`` (column j), both zero where ``i == j`` (or
    ``ids[i] == ids[j]``); each cost ``c`` becomes ``(1 - e^-c)^gamma · c``; with ``max_violation`` only
    the largest cost of each row of ``Cs`` and each column of ``Ci`` counts;
    ``loss = (Σ Cs + Σ Ci) / 2``. Computed in float32 at least, with autocast switched off inside (as
    PyTorch's autocast policy does for losses): under autocast the loss is float32, like the fused op's.

    Hard-mining ties (several entries equal to a row's or column's maximum, e.g. the zeros of a row with
    no violating negative, or duplicated captions) are broken explicitly: the **lowest index** wins, so
    the gradient goes to the first arg-max (the C++/CUDA kernels follow the same rule).
    """
    with torch.autocast(img.device.type, enabled=False):
        return _weighted_triplet(img, txt, margin, gamma, max_violation, ids)


def _weighted_triplet(img, txt, margin, gamma, max_violation, ids):
    dt = torch.promote_types(img.dtype, torch.float32)
    S = img.to(dt) @ txt.to(dt).t()
    d = S.diagonal()
    cost_s = (margin + S - d[:, None]).clamp(min=0)
    cost_i = (margin + S - d[None, :]).clamp(min=0)
    B = S.shape[0]
    if ids is None:
        pos = torch.eye(B, dtype=torch.bool, device=S.device)
    else:
        pos = ids[:, None] == ids[None, :]
    cost_s = focal_weighted(cost_s.masked_fill(pos, 0), gamma)
    cost_i = focal_weighted(cost_i.masked_fill(pos, 0), gamma)
    if max_violation:
        cost_s = _max_first(cost_s, dim=1)
        cost_i = _max_first(cost_i, dim=0)
    return (cost_s.sum() + cost_i.sum()) / 2


def weighted_triplet_local_ref(img, txt, row_start, row_count, margin=0.2, gamma=2.0, max_violation=False, ids=None):
    """The loss of rows/columns ``[row_start, row_start + row_count)`` of the batch ``img``, ``txt`` ``(N, D)``
    (what one rank computes under ``gather=True``: its images against every text and its texts against every
    image); materialises ``(row_count, N)`` matrices. With ``row_start = 0, row_count = N`` it equals
    :func:`weighted_triplet_ref`. Same rules as it: float32 at least, autocast off, lowest-index ties."""
    with torch.autocast(img.device.type, enabled=False):
        dt = torch.promote_types(img.dtype, torch.float32)
        x, y = img.to(dt), txt.to(dt)
        n = x.shape[0]
        loc = slice(row_start, row_start + row_count)
        d = (x[loc] * y[loc]).sum(-1)
        key = torch.arange(n, device=x.device) if ids is None else ids
        pos = key[loc][:, None] == key[None, :]
        total = 0
        for a, o in ((x[loc], y), (y[loc], x)):  # Cs rows of the local images, Ci columns of the local texts
            cost = focal_weighted((margin + a @ o.t() - d[:, None]).clamp(min=0).masked_fill(pos, 0), gamma)
            if max_violation:
                cost = _max_first(cost, dim=1)
            total = total + cost.sum()
        return total / 2
