"""Benchmark: HarMA MGA adapter (CLIP ViT-B/32 image tower; text tower with BiShare).

eager reference vs torch.compile of it vs fused, forward and forward+backward, one table per case and
mode: `pytest benchmarks/test_bench_mga.py` (default `--benchmark-group-by=group`), or
`--benchmark-group-by=param:case,param:mode`. CI runs it with `--benchmark-disable` (one call each).
"""
import pytest

from rspeft_fast.bench.pytest_support import bench_op, op_params


@pytest.mark.parametrize("case, mode, variant", op_params("mga"))
def test_mga(benchmark, case, mode, variant):
    bench_op(benchmark, case, mode, variant)
