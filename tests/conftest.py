"""Fixtures of the test suite; the session setup (Triton interpreter without CUDA, gpu tests, seed) is the
repository's root ``conftest.py``, shared with ``benchmarks/``."""
import pytest
import torch


@pytest.fixture
def device():
    """Where fused kernels run in this test session: cuda if present, else cpu (interpreter)."""
    return "cuda" if torch.cuda.is_available() else "cpu"
