"""nn.Modules of every method. Each owns its parameters in the layout of SPEC §1 and dispatches to an
implementation chosen by ``impl`` (see :mod:`rspeft_fast._impl`)."""
from .mufa import MuFAAdapter
from .qlinear import QLinear, EQAM
from .capm import CAPM
from .mga import BiShareAdapter, MGAdapter
from .triplet import WeightedTripletLoss

__all__ = ["MuFAAdapter", "QLinear", "EQAM", "CAPM", "BiShareAdapter", "MGAdapter", "WeightedTripletLoss"]
