"""Benchmark: EQAM / Q-Linear adapter (ConvNeXt-B stage 1 and 4, 8 and 4 bits).

eager reference vs torch.compile of it vs fused, forward and forward+backward, one table per case and
mode: `pytest benchmarks/test_bench_qlinear.py` (default `--benchmark-group-by=group`), or
`--benchmark-group-by=param:case,param:mode`. CI runs it with `--benchmark-disable` (one call each).
"""
import pytest

from rspeft_fast.bench.pytest_support import bench_op, op_params


@pytest.mark.parametrize("case, mode, variant", op_params("qlinear"))
def test_qlinear(benchmark, case, mode, variant):
    bench_op(benchmark, case, mode, variant)
