"""Test setup: without CUDA, the Triton kernels run through Triton's interpreter.

TRITON_INTERPRET must be set before triton is imported, hence here, at collection time.
"""
import os

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

try:  # import triton now, under the interpreter setting above: a test that later monkeypatches
    import triton  # noqa: E402,F401  TRITON_INTERPRET (test_contracts) must not be the first import of triton
except ImportError:  # pragma: no cover - the suite then fails where triton is needed
    pass


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def device():
    """Where fused kernels run in this test session: cuda if present, else cpu (interpreter)."""
    return "cuda" if _HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (GPU validation: benchmarks/gpu_validate.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
