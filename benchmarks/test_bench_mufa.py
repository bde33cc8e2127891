"""Benchmark: MuFA adapter (ViT-B/16 and Swin-T stage-1 shapes).

eager reference vs torch.compile of it vs fused, forward and forward+backward, one table per case and
mode: `pytest benchmarks/test_bench_mufa.py` (default `--benchmark-group-by=group`), or
`--benchmark-group-by=param:case,param:mode`. CI runs it with `--benchmark-disable` (one call each).
"""
import pytest

from rspeft_fast.bench.pytest_support import bench_op, op_params


@pytest.mark.parametrize("case, mode, variant", op_params("mufa"))
def test_mufa(benchmark, case, mode, variant):
    bench_op(benchmark, case, mode, variant)
