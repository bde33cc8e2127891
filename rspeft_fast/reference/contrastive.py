"""Eager oracle of HarMA's contrastive (InfoNCE) term with soft multi-positive targets (SPEC §5).

For ``img (B, D)``, ``txt (B, D)`` (L2-normalised by the caller), image ids ``ids (B,)`` (captions of one image
share its id; None: every pair its own id) and temperature ``τ``::

    S = img @ txtᵀ / τ;   P[i, j] = [ids[i] == ids[j]] / #{j' : ids[j'] == ids[i]}
    L_i2t = -1/B Σ_i Σ_j P[i, j] log softmax_j(S[i, :])
    L_t2i = -1/B Σ_j Σ_i P[j, i] log softmax_i(S[:, j])
    loss  = (L_i2t + L_t2i) / 2

Written row by row (float64 by default), for tests; :func:`rspeft_fast.ops.contrastive.contrastive_loss` is the op.
"""
from __future__ import annotations

import torch

__all__ = ["contrastive_loss_ref"]


def contrastive_loss_ref(img: torch.Tensor, txt: torch.Tensor, ids=None, temperature=0.07, dtype=torch.float64) -> torch.Tensor:
    """Scalar in ``dtype`` (float64: the oracle; a low dtype: eager PyTorch computing in that dtype, the error
    baseline of the tolerance rule); differentiable in ``img``, ``txt`` and a tensor ``temperature``."""
    b = img.shape[0]
    ids = torch.arange(b) if ids is None else torch.as_tensor(ids).cpu()
    img, txt = img.to(dtype), txt.to(dtype)
    tau = temperature.to(dtype) if isinstance(temperature, torch.Tensor) else float(temperature)
    s = img @ txt.t() / tau
    i2t = s.new_zeros(())
    t2i = s.new_zeros(())
    for i in range(b):
        pos = (ids == ids[i]).to(dtype).to(s.device)
        p = pos / pos.sum()
        i2t = i2t - (p * torch.log_softmax(s[i, :], 0)).sum()
        t2i = t2i - (p * torch.log_softmax(s[:, i], 0)).sum()
    return (i2t + t2i) / (2 * b)
