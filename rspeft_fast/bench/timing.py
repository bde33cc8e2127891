"""Timers, the copy-bandwidth floor and the record of the environment a benchmark ran in.

GPU: :func:`time_fn` uses ``triton.testing.do_bench`` (CUDA events around each call, the L2 cache
flushed between calls, warm-up excluded, gradients set to ``None`` outside the timed region); if triton
cannot be imported it uses the same scheme with CUDA events directly. CPU: ``time.perf_counter`` around
each call after warm-up calls. Both return a :class:`Timing` (median and quantiles in microseconds).
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import torch

__all__ = [
    "Timing",
    "time_fn",
    "copy_bandwidth",
    "environment",
    "device_slug",
    "cuda_event_timer",
    "sync",
]

QUANTILES = (0.5, 0.2, 0.8, 0.0, 1.0)


@dataclass
class Timing:
    median_us: float
    q20_us: float
    q80_us: float
    min_us: float
    max_us: float
    n: int  # number of timed calls (CPU) or estimate of it (do_bench)
    method: str

    def asdict(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _quantile(sorted_vals: list[float], q: float) -> float:
    if len(sorted_vals) == 1:
        return sorted_vals[0]
    pos = q * (len(sorted_vals) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def _stats(samples_s: list[float], method: str) -> Timing:
    us = sorted(s * 1e6 for s in samples_s)
    return Timing(
        median_us=statistics.median(us),
        q20_us=_quantile(us, 0.2),
        q80_us=_quantile(us, 0.8),
        min_us=us[0],
        max_us=us[-1],
        n=len(us),
        method=method,
    )


def _clear_grads(tensors: Iterable[torch.Tensor] | None) -> None:
    for t in tensors or ():
        t.grad = None


def time_fn(
    fn: Callable[[], object],
    device: torch.device | str,
    *,
    grad_to_none: list[torch.Tensor] | None = None,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    min_reps: int = 3,
    max_reps: int = 1000,
    warmup_calls: int = 1,
) -> Timing:
    """Time ``fn()`` (already warmed up/compiled by the caller or not: the warm-up here is excluded).

    ``grad_to_none``: tensors whose ``.grad`` is reset before every call, outside the timed region,
    so a forward+backward measurement does not include gradient accumulation.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return _time_cuda(fn, grad_to_none, warmup_ms, rep_ms)
    # CPU: warm-up calls, then as many timed calls as fit in rep_ms (at least min_reps).
    for _ in range(max(warmup_calls, 0)):
        _clear_grads(grad_to_none)
        fn()
    samples: list[float] = []
    budget = rep_ms / 1e3
    spent = 0.0
    while len(samples) < max_reps and (len(samples) < min_reps or spent < budget):
        _clear_grads(grad_to_none)
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        samples.append(dt)
        spent += dt
    return _stats(samples, "perf_counter (CPU), warm-up excluded")


def _time_cuda(fn, grad_to_none, warmup_ms: float, rep_ms: float) -> Timing:
    try:
        from triton.testing import do_bench
    except Exception:  # pragma: no cover - triton is present wherever CUDA kernels run
        do_bench = None
    if do_bench is not None:
        q = do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, quantiles=list(QUANTILES))
        med, q20, q80, lo, hi = (float(v) * 1e3 for v in q)
        # do_bench does not say how many calls it timed; estimate from its rule (rep_ms / median).
        n = max(1, int(rep_ms * 1e3 / max(med, 1e-3)))
        return Timing(med, q20, q80, lo, hi, n, "triton.testing.do_bench (CUDA events, L2 flushed, warm-up excluded)")
    return _time_cuda_events(fn, grad_to_none, warmup_ms, rep_ms)


def _time_cuda_events(fn, grad_to_none, warmup_ms: float, rep_ms: float) -> Timing:  # pragma: no cover - GPU only
    cache = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")
    fn()
    torch.cuda.synchronize()
    t0 = torch.cuda.Event(enable_timing=True)
    t1 = torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(5):
        cache.zero_()
        fn()
    t1.record()
    torch.cuda.synchronize()
    est_ms = max(t0.elapsed_time(t1) / 5, 1e-3)
    n_warm = max(1, int(warmup_ms / est_ms))
    n_rep = max(3, min(10000, int(rep_ms / est_ms)))
    for _ in range(n_warm):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for i in range(n_rep):
        _clear_grads(grad_to_none)
        cache.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return _stats([s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)], "CUDA events (L2 flushed, warm-up excluded)")


class cuda_event_timer:
    """A clock for pytest-benchmark on GPU: each reading records a CUDA event on the current stream and
    waits for it, so the interval between two readings is the GPU time of the work between them
    (everything queued before the first reading has finished before it is taken)."""

    def __init__(self) -> None:
        self._origin = torch.cuda.Event(enable_timing=True)
        self._origin.record()
        self._origin.synchronize()
        self.__name__ = "cuda_event_timer"

    def __call__(self) -> float:
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        e.synchronize()
        return self._origin.elapsed_time(e) / 1e3


def copy_bandwidth(device: torch.device | str, nbytes: int | None = None) -> dict:
    """Measured device-to-device copy bandwidth (bytes read + bytes written per second), the memory floor.

    GPU: a ``256 MiB`` ``dst.copy_(src)`` timed like the ops; CPU: ``64 MiB``.
    """
    device = torch.device(device)
    if nbytes is None:
        nbytes = (256 if device.type == "cuda" else 64) * 1024 * 1024
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, rep_ms=200.0 if device.type == "cuda" else 100.0, min_reps=5)
    bw = 2 * nbytes / (t.median_us * 1e-6)
    del src, dst
    return {"bytes_copied": nbytes, "median_us": round(t.median_us, 3), "bytes_per_s": bw, "GB_per_s": round(bw / 1e9, 1),
            "method": f"dst.copy_(src) of {nbytes // (1024 * 1024)} MiB on {device.type}; bandwidth = 2·bytes / median time"}


def _git_commit() -> str | None:
    try:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        out = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except Exception:
        return None


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    proc = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    proc = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU ({proc}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads)"


def device_slug(device: torch.device | str) -> str:
    """Short, file-name-safe device name: ``h100-80gb-hbm3``, ``cpu``."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower().replace("nvidia", "")
    slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    return slug or "cuda"


def environment(device: torch.device | str) -> dict:
    """Where and with what a benchmark ran: device, versions, date, commit, interpreter mode."""
    device = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except Exception as e:  # pragma: no cover
        triton_version = f"not importable ({type(e).__name__}: {e})"
    from .._native import has

    env = {
        "device": device_name(device),
        "device_type": device.type,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": _git_commit(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "rspeft_fast_C": {"cpu": has("cpu")[0], "cuda": has("cuda")[0] if device.type == "cuda" else False},
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env["gpu_memory_GiB"] = round(p.total_memory / 2**30, 1)
        env["sm_count"] = p.multi_processor_count
        env["capability"] = f"{p.major}.{p.minor}"
    return env
