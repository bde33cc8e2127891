"""nn.Modules of every method. Each owns its parameters in the layout of SPEC §1, validates ``impl`` when it
is built or assigned (:func:`rspeft_fast._impl.impl_property`) and calls its functional in
``rspeft_fast.ops`` with it, which resolves and runs the implementation (:func:`rspeft_fast._impl.resolve_impl`).
(``CAPM`` is eager only.)"""
from .mufa import MuFAAdapter
from .qlinear import QLinear, EQAM
from .capm import CAPM
from .mga import BiShareAdapter, MGAdapter
from .triplet import WeightedTripletLoss
from .convpass import Convpass
from .lorand import LoRand
from .ivpt import IVPTGate
from .e2vpt import KVPrompts

__all__ = ["MuFAAdapter", "QLinear", "EQAM", "CAPM", "BiShareAdapter", "MGAdapter", "WeightedTripletLoss", "Convpass", "LoRand",
           "IVPTGate", "KVPrompts"]
