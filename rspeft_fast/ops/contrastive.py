"""HarMA's contrastive term: InfoNCE over ``img @ txtᵀ / τ`` with soft multi-positive targets, both directions.

Maths (SPEC §5; the oracle is :func:`rspeft_fast.reference.contrastive.contrastive_loss_ref`): captions of one
image are positives of each other — the target row of image ``i`` spreads its mass evenly over every caption
with ``ids == ids[i]`` (ALBEF / HarMA ``sim_targets``), and symmetrically for the text → image direction.

There is no fused kernel: the ``(B, B)`` logits are small beside the towers (214² at HarMA's batch), so this is
plain PyTorch — one GEMM, ``log_softmax`` and a masked sum per direction, computed in float32 with autocast
off (as PyTorch's autocast policy runs losses), whatever the features' dtype.

Distributed (``gather=True``): features and ids of every rank are all-gathered with gradients flowing back to
the local shard (``torch.distributed.nn.functional.all_gather``, as open_clip's ``gather_with_grad``); each
rank computes the mean over its own rows (its images against every caption, its captions against every
image). With equal per-rank batches the mean of the ranks' losses is the loss of the gathered batch, and DDP's
gradient averaging gives its gradient (contrast :func:`~rspeft_fast.ops.triplet.weighted_triplet_loss`, whose
per-rank losses *sum* to the global one).
"""
from __future__ import annotations

import torch

__all__ = ["contrastive_loss"]


def _gather(x: torch.Tensor) -> torch.Tensor:
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), 0)


def _gather_ids(ids: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    parts = [torch.empty_like(ids) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, ids.contiguous())
    return torch.cat(parts, 0)


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, ids=None, temperature=0.07, gather: bool = False) -> torch.Tensor:
    """Symmetric soft-target InfoNCE: ``img (B, D)``, ``txt (B, D)`` (L2-normalised by the caller; pair ``i`` is
    image ``i`` and a caption of it), ``ids (B,)`` int image ids (None: pairs are the only positives),
    ``temperature`` a float or a 0-d tensor (learnable: gradients flow into it) → float32 scalar.

    ``gather=True``: all-gather across ``torch.distributed`` ranks (see the module docstring; every rank must
    pass the same B).
    """
    if img.dim() != 2 or txt.dim() != 2 or img.shape != txt.shape:
        raise ValueError(f"contrastive_loss: img and txt must both be (B, D), got {tuple(img.shape)} and {tuple(txt.shape)}")
    if not (img.is_floating_point() and txt.is_floating_point()):
        raise ValueError(f"contrastive_loss: features must be floating point, got {img.dtype} and {txt.dtype}")
    if img.device != txt.device:
        raise ValueError(f"contrastive_loss: img on {img.device}, txt on {txt.device}")
    b = img.shape[0]
    if ids is None:
        ids = torch.arange(b, device=img.device)
    ids = torch.as_tensor(ids, device=img.device)
    if ids.shape != (b,) or ids.is_floating_point():
        raise ValueError(f"contrastive_loss: ids must be integer ({b},), got {tuple(ids.shape)} {ids.dtype}")
    ids = ids.long()
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"contrastive_loss: temperature must be a scalar, got shape {tuple(temperature.shape)}")
        tau = temperature.reshape(()).float()
    else:
        tau = float(temperature)
        if not tau > 0:
            raise ValueError(f"contrastive_loss: temperature must be > 0, got {tau}")
    with torch.autocast(img.device.type, enabled=False):
        img32, txt32 = img.float(), txt.float()
        if gather:
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError("contrastive_loss(gather=True) needs an initialised torch.distributed process group")
            img_all, txt_all, ids_all = _gather(img32), _gather(txt32), _gather_ids(ids)
        else:
            img_all, txt_all, ids_all = img32, txt32, ids
        pos = (ids[:, None] == ids_all[None, :]).float()
        target = pos / pos.sum(1, keepdim=True)
        i2t = img32 @ txt_all.t() / tau
        t2i = txt32 @ img_all.t() / tau
        loss_i2t = -(torch.log_softmax(i2t, 1) * target).sum(1).mean()
        loss_t2i = -(torch.log_softmax(t2i, 1) * target).sum(1).mean()
        return (loss_i2t + loss_t2i) / 2
