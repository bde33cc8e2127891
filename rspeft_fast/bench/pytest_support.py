"""Glue between the cases of :mod:`rspeft_fast.bench.cases` / :mod:`.e2e` and pytest-benchmark.

Used by ``benchmarks/test_bench_ops.py`` and ``benchmarks/test_bench_e2e.py``. Environment variables:

* ``RSPEFT_BENCH_SIZE`` = ``spec | small | tiny``: op shapes (default ``spec`` on GPU, ``tiny`` on CPU);
The ``torch.compile`` variants on CPU carry the ``slow`` marker (inductor's first compile takes ~30 s per graph
on a small machine): the default test command deselects them, ``make test-slow`` runs them.

On GPU each round is timed by CUDA events with synchronisation (:class:`.timing.cuda_event_timer`
replaces pytest-benchmark's clock); warm-up rounds and the first (compiling) call are excluded, and
gradients are reset to ``None`` in pytest-benchmark's untimed ``setup``.
"""
from __future__ import annotations

import os

import pytest
import torch

from .cases import build_runner, cases, classify_error, default_size

__all__ = ["DEVICE", "SIZE", "op_params", "bench_op", "bench_e2e", "use_cuda_timer"]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZE = os.environ.get("RSPEFT_BENCH_SIZE") or default_size(DEVICE, quick=True)


def op_params(op: str) -> list:
    """``pytest.param(case, mode, variant)`` for every case of ``op`` at :data:`SIZE`."""
    from .cases import MODES, VARIANTS

    slow = (pytest.mark.slow,)
    return [pytest.param(c, m, v, id=f"{c.name}-{m}-{v}", marks=slow if v == "compile" and DEVICE == "cpu" else ())
            for c in cases(op, SIZE) for m in MODES for v in VARIANTS]


def use_cuda_timer(benchmark) -> None:
    """Make pytest-benchmark read time from CUDA events (synchronised) instead of the host clock."""
    if DEVICE == "cuda":
        from .timing import cuda_event_timer

        benchmark._timer = cuda_event_timer()  # pytest-benchmark 5.x reads its clock from this attribute


def _skip_or_raise(e: Exception, what: str):
    status, reason = classify_error(e)
    if status == "unavailable":
        pytest.skip(f"{what}: unavailable: {reason}")
    raise e


def bench_op(benchmark, case, mode: str, variant: str) -> None:
    benchmark.group = f"{case.op}/{case.name}/{mode}"
    benchmark.extra_info.update(desc=case.desc, variant=variant, mode=mode, dtype=str(case.dtype), flops=case.flops[mode])
    try:
        r = build_runner(case, variant, mode, DEVICE)
        benchmark.extra_info["impl"] = r.impl_arg
        use_cuda_timer(benchmark)

        def setup():
            for t in r.grad_to_none:
                t.grad = None

        if r.interpreted or benchmark.disabled:
            # nothing to warm up (interpreter) or nothing timed (--benchmark-disable): one call
            if r.interpreted:
                benchmark.extra_info["note"] = "Triton interpreter on CPU: not a performance number"
            out = benchmark.pedantic(r.fn, setup=setup, rounds=1, warmup_rounds=0)
        else:
            r.fn()  # JIT / torch.compile: excluded from the timing
            out = benchmark.pedantic(r.fn, setup=setup, rounds=30 if DEVICE == "cuda" else 5, warmup_rounds=3 if DEVICE == "cuda" else 1)
    except Exception as e:
        _skip_or_raise(e, f"{case.id} {variant}")
    assert out is None or bool(torch.isfinite(out.detach()).all()), f"{case.id} {variant} {mode}: non-finite output"


def bench_e2e(benchmark, case, variant: str) -> None:
    from .e2e import build_step

    benchmark.group = f"e2e/{case.name}"
    benchmark.extra_info.update(desc=case.desc, variant=variant, batch=case.batch)
    try:
        st = build_step(case, variant, DEVICE)
        use_cuda_timer(benchmark)
        if benchmark.disabled or (DEVICE == "cpu" and variant == "fused"):
            if DEVICE == "cpu" and variant == "fused":
                benchmark.extra_info["note"] = "Triton interpreter on CPU: not a performance number"
            loss = benchmark.pedantic(st.fn, rounds=1, warmup_rounds=0)
        else:
            st.fn()  # JIT: excluded
            loss = benchmark.pedantic(st.fn, rounds=10 if DEVICE == "cuda" else 2, warmup_rounds=2 if DEVICE == "cuda" else 0)
    except Exception as e:
        _skip_or_raise(e, f"e2e {case.name} {variant}")
    assert loss is None or torch.isfinite(loss).item(), f"non-finite loss {loss}"
