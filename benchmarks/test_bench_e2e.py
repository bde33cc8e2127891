"""Benchmark: one training step (forward, backward, AdamW) of a frozen timm / open_clip backbone with
adapters: no adapter (the floor), eager adapters, fused adapters; one table per model.

GPU: ViT-B/16 + MuFA and Swin-T + MuFA at batch 64, ConvNeXt-B + EQAM + CAPM at batch 64, CLIP
ViT-B/32 + MGA + weighted triplet + contrastive at batch 214. CPU: miniature versions.
"""
import pytest

from rspeft_fast.bench.e2e import E2E_VARIANTS, e2e_cases
from rspeft_fast.bench.pytest_support import DEVICE, bench_e2e

CASES = e2e_cases("spec" if DEVICE == "cuda" else "tiny")


@pytest.mark.parametrize("variant", E2E_VARIANTS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_e2e_step(benchmark, case, variant):
    bench_e2e(benchmark, case, variant)
