"""Benchmarks of rspeft_fast: op micro-benchmarks, end-to-end training steps, eager/fused parity.

* :mod:`.timing`  — timers (``triton.testing.do_bench`` / CUDA events on GPU, ``perf_counter`` on CPU),
  copy-bandwidth floor, environment record;
* :mod:`.cases`   — the benchmarked cases of every op (SPEC §2 shapes on GPU, small ones on CPU), their
  implementations (eager reference, ``torch.compile`` of the reference, fused), FLOP and byte counts;
* :mod:`.e2e`     — a frozen-backbone timm/open_clip training step (forward, backward, AdamW);
* :mod:`.parity`  — fused vs eager fine-tuning loss curves from the same seed and data;
* :mod:`.report`, :mod:`.plot` — markdown table and speedup chart;
* :mod:`.cli`     — ``python -m rspeft_fast bench [--quick] [--parity] [--out DIR]``.

Nothing here is imported by ``import rspeft_fast``; importing this package does not import triton.
"""
from __future__ import annotations

import os
import sys

__all__ = ["interpret_without_cuda"]


def interpret_without_cuda() -> str:
    """Switch Triton's interpreter on (``TRITON_INTERPRET=1``) when no CUDA device is present.

    Must run before triton is imported (pytest conftests, the bench CLI). Returns ``""`` when the
    environment is fine for the Triton kernels on this machine, else the reason it is not (triton
    was already imported without the interpreter, so CPU tensors cannot run the kernels).
    An explicit ``TRITON_INTERPRET`` set by the user is left alone.
    """
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch is a hard dependency
        has_cuda = False
    if has_cuda:
        return ""
    if "TRITON_INTERPRET" not in os.environ:
        if "triton" in sys.modules:
            return "triton was imported before TRITON_INTERPRET=1 could be set, so its interpreter is off"
        os.environ["TRITON_INTERPRET"] = "1"
    return ""
