"""WeightedTripletLoss: nn.Module wrapper of :func:`rspeft_fast.ops.triplet.weighted_triplet_loss`."""
from __future__ import annotations

from torch import nn

from .._impl import impl_property
from ..ops.triplet import weighted_triplet_loss


class WeightedTripletLoss(nn.Module):
    """HarMA's adaptive triplet loss; ``forward(img (B, D), txt (B, D), ids=None)`` → scalar.

    ``gather=True``: all-gather the features of every ``torch.distributed`` rank (gradients flow back to
    the local shard) and compute this rank's rows and columns of the global loss (the ranks' losses sum
    to it); see :func:`rspeft_fast.ops.triplet.weighted_triplet_loss`.
    """

    impl = impl_property("weighted_triplet_loss")

    def __init__(
        self,
        margin: float = 0.2,
        gamma: float = 2.0,
        max_violation: bool = False,
        impl: str = "auto",
        gather: bool = False,
    ):
        super().__init__()
        self.margin, self.gamma, self.max_violation, self.impl = float(margin), float(gamma), bool(max_violation), impl
        self.gather = bool(gather)

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin}, gamma={self.gamma}, max_violation={self.max_violation}, impl={self.impl!r}, "
            f"gather={self.gather}"
        )

    def forward(self, img, txt, ids=None):
        return weighted_triplet_loss(
            img, txt, self.margin, self.gamma, self.max_violation, ids, self.impl, gather=self.gather
        )
