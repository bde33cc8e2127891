"""pytest-benchmark suites of rspeft_fast (see benchmarks/NOTES.md).

Without CUDA the Triton kernels run through Triton's interpreter: the same switch as tests/conftest.py
(CI collects ``tests`` and ``benchmarks`` in one session), from one helper, before triton is imported.
"""
from rspeft_fast.bench import interpret_without_cuda

interpret_without_cuda()

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (GPU validation: benchmarks/gpu_validate.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
