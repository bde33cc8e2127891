"""Eager PyTorch reference implementations: the oracles every fused kernel is tested against.

They compute exactly the maths of SPEC §1 with ordinary PyTorch ops (and are what ``impl="reference"``
runs), in the inputs' dtype as eager PyTorch would (under autocast: in the autocast dtype), except where
said: the quantiser of ``qlinear_ref`` / ``eqam_ref`` always runs in float32, and the triplet losses compute
in float32 at least with autocast off (PyTorch's policy for losses). ``mufa_ref(..., upcast=True)`` computes
in float32 whatever the inputs' dtype; for the others, pass float32/float64 inputs for an upcast oracle
(the tests do: ``rspeft_fast.testing.assert_fused_close``). Every oracle of the package lives here.
"""
from .mufa import branch_sizes, mufa_ref
from .qlinear import fake_quant_weight, qlinear_ref, eqam_ref, quantize_weight, round_half_even_ref
from .capm import capm_ref
from .lora import lora_linear_ref, lora_mha_ref
from .mga import msa_ref, bishare_ref, mga_ref
from .triplet import weighted_triplet_local_ref, weighted_triplet_ref
from .convpass import convpass_ref, quick_gelu
from .lorand import lorand_ref, lorand_weight_ref
from .ivpt import gated_prompts_ref, tempered_attention_ref
from .e2vpt import kv_prompt_attention_ref

__all__ = [
    "branch_sizes",
    "mufa_ref",
    "fake_quant_weight",
    "quantize_weight",
    "round_half_even_ref",
    "qlinear_ref",
    "eqam_ref",
    "capm_ref",
    "lora_linear_ref",
    "lora_mha_ref",
    "msa_ref",
    "bishare_ref",
    "mga_ref",
    "weighted_triplet_ref",
    "weighted_triplet_local_ref",
    "quick_gelu",
    "convpass_ref",
    "lorand_weight_ref",
    "lorand_ref",
    "tempered_attention_ref",
    "gated_prompts_ref",
    "kv_prompt_attention_ref",
]
