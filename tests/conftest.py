"""Fixtures of the test suite; the session setup (Triton interpreter without CUDA, gpu tests, seed) is the
repository's root ``conftest.py``, shared with ``benchmarks/``."""
import pytest
import torch


@pytest.fixture
def device():
    """Where fused kernels run in this test session: cuda if present, else cpu (interpreter)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _fresh_plans():
    """Every test starts without the ops' cached plans (``rspeft_fast._impl.clear_plans``): tests that replace the
    package's functions with monkeypatch must see their replacement consulted."""
    from rspeft_fast._impl import clear_plans

    clear_plans()
    yield


@pytest.fixture
def one_thread():
    """torch on one thread for the test (bit-exact job comparisons; the jobs' own runs use one thread too)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

