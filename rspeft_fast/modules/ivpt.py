"""IVPT's per-block tensors (Yoo et al., ICML 2023): the prompt gate and the attention temperature."""
from __future__ import annotations

import torch
from torch import nn

from ..reference.ivpt import gated_prompts_ref


class IVPTGate(nn.Module):
    """One block's IVPT parameters (SPEC §1): ``temperature`` ``τ`` (0-d, init 1; the block's attention logits are
    divided by it, clamped to ``[t_min, t_max]``) and, with ``gate=True``, ``gate_logit`` ``γ`` (0-d, init
    ``-gate_init``: the reference's ``GATE_INIT``; ``g = sigmoid(γ)`` mixes the block's prompt outputs with its
    prompt inputs, ``p_out ← g·p_out + (1 − g)·p_in``).

    The reference clamps the stored temperature in place before each forward (``reinit_temp``); here the value used is
    clamped with a straight-through gradient: the same forward value and the same gradient, without writing a
    parameter inside the forward (safe under gradient checkpointing and ``torch.compile``).
    """

    def __init__(self, gate: bool = True, gate_init: float = 5.0, t_min: float = 0.01, t_max: float = 10.0):
        super().__init__()
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.temperature = nn.Parameter(torch.ones(()))
        self.gate_logit = nn.Parameter(torch.full((), -float(gate_init))) if gate else None

    def extra_repr(self) -> str:
        return f"gate={self.gate_logit is not None}, t_range=({self.t_min}, {self.t_max})"

    def tau(self) -> torch.Tensor:
        t = self.temperature
        return t + (t.clamp(self.t_min, self.t_max) - t).detach()

    def mix(self, prompt_in: torch.Tensor, prompt_out: torch.Tensor) -> torch.Tensor:
        if self.gate_logit is None:
            return prompt_out
        return gated_prompts_ref(prompt_in, prompt_out, self.gate_logit.to(prompt_out.dtype))
