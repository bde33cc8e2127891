"""Host overhead of the fused adapters: ``python -m rspeft_fast bench --host`` (issue #27).

What the CPU spends per call on everything but the kernels. Every Triton kernel runs under Triton's
interpreter (``TRITON_INTERPRET=1``) with the interpreter's launch replaced by a no-op that only counts
(:func:`stub_triton_launches`), and the shapes are tiny, so no CPU compute hides in the numbers: what is
left is validation, implementation resolution, launch plans, allocations, the custom-op and autograd
dispatch and every aten op around the kernels. Per adapter and mode (``fwd`` under ``no_grad``,
``fwd+bwd`` = forward with autograd + ``backward`` of a fixed output gradient, input and parameters
requiring grad; outside the timed call the gradients are reset to ``None`` and every parameter is changed in
place (``add_(0)``: its ``_version`` moves as after an optimizer step, so nothing derived from a parameter is
reused across training steps; in ``fwd`` (inference) parameters do not change):

* ``module``: the ``nn.Module`` with ``impl="triton"`` (what a model runs);
* ``op``: the ``torch.library`` custom op alone, called with prepared arguments (the irreducible part of the
  fused path: custom-op dispatch, ``register_autograd``, the launcher);
* ``floor``: an ``autograd.Function`` with the module's inputs (x and its parameters) that only allocates its
  outputs (and, backward, one gradient per input);
* ``eager``: the module with ``impl="reference"`` (the eager PyTorch reference, really computing: tiny shapes).

Per call it also counts the Triton launches and the aten ops (a ``TorchDispatchMode`` that also enters the
package's custom ops), split into ops that launch device work and those that do not (views, ``empty``,
``detach``); host synchronisations (``_local_scalar_dense`` & co.) are counted separately and must be 0.

Timing: ``time.perf_counter_ns`` around each call, after warm-up; the variants are interleaved in rounds so
that a loaded machine slows them alike; median, 20 % quantile and min in µs. The record carries the
machine's single-thread calibration (``sum(range(1000))`` µs, a 4×4 ``torch.add`` µs, min and median) and the
load average before and after, because a shared machine's numbers only compare to each other through them.
The targets of issue #27 (module µs on this kind of machine) are checked against the medians.

Results: ``host.json`` and ``host.md`` in ``benchmarks/results/host-<date>/`` (or ``--out``).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import statistics
import sys
import time
import timeit
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

__all__ = ["main", "build_parser", "stub_triton_launches", "OpCounter", "TARGETS", "CASES"]

# µs on the reference machine (sum(range(1000)) ≈ 11.4 µs): (module fwd, module fwd+bwd)
TARGETS = {
    "mufa": (25.0, 120.0),
    "eqam": (30.0, 150.0),
    "mga_seq": (40.0, 250.0),
    "mga_seq_bishare": (40.0, 250.0),
    "mga_blocked": (120.0, 400.0),
}


def _ensure_interpreter() -> None:
    if os.environ.get("TRITON_INTERPRET", "0").strip() == "1":
        return
    if "triton" in sys.modules:
        raise RuntimeError("bench --host needs Triton's interpreter, but triton was imported without TRITON_INTERPRET=1; "
                           "run it in a fresh process (or set TRITON_INTERPRET=1)")
    os.environ["TRITON_INTERPRET"] = "1"


# ----------------------------------------------------------------------------------------------------
# kernels stubbed, launches counted
# ----------------------------------------------------------------------------------------------------
class _Launches:
    count = 0
    names: Counter = Counter()


@contextlib.contextmanager
def stub_triton_launches():
    """Replace the interpreter's kernel launch by a no-op that evaluates the grid and counts the launch.

    The host work before the launch (autotuner key and prune, the launcher's argument building) still runs;
    the kernel body does not, so output buffers keep whatever ``torch.empty`` gave them."""
    from triton.runtime.interpreter import InterpretedFunction

    orig = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        if warmup:
            return None
        if callable(grid):
            grid({**dict(zip(self.arg_names, args)), **kwargs})
        _Launches.count += 1
        _Launches.names[self.fn.__name__] += 1
        return None

    InterpretedFunction.run = run
    try:
        yield _Launches
    finally:
        InterpretedFunction.run = orig


_NO_WORK = {
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty", "aten::new_empty_strided",
    "aten::detach", "aten::lift_fresh", "aten::lift_fresh_copy", "aten::sym_size", "aten::sym_stride",
    "aten::sym_numel", "aten::sym_storage_offset", "aten::is_same_size",
}
_SYNC = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal", "aten::nonzero"}


def _storages(obj) -> set:
    import torch

    if isinstance(obj, torch.Tensor):
        return {obj.untyped_storage().data_ptr()} if obj.numel() else set()
    if isinstance(obj, (list, tuple)):
        return set().union(*(_storages(o) for o in obj)) if obj else set()
    if isinstance(obj, dict):
        return _storages(list(obj.values()))
    return set()


def _does_work(func, name: str, args, kwargs, out) -> bool:
    """Would this aten op launch device work? Not: views, allocations, ops returning no tensor (``sym_size``,
    ``promote_types``), and ops whose every output aliases an input without being in place (``to`` /
    ``contiguous`` that return their input)."""
    import torch

    if func.is_view or name in _NO_WORK:
        return False
    if name in _SYNC:
        return True
    outs = [o for o in (out if isinstance(out, (list, tuple)) else [out]) if isinstance(o, torch.Tensor)]
    if not outs:
        return False
    if all(o.numel() == 0 for o in outs):
        return False
    mutable = name.endswith("_") or any(a.is_write for a in func._schema.arguments if a.alias_info is not None)
    if not mutable and _storages(outs) <= _storages((args, kwargs)):
        return False
    return True


def _op_counter_cls():
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpCounter(TorchDispatchMode):
        """Counts the aten ops of a call, including those inside the package's custom ops (whose Python
        implementation is re-entered under the mode; a dispatch mode otherwise sees only the custom op)."""

        def __init__(self):
            super().__init__()
            self.ops: Counter = Counter()
            self.custom: Counter = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            ns = func.namespace
            if ns == "rspeft_fast":
                from torch._library.custom_ops import OPDEFS

                name = func._schema.name
                self.custom[name] += 1
                opdef = OPDEFS.get(name)
                if opdef is not None:
                    with self:
                        return opdef._init_fn(*args, **kwargs)
                return func(*args, **kwargs)
            out = func(*args, **kwargs)
            name = func._schema.name
            self.ops[name] += 1
            if not _does_work(func, name, args, kwargs, out):
                self.ops["#nowork:" + name] += 1
            return out

        def summary(self) -> dict:
            total = sum(v for k, v in self.ops.items() if not k.startswith("#"))
            no_work = {k[len("#nowork:"):]: v for k, v in self.ops.items() if k.startswith("#nowork:")}
            syncs = sum(v for k, v in self.ops.items() if k in _SYNC)
            work = {k: v - no_work.get(k, 0) for k, v in self.ops.items() if not k.startswith("#")}
            work = {k: v for k, v in work.items() if v}
            return {"aten_ops": total, "device_ops": sum(work.values()), "syncs": syncs,
                    "custom_ops": dict(self.custom), "ops": dict(sorted(work.items()))}

    return OpCounter


def OpCounter():  # noqa: N802 - a class made lazily (torch imported late)
    return _op_counter_cls()()


# ----------------------------------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------------------------------
@dataclass
class HostCase:
    name: str
    label: str
    shape: str
    make: Callable  # (impl) -> (module, x)
    op: Callable | None = None  # (module, x, grad) -> callable running the custom op alone
    extra: dict = field(default_factory=dict)


def _seed(m):
    import torch

    torch.manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
    return m


def _mufa_make(impl):
    import torch

    from ..modules.mufa import MuFAAdapter

    m = _seed(MuFAAdapter(64, rates=(8, 16, 32), impl=impl))
    return m, torch.randn(2, 8, 64)


def _mufa_op(m, x, grad):
    import torch

    from ..ops.mufa import bottleneck_fwd_op

    cs = torch.cat([g.expand(r) for g, r in zip(m.gate.detach().float().unbind(0), m.sizes)]).requires_grad_(grad)
    args = (m.down.weight, m.down.bias, m.up.weight, m.up.bias, cs, 1.0, None, True, x.dtype)

    def call(xx):
        return bottleneck_fwd_op(xx, *args)[0]

    return call


def _eqam_make(impl):
    import torch

    from ..modules.qlinear import EQAM

    m = _seed(EQAM(64, hidden=16, impl=impl))
    return m, torch.randn(2, 4, 4, 64)


def _eqam_op(m, x, grad):
    from ..ops.qlinear import _eqam_fwd

    def call(xx):
        return _eqam_fwd(xx.reshape(-1, 64), m.down.weight, m.down.bias, m.up.weight, m.up.bias, m.bits, grad)[0].view(xx.shape)

    return call


def _mga_make(L, B, share):
    def make(impl):
        import torch

        from ..modules.mga import BiShareAdapter, MGAdapter

        sh = BiShareAdapter(32, heads=4) if share else None
        m = _seed(MGAdapter(64, hidden=32, heads=4, share=sh, impl=impl))
        return m, torch.randn(B, L, 64)

    return make


CASES = [
    HostCase("mufa", "MuFA", "x (2, 8, 64), rates 8/16/32 (R = 14)", _mufa_make, _mufa_op),
    HostCase("eqam", "EQAM", "x (2, 4, 4, 64), hidden 16, 8 bits", _eqam_make, _eqam_op),
    HostCase("mga_seq", "MGA per-sequence (image)", "x (2, 8, 64), hidden 32, 4 heads", _mga_make(8, 2, False)),
    HostCase("mga_seq_bishare", "MGA per-sequence + BiShare (text)", "x (2, 8, 64), hidden 32 / 16, 4 heads",
             _mga_make(8, 2, True)),
    HostCase("mga_blocked", "MGA blocked (L > 128)", "x (1, 130, 64), hidden 32, 4 heads", _mga_make(130, 1, False)),
]


def _floor_call(m, x, grad):
    import torch

    params = [p for p in m.parameters()]

    class Floor(torch.autograd.Function):
        @staticmethod
        def forward(ctx, xx, *ps):
            return torch.empty_like(xx)

        @staticmethod
        def backward(ctx, dy):
            return (torch.empty_like(dy),) + tuple(torch.empty_like(p) for p in params)

    def call(xx):
        return Floor.apply(xx, *params)

    return call


# ----------------------------------------------------------------------------------------------------
# measuring
# ----------------------------------------------------------------------------------------------------
def calibration(reps: int = 200) -> dict:
    """Single-thread speed of this machine now: ``sum(range(1000))`` and a 4×4 ``torch.add``, µs (min, median)."""
    import torch

    a, b = torch.randn(4, 4), torch.randn(4, 4)

    def stat(fn, number):
        vals = sorted(t / number * 1e6 for t in timeit.repeat(fn, number=number, repeat=reps))
        return {"min_us": round(vals[0], 3), "median_us": round(statistics.median(vals), 3)}

    return {"sum_range_1000": stat(lambda: sum(range(1000)), 20), "torch_add_4x4": stat(lambda: torch.add(a, b), 50)}


class _Runner:
    """One (case, variant, mode): a zero-argument call to time and its grad reset."""

    def __init__(self, case: HostCase, variant: str, mode: str):
        import torch

        self.case, self.variant, self.mode = case, variant, mode
        impl = "reference" if variant == "eager" else "triton"
        m, x = case.make(impl)
        grad = mode == "fwd+bwd"
        for p in m.parameters():
            p.requires_grad_(grad)
        self.x = x.requires_grad_(grad)
        self.params = [p for p in m.parameters() if p.requires_grad]
        if variant in ("module", "eager"):
            fn = m
        elif variant == "op":
            fn = case.op(m, x, grad)
        else:
            fn = _floor_call(m, x, grad)
        xx = self.x
        if grad:
            dy = torch.randn(x.shape)

            def call():
                fn(xx).backward(dy)
        else:
            def call():
                with torch.no_grad():
                    fn(xx)
        self.call = call
        self.samples: list[int] = []

    def reset(self):
        """Outside the timed call: gradients to None and, for fwd+bwd, every parameter changed in place (its
        ``_version`` bumped, as an optimizer step does), so caches of derived tensors are remade as in training."""
        if self.mode == "fwd+bwd":
            import torch

            self.x.grad = None
            with torch.no_grad():
                for p in self.params:
                    p.grad = None
                    p.add_(0.0)

    def time(self, n: int) -> None:
        pc = time.perf_counter_ns
        call, reset, out = self.call, self.reset, self.samples
        for _ in range(n):
            reset()
            t0 = pc()
            call()
            out.append(pc() - t0)

    def count(self) -> dict:
        self.reset()
        Counter_ = _op_counter_cls()
        c = Counter_()
        before = _Launches.count
        names_before = Counter(_Launches.names)
        with c:
            self.call()
        res = c.summary()
        res["triton_launches"] = _Launches.count - before
        res["kernels"] = dict(Counter(_Launches.names) - names_before)
        return res

    def stats(self) -> dict:
        us = sorted(v / 1e3 for v in self.samples)
        q20 = us[int(0.2 * (len(us) - 1))]
        return {"median_us": round(statistics.median(us), 2), "q20_us": round(q20, 2), "min_us": round(us[0], 2),
                "n": len(us)}


VARIANTS = ("floor", "op", "module", "eager")
MODES = ("fwd", "fwd+bwd")


def run(cases, reps: int, rounds: int, log=print) -> dict:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(cases, reps, rounds, log)
    finally:
        torch.set_num_threads(threads)


def _run(cases, reps: int, rounds: int, log) -> dict:
    runners = []
    for case in cases:
        for mode in MODES:
            for v in VARIANTS:
                if v == "op" and case.op is None:
                    continue
                runners.append(_Runner(case, v, mode))
    for r in runners:  # warm-up (first calls: imports, plan caches, autograd graph types)
        r.time(5)
        r.samples.clear()
    counts = {}
    for r in runners:
        counts[(r.case.name, r.variant, r.mode)] = r.count()
    per_round = max(1, reps // rounds)
    for i in range(rounds):
        for r in runners:
            r.time(per_round)
        log(f"  round {i + 1}/{rounds}")
    out: dict = {}
    for r in runners:
        rec = out.setdefault(r.case.name, {"label": r.case.label, "shape": r.case.shape, "results": {}})
        rec["results"].setdefault(r.mode, {})[r.variant] = {**r.stats(), **counts[(r.case.name, r.variant, r.mode)]}
    for name, rec in out.items():
        t = TARGETS.get(name)
        if t:
            res = rec["results"]
            rec["targets"] = {
                mode: {"target_us": t[i], "module_median_us": res[mode]["module"]["median_us"],
                       "met": res[mode]["module"]["median_us"] <= t[i]}
                for i, mode in enumerate(MODES)
            }
    return out


def to_markdown(data: dict) -> str:
    env, cal = data["env"], data["calibration"]
    lines = [
        f"# Host overhead per call (kernels stubbed) — {env['date']}",
        "",
        f"{env['device']}; torch {env['torch']}, triton {env['triton']}, commit {env.get('git_commit')}; "
        f"{data['reps']} timed calls per cell in {data['rounds']} interleaved rounds; 1 torch thread.",
        f"Calibration (min / median µs): `sum(range(1000))` {cal['before']['sum_range_1000']['min_us']} / "
        f"{cal['before']['sum_range_1000']['median_us']} before, {cal['after']['sum_range_1000']['min_us']} / "
        f"{cal['after']['sum_range_1000']['median_us']} after; 4×4 torch add {cal['before']['torch_add_4x4']['min_us']} / "
        f"{cal['before']['torch_add_4x4']['median_us']} before, {cal['after']['torch_add_4x4']['min_us']} / "
        f"{cal['after']['torch_add_4x4']['median_us']} after. Load average {data['load_before']} → {data['load_after']}.",
        "",
        "µs per call: median (min). Launches = Triton kernel launches; device ops = aten ops that launch device work "
        "(views, `empty*`, `detach` excluded); syncs must be 0.",
        "",
        "| adapter | mode | floor | op | module | eager | module launches | module device ops | eager device ops | syncs | target | met |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, rec in data["cases"].items():
        for mode in MODES:
            res = rec["results"][mode]

            def cell(v):
                r = res.get(v)
                return "—" if r is None else f"{r['median_us']:.1f} ({r['min_us']:.1f})"

            mod = res["module"]
            tgt = rec.get("targets", {}).get(mode)
            lines.append(
                f"| {rec['label']} | {mode} | {cell('floor')} | {cell('op')} | {cell('module')} | {cell('eager')} | "
                f"{mod['triton_launches']} | {mod['device_ops']} | {res['eager']['device_ops']} | {mod['syncs']} | "
                f"{tgt['target_us'] if tgt else '—'} | {('yes' if tgt['met'] else 'no') if tgt else '—'} |")
    lines += ["", "Device ops of the fused module per call (aten op: count):", ""]
    for name, rec in data["cases"].items():
        for mode in MODES:
            ops = rec["results"][mode]["module"]["ops"]
            desc = ", ".join(f"{k.replace('aten::', '')} {v}" for k, v in ops.items()) or "none"
            lines.append(f"* {rec['label']} {mode}: {desc}")
    lines += ["", f"Shapes: " + "; ".join(f"{rec['label']}: {rec['shape']}" for rec in data["cases"].values()), ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rspeft_fast bench --host", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/host-<date>/)")
    p.add_argument("--cases", default=",".join(c.name for c in CASES), help="comma list of cases")
    p.add_argument("--reps", type=int, default=400, help="timed calls per cell (default 400)")
    p.add_argument("--rounds", type=int, default=8, help="interleaved rounds the calls are split into")
    p.add_argument("--tag", default="", help="suffix of the output file names (host-<tag>.json), e.g. before/after")
    return p


def main(argv: list[str] | None = None) -> int:
    _ensure_interpreter()
    args = build_parser().parse_args(argv)
    import torch  # noqa: F401

    from .cli import default_out_dir
    from .timing import environment

    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    known = {c.name: c for c in CASES}
    bad = [n for n in names if n not in known]
    if bad:
        print(f"--cases: unknown {bad}; choose from {list(known)}", file=sys.stderr)
        return 2
    env = environment("cpu")
    out = Path(args.out) if args.out else default_out_dir("host", env["date"][:10].replace("-", ""))
    out.mkdir(parents=True, exist_ok=True)
    data = {"schema": 1, "env": env, "reps": args.reps, "rounds": args.rounds,
            "method": "kernels stubbed (TRITON_INTERPRET=1, interpreter launch = no-op); perf_counter_ns per call",
            "load_before": [round(v, 2) for v in os.getloadavg()]}
    print(f"rspeft_fast bench --host: {env['device']}; results in {out}", flush=True)
    with stub_triton_launches():
        data["calibration"] = {"before": calibration()}
        data["cases"] = run([known[n] for n in names], args.reps, args.rounds)
        data["calibration"]["after"] = calibration()
    data["load_after"] = [round(v, 2) for v in os.getloadavg()]
    stem = f"host-{args.tag}" if args.tag else "host"
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1, default=str))
    md = to_markdown(data)
    (out / f"{stem}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
