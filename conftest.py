"""Session setup shared by ``tests/`` and ``benchmarks/`` (one pytest session collects both).

* Without CUDA the Triton kernels run through Triton's interpreter: ``TRITON_INTERPRET=1`` must be set before
  triton is imported, hence here, at the very start of collection, through the package's one helper.
* Tests marked ``gpu`` need a CUDA device: without one they are *deselected* (their count named at the end of a run without -n), not
  skipped — they run in the GPU validation (``benchmarks/gpu_validate.sh``).
* Every test starts from the same seed.
"""
from rspeft_fast.bench import interpret_without_cuda

_REASON = interpret_without_cuda()

import pytest  # noqa: E402
import torch  # noqa: E402

try:  # import triton now, under the interpreter setting above: a test that later monkeypatches
    import triton  # noqa: E402,F401  TRITON_INTERPRET (test_contracts) must not be the first import of triton
except ImportError:  # pragma: no cover - the suite then fails where triton is needed
    pass

_HAS_CUDA = torch.cuda.is_available()


def pytest_report_header(config):
    where = "CUDA" if _HAS_CUDA else "CPU: Triton kernels through TRITON_INTERPRET=1"
    return [f"rspeft_fast: {where}" + (f" ({_REASON})" if _REASON else "")]


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    gpu = [i for i in items if "gpu" in i.keywords]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [i for i in items if "gpu" not in i.keywords]
        config._rspeft_gpu_deselected = len(gpu)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    n = getattr(config, "_rspeft_gpu_deselected", 0)
    if n:
        terminalreporter.write_line(f"rspeft_fast: {n} tests marked gpu deselected (no CUDA device; they run in "
                                    "benchmarks/gpu_validate.sh)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
