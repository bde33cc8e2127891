"""Running the op cases: every variant, both modes, timings, checks against eager, derived numbers."""
from __future__ import annotations

import time

import torch

from .cases import MODES, VARIANTS, Case, build_runner, classify_error, fused_label
from .timing import _stats, time_fn

__all__ = ["run_op_case", "derive"]


def _err(actual: torch.Tensor, expected: torch.Tensor) -> dict:
    a, e = actual.detach().double(), expected.detach().double()
    d = float((a - e).abs().max()) if a.numel() else 0.0
    scale = float(e.abs().max()) if e.numel() else 0.0
    return {"max_abs_err": d, "rel_err": d / scale if scale > 0 else d}


def _grads(inputs) -> list:
    return [t.grad.detach().clone() if t.grad is not None else None for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]


def _peak_extra_mib(fn) -> float | None:
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)


def run_op_case(
    case: Case,
    device: torch.device | str,
    *,
    variants=VARIANTS,
    modes=MODES,
    skip: dict | None = None,
    rep_ms: float = 100.0,
    warmup_ms: float = 25.0,
    copy_bw: float | None = None,
    log=print,
) -> dict:
    """All ``variants`` × ``modes`` of ``case``. ``skip`` maps a variant to the reason it is not run here
    (recorded as unavailable). Returns a JSON-ready record (see :mod:`rspeft_fast.bench.cli`)."""
    device = torch.device(device)
    skip = skip or {}
    rec = {
        "id": case.id, "op": case.op, "case": case.name, "desc": case.desc, "shapes": case.shapes,
        "dtype": str(case.dtype).replace("torch.", ""), "flops": case.flops, "bytes_floor": case.bytes,
        "anchor_h100_us": case.anchor_h100_us, "anchor_note": case.anchor_note or None,
        "fused_impl": fused_label(case.op, device), "results": {},
    }
    if copy_bw:
        rec["floor_us"] = {m: (None if case.bytes[m] is None else round(case.bytes[m] / copy_bw * 1e6, 3)) for m in modes}
    for mode in modes:
        res: dict = {}
        ref_out = ref_grads = None
        for v in variants:
            if v in skip:
                res[v] = {"status": "unavailable", "reason": skip[v]}
                log(f"  {case.id} {mode:8s} {v:8s} unavailable: {skip[v]}")
                continue
            try:
                r = build_runner(case, v, mode, device)
                if r.interpreted:  # the interpreter has nothing to warm up: one call, timed, is all it is worth
                    t0 = time.perf_counter()
                    out = r.fn()
                    t = _stats([time.perf_counter() - t0], "one call (Triton interpreter on CPU)")
                else:
                    out = r.fn()  # first call: JIT / torch.compile / autotune; never timed
                    t = time_fn(r.fn, device, grad_to_none=r.grad_to_none, warmup_ms=warmup_ms, rep_ms=rep_ms)
                entry = {"status": "ok", "impl_arg": r.impl_arg, **t.asdict()}
                if r.interpreted:
                    entry["interpreted"] = True
                    entry["note"] = "Triton interpreter on CPU: checks the kernels run; the time is not a performance number"
                if mode == "fwd":
                    if v == "eager":
                        ref_out = out.detach()
                    elif ref_out is not None:
                        entry["check_vs_eager"] = {"output": _err(out, ref_out)}
                else:
                    g = _grads(r.inputs)
                    if v == "eager":
                        ref_grads = g
                    elif ref_grads is not None:
                        entry["check_vs_eager"] = {f"grad_input{i}": _err(a, b) for i, (a, b) in enumerate(zip(g, ref_grads)) if a is not None and b is not None}
                if device.type == "cuda":
                    entry["peak_extra_MiB"] = _peak_extra_mib(r.fn)
                res[v] = entry
                log(f"  {case.id} {mode:8s} {v:8s} {t.median_us:12.1f} us" + (" (interpreter)" if r.interpreted else ""))
                del r, out
            except Exception as e:
                status, reason = classify_error(e)
                res[v] = {"status": status, "reason": reason}
                log(f"  {case.id} {mode:8s} {v:8s} {status}: {reason}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rec["results"][mode] = res
    derive(rec)
    return rec


def _median(entry: dict | None) -> float | None:
    if not entry or entry.get("status") != "ok" or entry.get("interpreted"):
        return None
    return entry.get("median_us")


def derive(rec: dict) -> dict:
    """Speedups vs eager and compile, achieved TFLOP/s and GB/s, multiple of the memory floor."""
    for mode, res in rec["results"].items():
        eager, comp = _median(res.get("eager")), _median(res.get("compile"))
        floor = (rec.get("floor_us") or {}).get(mode)
        flops = rec["flops"].get(mode)
        nbytes = rec["bytes_floor"].get(mode)
        for v, e in res.items():
            m = _median(e)
            if m is None:
                continue
            if eager:
                e["speedup_vs_eager"] = round(eager / m, 3)
            if comp and v != "compile":
                e["speedup_vs_compile"] = round(comp / m, 3)
            if flops:
                e["TFLOP_per_s"] = round(flops / (m * 1e-6) / 1e12, 4)
            if nbytes:
                e["GB_per_s_floor_bytes"] = round(nbytes / (m * 1e-6) / 1e9, 2)
            if floor:
                e["x_floor"] = round(m / floor, 2)
    return rec
