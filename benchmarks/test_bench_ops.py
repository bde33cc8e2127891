"""Benchmark of every fused op: eager reference vs ``torch.compile`` of it vs fused, forward and forward+backward.

* ``mufa``: MuFA adapter (ViT-B/16 and Swin-T stage-1 shapes);
* ``qlinear``: EQAM / Q-Linear adapter (ConvNeXt-B stage 1 and 4, 8 and 4 bits);
* ``mga``: HarMA's MGA adapter (CLIP ViT-B/32 image tower; text tower with BiShare);
* ``triplet``: weighted triplet loss with hard-negative mining (fp32; sum and max_violation).

One table per case and mode: ``pytest benchmarks/test_bench_ops.py -k mufa`` (default
``--benchmark-group-by=group``), or ``--benchmark-group-by=param:case,param:mode``. CI runs it with
``--benchmark-disable`` (one call each).
"""
import pytest

from rspeft_fast.bench.cases import OPS
from rspeft_fast.bench.pytest_support import bench_op, op_params


@pytest.mark.parametrize("case, mode, variant", [p for op in OPS for p in op_params(op)])
def test_op(benchmark, case, mode, variant):
    bench_op(benchmark, case, mode, variant)
