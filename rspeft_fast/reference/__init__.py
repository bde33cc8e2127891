"""Eager PyTorch reference implementations: the oracles every fused kernel is tested against.

They compute exactly the maths of SPEC §1 with ordinary PyTorch ops (and are what ``impl="reference"``
runs). Each takes ``upcast=True`` to compute in float32/float64 regardless of the inputs' dtype.
"""
from .mufa import branch_sizes, mufa_ref
from .qlinear import fake_quant_weight, qlinear_ref, eqam_ref, quantize_weight, round_half_even_ref
from .capm import capm_ref
from .mga import msa_ref, bishare_ref, mga_ref
from .triplet import weighted_triplet_ref

__all__ = [
    "branch_sizes",
    "mufa_ref",
    "fake_quant_weight",
    "quantize_weight",
    "round_half_even_ref",
    "qlinear_ref",
    "eqam_ref",
    "capm_ref",
    "msa_ref",
    "bishare_ref",
    "mga_ref",
    "weighted_triplet_ref",
]
