"""The dense objective (SPEC §6): cross-entropy with ``ignore_index`` (255), optional class weights (the rare
change class) and optional Dice (segmentation_models_pytorch's ``DiceLoss``, multiclass, same ignore index)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DenseLoss"]


class DenseLoss(nn.Module):
    """``CE(logits, target; weight, ignore_index) + dice · Dice(logits, target)``: logits ``(B, K, H, W)``,
    target ``(B, H, W)`` int64 with ``ignore_index`` on unlabelled pixels. A batch with every pixel ignored
    gives a zero loss (with a graph), not NaN.

    ``distributed``: under DDP (every rank calls the loss on its slice of the global batch, gradients averaged over
    the ``W`` ranks) the cross-entropy's denominator (the labelled pixels' weight) is all-reduced, and each rank
    returns ``W · CE_sum_r / den_global``: the averaged gradients and the ranks' mean loss are then those of one
    process on the whole global batch, however the ignored pixels fall across the ranks. The Dice term stays per
    rank (its per-class sums are not all-reduced): with ``dice`` the DDP loss is close to, not equal to, one
    process's."""

    def __init__(self, num_classes: int, ignore_index: int = 255, class_weights: Optional[Sequence[float]] = None,
                 dice: float = 0.0, distributed: bool = False):
        super().__init__()
        self.distributed = bool(distributed)
        self.num_classes, self.ignore_index, self.dice_weight = int(num_classes), int(ignore_index), float(dice)
        if class_weights is not None:
            if len(class_weights) != self.num_classes:
                raise ValueError(f"class_weights has {len(class_weights)} values for {self.num_classes} classes")
            self.register_buffer("weight", torch.tensor([float(w) for w in class_weights]), persistent=False)
        else:
            self.weight = None
        self.dice = None
        if self.dice_weight:
            from .model import require_smp

            require_smp()
            from segmentation_models_pytorch.losses import DiceLoss

            self.dice = DiceLoss("multiclass", ignore_index=self.ignore_index, from_logits=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        valid = target != self.ignore_index
        w = self.weight.to(logits.device) if self.weight is not None else None
        # PyTorch's weighted mean over the labelled pixels, without a host sync, 0 (not NaN) when there are none
        ce = F.cross_entropy(logits, target, weight=w, ignore_index=self.ignore_index, reduction="sum")
        if w is None:
            den = valid.sum()
        else:
            den = (w[torch.where(valid, target, 0)] * valid).sum()
        if self.distributed:
            import torch.distributed as dist

            den = den.detach().float().clone()
            dist.all_reduce(den)
            den = den / dist.get_world_size()
        loss = ce / den.clamp_min(1e-12)
        if self.dice is not None:
            loss = loss + self.dice_weight * self.dice(logits, target)
        return loss
