"""Ahead-of-time compile every Triton kernel of ``kernels/{mufa,qlinear,mga,attention}.py`` for the GPUs researchers own, no GPU needed.

Triton's interpreter (``TRITON_INTERPRET=1``, what CI runs the kernels' numerics on) never runs the Triton
compiler, so it hides errors only a GPU compile shows (plain Python float globals in ``@triton.jit`` code,
``tl.dot`` shape/dtype rules, ptxas limits, shared memory per block...). ``triton.compile`` with a
``GPUTarget`` runs the whole pipeline (TTIR → TTGIR → LLIR → PTX → cubin through the bundled ``ptxas``) on a
CPU-only machine, for any compute capability.

The work is a matrix: arch (``--arch``, compute capabilities of ``kernels._launch.ARCH_PROPS``: 75, 80, 86,
89, 90, 100, 120) × dtype (``--dtypes``: bf16, fp16, fp32, tf32 = fp32 with TF32 allowed) × case. The jobs
come from the kernel modules themselves: ``kernels.<mod>.aot_launches(props, dtype, profile)`` builds each
launch with the launcher's own argument helper on meta tensors (dtypes, strides, constexprs) and lists the
configs its plan function (``plan_<launch>(shapes, dtype, props)``) allows on that arch — no launch logic is
copied here. Each job is specialised the way ``JITFunction.run`` specialises
a real launch (16-byte aligned pointers, integers divisible by 16, integers equal to 1 become constants).

For each compile it reports registers / spills / stack (``cuobjdump -res-usage``; spilled registers live in
the stack frame), shared memory (``metadata.shared`` against the arch's max opt-in shared memory per block:
a launch above it fails with OutOfResources; the compile itself does not check it) and the tensor-core
instructions of the PTX (``wgmma`` / ``mma`` and their operand type, ``-`` = none).

Fails (exit 1) on: a compile error; a planned (non-autotuned) launch over its arch's shared memory; an
autotuned launch none of whose configs fits; spills in a config its launch record lists as tuned spill-free
(``AotLaunch.spill_free``: today the bf16 MuFA forward on sm_90, R = 168 with 8-warp 64-row tiles, R = 21 all).
Other spills / over-limit autotune configs (the autotuner skips those at run time) are warnings.

Usage::

    python tools/aot_compile.py --jobs 2                                # quick profile, sm_90
    python tools/aot_compile.py --arch 80,86,89,90,100,120 --profile quick --dtypes bf16,fp32
    python tools/aot_compile.py --arch 75,80,86,89,90,100,120 --profile full \\
        --json benchmarks/results/aot-2026-12-01/full.json --md benchmarks/results/aot-2026-12-01/full.md
    python tools/aot_compile.py --groups mufa_fwd,mga --dtypes bf16 --json out.json
    python tools/aot_compile.py --list              # the jobs, nothing compiled
    python tools/aot_compile.py --coverage          # @triton.jit kernels found vs covered (JSON)
    python tools/aot_compile.py --merge a.json b.json --md all.md   # one table of several runs

Another Triton release: ``pip install --no-deps --target DIR triton==3.6.0`` and run with ``PYTHONPATH=DIR``
(the standalone compile needs nothing else; the JSON records ``triton.__version__``).

``TRITON_INTERPRET`` is removed from the environment before triton is imported (run it as a script or in a
subprocess, never import it into a process that already imported triton under the interpreter).
Used by ``tests/test_aot.py``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported (lazily, below)

GROUPS = ("mufa_fwd", "mufa_bwd", "mufa_atb", "qlinear", "mga")
AOT_MODULES = ("mufa", "qlinear", "mga")  # the kernel files with an aot_launches (MGA's lists kernels.attention's)
KERNEL_MODULES = AOT_MODULES + ("attention",)  # every kernel file (coverage)
ALL_DTYPES = ("bf16", "fp16", "fp32", "tf32")
DEFAULT_ARCHS = (90,)


def _group_of(mod: str, kernel: str) -> str:
    """The group of a launch listed by ``kernels.<mod>.aot_launches`` (MGA's lists its attention kernels too)."""
    if mod == "mufa":
        return {"mufa._bottleneck_fwd_kernel": "mufa_fwd", "mufa._bottleneck_bwd_rows_kernel": "mufa_bwd",
                "mufa._atb_splitk_kernel": "mufa_atb"}.get(kernel, "mufa_fwd")
    return mod


@dataclass
class Job:
    group: str
    kernel: str  # "module.name"
    case: str
    config: str
    args: dict  # parameter name -> value (meta tensor / Mock pointer, int, float, bool, constexpr value)
    options: dict = field(default_factory=dict)  # num_warps / num_stages (the plan's config)
    spill_strict: bool = False  # spills fail (configs the kernel owner tuned spill-free at this shape); else a warning
    autotuned: bool = False  # one config of an autotune list: over the arch's shared memory it is skipped at run time
    edge: bool = False  # not a SPEC shape (a limit the launchers accept)
    arch: int = 90

    @property
    def name(self) -> str:
        return f"sm_{self.arch} {self.kernel} [{self.case}] {self.config}"


# ------------------------------------------------------------------------------------------------------
# job lists
# ------------------------------------------------------------------------------------------------------
def _torch_dtype(name):
    import torch

    return getattr(torch, name)


def _ptr(dtype_name):
    from triton.runtime.jit import MockTensor

    return MockTensor(_torch_dtype(dtype_name))


def _cfg_label(cfg) -> str:
    kw = " ".join(f"{k.replace('BLOCK_', 'B')}{v}" for k, v in cfg.kwargs.items())
    return f"{kw} w{cfg.num_warps} s{cfg.num_stages}"


def _cfg_size(cfg):
    """Order of "largest" among autotune configs: tile volume, then warps, then stages."""
    return (math.prod(cfg.kwargs.values()), cfg.num_warps, cfg.num_stages)


def _select(cfgs, coverage):
    """The configs to compile: ``all``, ``ends`` (the first and the largest) or ``first``."""
    cfgs = list(cfgs)
    if coverage == "all" or len(cfgs) <= 1:
        return cfgs
    if coverage == "first":
        return cfgs[:1]
    largest = max(cfgs, key=_cfg_size)
    return [cfgs[0]] + ([largest] if largest is not cfgs[0] else [])


def module_jobs(mod, arch, dtypes, profile, coverage):
    """Jobs of ``kernels.<mod>.aot_launches`` on ``arch``: one per config the plan allows (autotuned launches:
    thinned by ``coverage[dtype]``)."""
    import importlib

    from rspeft_fast.kernels._launch import props_for_arch

    K = importlib.import_module(f"rspeft_fast.kernels.{mod}")
    props = props_for_arch(arch)
    jobs = []
    for dname in dtypes:
        for launch in K.aot_launches(props, dname, profile):
            if not launch.configs:  # the plan pruned every config: nothing could launch
                raise SystemExit(f"aot_compile: sm_{arch} {launch.kernel} [{launch.case}]: the plan left no config")
            cfgs = _select(launch.configs, coverage[dname]) if launch.autotuned else list(launch.configs)
            for cfg in cfgs:
                args = dict(launch.args)
                args.update(cfg.kwargs)
                jobs.append(Job(_group_of(mod, launch.kernel), launch.kernel, launch.case, _cfg_label(cfg), args,
                                dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
                                spill_strict=cfg in launch.spill_free, autotuned=launch.autotuned, edge=launch.edge,
                                arch=arch))
    return jobs


PROFILES = {
    # the CI/"done when" profile: bf16 with every config its plan allows (inference / recompute variants:
    # fewer); fp32 (IEEE dots) with the first config of each autotuned launch, training variants, without the
    # fp32 MGA text+BiShare per-sequence kernels; no TF32/fp16, no edge shapes (see each aot_launches)
    "quick": dict(dtypes=("bf16", "fp32"), coverage={"bf16": "all", "fp16": "first", "fp32": "first", "tf32": "first"},
                  edge=False, lean=True),
    # the CI slice (tests/test_aot.py): as quick with the first and the largest config of each autotuned launch
    "ci": dict(dtypes=("bf16", "fp32"), coverage={"bf16": "ends", "fp16": "first", "fp32": "first", "tf32": "first"},
               edge=False, lean=True),
    # everything: every dtype, config, variant and edge shape
    "full": dict(dtypes=ALL_DTYPES, coverage={d: "all" for d in ALL_DTYPES}, edge=True, lean=False),
}


def all_jobs(groups=GROUPS, profile="quick", dtypes=None, coverage=None, edge=None, archs=DEFAULT_ARCHS):
    """Jobs of ``groups`` on each of ``archs`` under a profile; ``dtypes`` / ``coverage`` (one mode for every
    dtype) / ``edge`` override the profile's."""
    import importlib

    groups = set(groups)
    unknown = groups - set(GROUPS)
    if unknown:
        raise SystemExit(f"unknown groups {sorted(unknown)}; known: {GROUPS}")
    prof = PROFILES[profile]
    dtypes = tuple(dtypes or prof["dtypes"])
    bad = set(dtypes) - set(ALL_DTYPES)
    if bad:
        raise SystemExit(f"unknown dtypes {sorted(bad)}; known: {ALL_DTYPES}")
    cov = {d: coverage for d in ALL_DTYPES} if coverage else prof["coverage"]
    lean = prof["lean"] and not coverage
    edge = prof["edge"] if edge is None else edge
    kprofile = "full" if not lean or edge else profile
    jobs = []
    for arch in archs:
        if groups & {"mufa_fwd", "mufa_bwd", "mufa_atb"}:
            jobs += [j for j in module_jobs("mufa", arch, dtypes, kprofile, cov) if j.group in groups]
        if "qlinear" in groups:
            jobs += module_jobs("qlinear", arch, dtypes, kprofile, cov)
        if "mga" in groups:
            jobs += module_jobs("mga", arch, dtypes, kprofile, cov)
    return jobs


# ------------------------------------------------------------------------------------------------------
# compiling one job
# ------------------------------------------------------------------------------------------------------
def _kernel_object(qualname):
    import importlib

    mod, name = qualname.split(".")
    return getattr(importlib.import_module(f"rspeft_fast.kernels.{mod}"), name)


def _jit_fn(obj):
    """The JITFunction under @triton.autotune / @triton.heuristics wrappers."""
    from triton.runtime.jit import JITFunction

    while not isinstance(obj, JITFunction) and hasattr(obj, "fn"):
        obj = obj.fn
    return obj


def _specialize(value):
    """(type, attr) as JITFunction.run specialises a launch argument (native helper when available)."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend

        return native_specialize_impl(BaseBackend, value, False, True, True)
    except ImportError:  # pragma: no cover - other triton versions: the same rules, written out
        from triton.runtime.jit import MockTensor

        if isinstance(value, MockTensor):
            return "*" + _TYPES[str(value.dtype).split(".")[-1]], "D"
        if isinstance(value, bool):
            return "u1", None
        if isinstance(value, int):
            if value == 1:
                return "constexpr", 1
            return ("i32" if -2**31 <= value < 2**31 else "i64"), ("D" if value % 16 == 0 else "")
        if isinstance(value, float):
            return "fp32", None
        raise TypeError(f"cannot specialise {value!r}")


_TYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "int8": "i8", "uint8": "u8", "int32": "i32"}


def _mock(value):
    """Meta tensors of aot_launches → the Mock pointer of their dtype (what a real, 16-byte aligned tensor is)."""
    import torch
    from triton.runtime.jit import MockTensor

    return MockTensor(value.dtype) if isinstance(value, torch.Tensor) else value


def source_of(job):
    """ASTSource for a job: signature, constexprs and divisibility attributes as a real launch has them."""
    from triton.compiler import ASTSource

    fn = _jit_fn(_kernel_object(job.kernel))
    missing = [a for a in fn.arg_names if a not in job.args]
    extra = [a for a in job.args if a not in fn.arg_names]
    if missing or extra:
        raise TypeError(f"{job.kernel}: job arguments do not match the kernel's (missing {missing}, unknown {extra})")
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        value = _mock(job.args[name])
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = value
            continue
        ty, spec = _specialize(value)
        signature[name] = ty
        if ty == "constexpr":
            constexprs[name] = spec
        elif isinstance(spec, str) and "D" in spec:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def _tool(name):
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def check_tools():
    """The bundled ptxas / cuobjdump (the AOT compile needs ptxas; the report cuobjdump)."""
    missing = [t for t in ("ptxas", "cuobjdump") if not os.access(_tool(t), os.X_OK)]
    if missing:
        raise RuntimeError(f"Triton's bundled {', '.join(missing)} missing or not executable under "
                           f"{os.path.dirname(_tool('ptxas'))}: the AOT compile cannot run")


_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def resource_usage(cubin: bytes):
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.remove(path)
    m = _RES.search(out)
    if not m:
        raise RuntimeError(f"cannot parse cuobjdump -res-usage output:\n{out}")
    reg, stack, _static_shared, local = map(int, m.groups())
    return reg, stack, local


def mma_kind(ptx: str) -> str:
    """The tensor-core instructions of a PTX listing: ``mma.bf16`` (sm_80-class ``mma.sync``), ``wgmma.bf16``
    (sm_90), ``tcgen05.f16`` (sm_100: ``tcgen05.mma ... kind::f16`` covers bf16 and fp16, the operand type is in
    the instruction descriptor, not the text), comma-separated; ``-``: none (scalar FMAs)."""
    kinds = []
    for m in re.finditer(r"\b(wgmma\.mma_async|mma\.sync)\.[\w.]*?\.(f32|f16)\.(bf16|f16|tf32|e4m3|e5m2|s8)\.", ptx):
        k = f"{m.group(1).split('.')[0]}.{m.group(3)}"
        if k not in kinds:
            kinds.append(k)
    for m in re.finditer(r"\btcgen05\.mma(?:\.[\w:]+)*?\.kind::(\w+)", ptx):
        k = f"tcgen05.{m.group(1)}"
        if k not in kinds:
            kinds.append(k)
    return ",".join(kinds) or "-"


def compile_job(job, target=None):
    """Compile one job for its arch; a dict of results (never raises for a compile error: ok=False, error=...)."""
    import triton
    from triton.backends.compiler import GPUTarget

    from rspeft_fast.kernels._launch import props_for_arch

    target = target or GPUTarget("cuda", job.arch, 32)
    t0 = time.time()
    res = dict(arch=job.arch, group=job.group, kernel=job.kernel, case=job.case, config=job.config,
               spill_strict=job.spill_strict, autotuned=job.autotuned, edge=job.edge,
               limit=props_for_arch(job.arch).smem_per_block)
    c0 = _cpu_seconds()
    try:
        src = source_of(job)
        from rspeft_fast.kernels._launch import LAUNCH_OPTIONS

        k = triton.compile(src, target=target, options={**LAUNCH_OPTIONS, **job.options})
        regs, stack, local = resource_usage(k.asm["cubin"])
        res.update(ok=True, regs=regs, stack=stack, local=local, spill_bytes=stack + local,
                   shared=int(k.metadata.shared), mma=mma_kind(k.asm["ptx"]), num_warps=k.metadata.num_warps,
                   num_stages=k.metadata.num_stages)
    except Exception as e:  # noqa: BLE001 - reported, not swallowed: the caller fails on ok=False
        res.update(ok=False, error=f"{type(e).__name__}: {e}")
    res["seconds"] = round(time.time() - t0, 2)
    res["cpu_s"] = round(_cpu_seconds() - c0, 2)
    return res


def _cpu_seconds():
    """CPU seconds of this process and its finished children (ptxas, cuobjdump)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


_WORKER_JOBS = None


def _worker(i):
    return compile_job(_WORKER_JOBS[i])


def run_jobs(jobs, n_procs=1, progress=None):
    global _WORKER_JOBS
    if n_procs <= 1:
        out = []
        for j in jobs:
            out.append(compile_job(j))
            if progress:
                progress(out[-1])
        return out
    import multiprocessing as mp

    _WORKER_JOBS = jobs
    with mp.get_context("fork").Pool(n_procs) as pool:
        out = []
        for r in pool.imap(_worker, range(len(jobs))):
            out.append(r)
            if progress:
                progress(r)
    return out


# ------------------------------------------------------------------------------------------------------
# coverage: every @triton.jit kernel of the three modules has at least one job
# ------------------------------------------------------------------------------------------------------
def kernels_found():
    """``module.name`` of every kernel (autotuned/heuristics-wrapped, or a JITFunction named ``*_kernel``)
    defined in kernels/{mufa,qlinear,mga,attention}.py; device helpers (``_dot``, ``gelu``...) are compiled inline."""
    import importlib

    from triton.runtime.jit import JITFunction

    found = []
    for mod in KERNEL_MODULES:
        m = importlib.import_module(f"rspeft_fast.kernels.{mod}")
        for name, obj in vars(m).items():
            fn = _jit_fn(obj)
            if not isinstance(fn, JITFunction) or getattr(fn.fn, "__module__", None) != m.__name__:
                continue
            if obj is not fn or name.endswith("_kernel"):
                found.append(f"{mod}.{name}")
    return sorted(found)


# ------------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------------
def problems(results):
    """(failures, warnings): lists of strings."""
    fails, warns = [], []
    for r in results:
        where = f"sm_{r['arch']} {r['kernel']} [{r['case']}] {r['config']}"
        if not r["ok"]:
            fails.append(f"COMPILE ERROR {where}: {r['error']}")
            continue
        if r["spill_bytes"]:
            msg = f"spills {where}: {r['spill_bytes']} bytes of stack (regs {r['regs']})"
            (fails if r["spill_strict"] else warns).append(msg)
        if r["shared"] > r["limit"]:
            msg = f"shared memory {where}: {r['shared']} B > sm_{r['arch']}'s {r['limit']} B"
            if r["autotuned"]:
                warns.append(msg + " (this autotune config is skipped at run time: OutOfResources)")
            else:
                fails.append(msg + " (a launch fails with OutOfResources)")
    # an autotuned launch needs at least one config that can launch, per case
    for (arch, kern, case), fits in _autotuned_fits(results).items():
        if not any(fits):
            limit = next(r["limit"] for r in results if r["arch"] == arch)
            fails.append(f"shared memory sm_{arch} {kern} [{case}]: no autotune config fits sm_{arch}'s {limit} B")
    return fails, warns


def _autotuned_fits(results):
    by_case = {}
    for r in results:
        if r["ok"] and r["autotuned"]:
            by_case.setdefault((r["arch"], r["kernel"], r["case"]), []).append(r["shared"] <= r["limit"])
    return by_case


def table(results):
    head = ("arch", "kernel", "case", "config", "status", "regs", "spill B", "shared B", "tensor cores", "cpu s")
    rows = []
    for r in results:
        if r["ok"]:
            status = "ok" if r["shared"] <= r["limit"] else "OVER"
            rows.append((r["arch"], r["kernel"], r["case"], r["config"], status, r["regs"], r["spill_bytes"], r["shared"],
                         r["mma"], r["cpu_s"]))
        else:
            rows.append((r["arch"], r["kernel"], r["case"], r["config"], "ERROR", "", "", "",
                         r["error"].splitlines()[0][:60], r["cpu_s"]))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = lambda row: " | ".join(str(x).ljust(w) for x, w in zip(row, widths))  # noqa: E731
    lines = [fmt(head), "-+-".join("-" * w for w in widths)] + [fmt(r) for r in rows]
    return "\n".join(lines)


def matrix(results):
    """Per (arch, dtype): launches (kernel × case), launches that fit (a planned launch's config / at least one
    config of an autotuned one compiles within the arch's shared memory), compiles, configs over the limit,
    configs with spills, compile errors."""
    cells = {}
    launches = {}
    for r in results:
        key = (r["arch"], r["case"].split()[0])
        c = cells.setdefault(key, dict(launches=0, fit=0, compiles=0, over=0, spills=0, errors=0))
        c["compiles"] += 1
        if not r["ok"]:
            c["errors"] += 1
        else:
            c["over"] += r["shared"] > r["limit"]
            c["spills"] += r["spill_bytes"] > 0
        launches.setdefault((key, r["kernel"], r["case"]), []).append(r["ok"] and r["shared"] <= r["limit"])
    for (key, _k, _c), fits in launches.items():
        cells[key]["launches"] += 1
        cells[key]["fit"] += any(fits)
    return cells


def matrix_md(results, triton_version, profile):
    cells = matrix(results)
    lines = [f"AOT compile matrix, Triton {triton_version}, profile {profile}: launches that fit / launches "
             f"(compiles; configs over the arch's shared memory; configs with spills; compile errors)", "",
             "| arch | dtype | fit / launches | compiles | over limit | spills | errors |",
             "|---|---|---|---|---|---|---|"]
    for (arch, dt), c in sorted(cells.items()):
        lines.append(f"| sm_{arch} | {dt} | {c['fit']} / {c['launches']} | {c['compiles']} | {c['over']} | "
                     f"{c['spills']} | {c['errors']} |")
    return "\n".join(lines) + "\n"


def merge_md(runs: list[dict], names: list[str] | None = None) -> str:
    """One markdown matrix (Triton release × arch × dtype) of several ``--json`` runs, plus their totals and
    failures: the committed table of a matrix run made of several processes (one per release / arch)."""
    rows = {}
    for run in runs:
        for (arch, dt), c in matrix(run["results"]).items():
            key = (tuple(int(p) for p in run["triton"].split(".")[:3]), arch, dt)
            t = rows.setdefault(key, dict(launches=0, fit=0, compiles=0, over=0, spills=0, errors=0,
                                          groups=set(), profile=set()))
            for k in ("launches", "fit", "compiles", "over", "spills", "errors"):
                t[k] += c[k]
            t["groups"].update(run.get("groups", ()))
            t["profile"].add(run.get("profile", "?"))
    lines = ["| Triton | arch | dtype | profile | groups | fit / launches | compiles | over limit | spills | errors |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (ver, arch, dt), t in sorted(rows.items()):
        lines.append(f"| {'.'.join(map(str, ver))} | sm_{arch} | {dt} | {','.join(sorted(t['profile']))} | "
                     f"{'all' if t['groups'] == set(GROUPS) else ','.join(sorted(t['groups']))} | {t['fit']} / {t['launches']} | {t['compiles']} | "
                     f"{t['over']} | {t['spills']} | {t['errors']} |")
    fails = [f for run in runs for f in run.get("failures", [])]
    lines += ["", f"Failures (exit status 1): {len(fails)}"] + [f"- {f}" for f in fails]
    names = names or [f"run {i}" for i in range(len(runs))]
    lines += ["", "Runs: " + "; ".join(
        f"{n}: Triton {r['triton']}, sm_{',sm_'.join(map(str, r.get('archs', [])))}, {len(r['results'])} compiles, "
        f"{r.get('cpu_s', float('nan')):.0f} CPU s, {r.get('wall_s', float('nan')):.0f} s wall, "
        f"failures {len(r.get('failures', []))}" for n, r in zip(names, runs))]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--groups", default=",".join(GROUPS), help=f"comma-separated, of {GROUPS}")
    ap.add_argument("--arch", default=",".join(map(str, DEFAULT_ARCHS)),
                    help="comma-separated compute capabilities (of 75,80,86,89,90,100,120; default 90)")
    ap.add_argument("--profile", choices=sorted(PROFILES), default="quick",
                    help="quick (default), ci (the test suite's slice) or full (every config, dtype and edge shape)")
    ap.add_argument("--dtypes", help=f"override: comma-separated, of {','.join(ALL_DTYPES)} "
                                     "(tf32 = fp32 with TF32 allowed)")
    ap.add_argument("--coverage-mode", choices=("all", "ends", "first"),
                    help="override, every dtype: all autotune configs, the first and the largest, or the first")
    ap.add_argument("--edge", action="store_true", help="also the edge (non-SPEC) shapes")
    ap.add_argument("--jobs", type=int, default=1, help="compile processes")
    ap.add_argument("--json", help="write the results (and problems) here")
    ap.add_argument("--md", help="write the arch × dtype matrix (markdown) here")
    ap.add_argument("--list", action="store_true", help="list the jobs and exit")
    ap.add_argument("--coverage", action="store_true", help="print kernels found / covered as JSON and exit")
    ap.add_argument("--progress", action="store_true", help="one line per finished compile on stderr")
    ap.add_argument("--quiet", action="store_true", help="no table (summary only)")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="compile nothing: merge these --json runs into one Triton x arch x dtype table "
                         "(printed, and written to --md); exit 1 if any run had a failure")
    a = ap.parse_args(argv)
    if a.merge:
        runs = []
        for path in a.merge:
            with open(path) as f:
                runs.append(json.load(f))
        text = merge_md(runs, [os.path.basename(p) for p in a.merge])
        print(text, end="")
        if a.md:
            with open(a.md, "w") as f:
                f.write(text)
        return 1 if any(r.get("failures") for r in runs) else 0
    if os.environ.get("TRITON_INTERPRET", "0") == "1" and "triton" in sys.modules:
        raise SystemExit("aot_compile: triton was imported under TRITON_INTERPRET=1; run this in a fresh process")
    os.environ.pop("TRITON_INTERPRET", None)
    check_tools()
    import triton

    from rspeft_fast.kernels._launch import ARCH_PROPS

    archs = [int(x) for x in a.arch.split(",") if x.strip()]
    bad = [x for x in archs if x not in ARCH_PROPS]
    if bad:
        raise SystemExit(f"unknown arch {bad}; known: {sorted(ARCH_PROPS)}")
    if a.coverage:
        jobs = all_jobs(GROUPS, "full", coverage="first", edge=False, archs=archs[:1])
        found = kernels_found()
        covered = sorted({j.kernel for j in jobs})
        print(json.dumps(dict(found=found, covered=covered, missing=sorted(set(found) - set(covered)))))
        return 0
    groups = [g for g in a.groups.split(",") if g]
    dtypes = [d for d in a.dtypes.split(",") if d] if a.dtypes else None
    jobs = all_jobs(groups, a.profile, dtypes=dtypes, coverage=a.coverage_mode, edge=True if a.edge else None,
                    archs=archs)
    if a.list:
        for j in jobs:
            print(j.name, j.options)
        print(f"{len(jobs)} jobs")
        return 0

    def progress(r):
        status = f"ok regs={r['regs']} spill={r['spill_bytes']} shared={r['shared']}" if r["ok"] else "ERROR"
        print(f"[{r['seconds']:6.1f}s wall {r['cpu_s']:5.1f}s cpu] sm_{r['arch']} {r['kernel']} [{r['case']}] "
              f"{r['config']}: {status}", file=sys.stderr, flush=True)

    t0 = time.time()
    results = run_jobs(jobs, a.jobs, progress if a.progress else None)
    wall = time.time() - t0
    fails, warns = problems(results)
    if not a.quiet:
        print(table(results))
    n_ok = sum(r["ok"] for r in results)
    cpu = sum(r["cpu_s"] for r in results)
    print(f"\nTriton {triton.__version__}: {n_ok}/{len(results)} compiled for sm_{',sm_'.join(map(str, archs))} in "
          f"{wall:.1f} s ({a.jobs} process(es), {cpu:.0f} CPU s); {len(fails)} failure(s), {len(warns)} warning(s)")
    print(matrix_md(results, triton.__version__, a.profile))
    for w in warns:
        print("WARNING", w)
    for f in fails:
        print("FAIL", f)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(triton=triton.__version__, archs=archs, results=results, failures=fails, warnings=warns,
                           wall_s=wall, cpu_s=cpu, groups=groups, profile=a.profile,
                           dtypes=sorted({r["case"].split()[0] for r in results}),
                           matrix={f"sm_{k[0]} {k[1]}": v for k, v in sorted(matrix(results).items())}), f, indent=1)
    if a.md:
        with open(a.md, "w") as f:
            f.write(matrix_md(results, triton.__version__, a.profile))
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
