"""``python -m rspeft_fast bench [--quick] [--parity] [--out DIR] ...``: run what this machine supports.

GPU: every op at the SPEC §2 shapes (eager, torch.compile, fused), the end-to-end training steps of the
real models, and (with ``--parity`` or ``--what ...,parity``) the 200-step parity check.
CPU: the same at small sizes; the Triton kernels run in Triton's interpreter (a functional run whose
time is not a performance number), the triplet loss on the C++ extension.

Writes ``results.json`` (environment, shapes, medians and quantiles per implementation, speedups,
errors against eager, unavailable implementations with their reason), ``results.md`` and
``speedup.png`` into ``benchmarks/results/<device>-<date>/`` (or ``--out``). The JSON is rewritten
after every case, so a run that is cut short leaves its partial results.
Exit status: 0, or 1 if an implementation failed with an error or the parity check failed.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
from pathlib import Path

__all__ = ["main", "build_parser", "default_out_dir"]

WHAT = ("ops", "e2e", "parity")


def build_parser() -> argparse.ArgumentParser:
    from .cases import OPS, VARIANTS

    p = argparse.ArgumentParser(prog="python -m rspeft_fast bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes and short timings (CI); on CPU torch.compile is not run")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/<device>-<date>/)")
    p.add_argument("--what", default=None, help=f"comma list of {','.join(WHAT)} (default: ops,e2e; with --parity: parity)")
    p.add_argument("--parity", action="store_true", help="run the parity check (alone, unless --what names more)")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma list of ops (default all: {','.join(OPS)})")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of eager,compile,fused")
    p.add_argument("--size", choices=("spec", "small", "tiny"), default=None, help="op shapes (default: spec on GPU, small on CPU, tiny with --quick on CPU)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--no-compile", action="store_true", help="do not run torch.compile (recorded as unavailable)")
    p.add_argument("--e2e-iters", type=int, default=None, help="timed training steps per e2e variant (default 20 GPU, 10 quick GPU, 3 CPU, 1 quick CPU)")
    p.add_argument("--e2e-cases", default=None, help="comma list of e2e case names (default: all for the device)")
    p.add_argument("--parity-steps", type=int, default=None, help="fine-tuning steps of the parity check (default 200 GPU, 6 CPU, 2 quick CPU)")
    p.add_argument("--rep-ms", type=float, default=None, help="timing budget per measurement in ms (default 100 GPU, 50 quick)")
    p.add_argument("--host", action="store_true",
                   help="host overhead per call with the Triton kernels stubbed (CPU; see `bench --host --help`)")
    p.add_argument("--merge", nargs="+", metavar="DIR", default=None,
                   help="run nothing: merge the results.json of these folders (ops, e2e, parity of separate runs) into --out, "
                        "with one table and one chart")
    return p


def merge(dirs: list[str], out: Path) -> dict:
    """Combine results of separate runs (later folders win per section)."""
    data: dict = {"schema": 1, "merged_from": [str(d) for d in dirs]}
    for d in dirs:
        p = Path(d) / "results.json"
        if not p.exists():
            data.setdefault("missing", []).append(str(p))
            continue
        part = json.loads(p.read_text())
        for key in ("env", "copy_bandwidth", "ops", "e2e", "parity"):
            if key in part:
                data[key] = part[key]
        data.setdefault("args", part.get("args", {}))
    return data


def _repo_root() -> Path | None:
    here = Path(__file__).resolve().parents[2]
    return here if (here / "benchmarks").is_dir() and (here / "rspeft_fast").is_dir() else None


def default_out_dir(slug: str, date: str | None = None) -> Path:
    date = date or _dt.datetime.now().strftime("%Y%m%d")
    root = _repo_root() or Path.cwd()
    return root / "benchmarks" / "results" / f"{slug}-{date}"


def _write(out: Path, data: dict, final: bool = False) -> None:
    from .plot import plot_speedups
    from .report import to_markdown

    if final:
        data["plot"] = plot_speedups(data, str(out / "speedup.png"))
        if not data["plot"].startswith("unavailable"):
            data["plot"] = "speedup.png"
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, out / "results.json")
    (out / "results.md").write_text(to_markdown(data))


def _errors(data: dict) -> list[str]:
    errs = []
    for op, od in data.get("ops", {}).items():
        for c in od.get("cases", []):
            for mode, res in c["results"].items():
                for v, e in res.items():
                    if e.get("status") == "error":
                        errs.append(f"{c['id']} {mode} {v}: {e['reason']}")
    for c in data.get("e2e", {}).get("cases", []):
        for v, e in c["variants"].items():
            if e.get("status") == "error":
                errs.append(f"e2e {c['id']} {v}: {e['reason']}")
    p = data.get("parity")
    if p and p.get("status") == "error":
        errs.append(f"parity: {p.get('reason')}")
    return errs


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--host" in argv:  # host overhead with the kernels stubbed: its own options (bench/host.py)
        from .host import main as host_main

        return host_main(argv)
    from . import interpret_without_cuda

    interp_problem = interpret_without_cuda()  # before anything imports triton
    args = build_parser().parse_args(argv)
    import torch

    from . import cases as C
    from . import e2e as E
    from .suite import run_op_case
    from .timing import copy_bandwidth, device_slug, environment

    if args.merge:
        if not args.out:
            print("--merge needs --out", file=sys.stderr)
            return 2
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        data = merge(args.merge, out)
        data["errors"] = _errors(data)
        _write(out, data, final=True)
        print(f"merged {len(args.merge)} runs into {out / 'results.json'}, {out / 'results.md'} (plot: {data.get('plot')})")
        parity_failed = bool(data.get("parity")) and data["parity"].get("passed") is False
        return 1 if data["errors"] or parity_failed else 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda requested but no CUDA device is available", file=sys.stderr)
        return 2
    what = [w.strip() for w in (args.what or ("parity" if args.parity else "ops,e2e")).split(",") if w.strip()]
    if args.parity and "parity" not in what:
        what.append("parity")
    bad = set(what) - set(WHAT)
    if bad:
        print(f"--what: unknown {sorted(bad)}; choose from {WHAT}", file=sys.stderr)
        return 2
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for o in ops:
        if o not in C.OPS:
            print(f"--ops: unknown op {o!r}; choose from {C.OPS}", file=sys.stderr)
            return 2
    for v in variants:
        if v not in C.VARIANTS:
            print(f"--variants: unknown {v!r}; choose from {C.VARIANTS}", file=sys.stderr)
            return 2
    cpu = device.type == "cpu"
    size = args.size or C.default_size(device, args.quick)
    rep_ms = args.rep_ms if args.rep_ms is not None else (50.0 if args.quick else 100.0)
    if cpu and args.quick:
        rep_ms = min(rep_ms, 20.0)
    skip = {}
    if args.no_compile:
        skip["compile"] = "not run (--no-compile)"
    elif cpu and args.quick:
        skip["compile"] = "not run: --quick on CPU (inductor's first compile takes ~30 s per graph on a small CPU machine); run without --quick"
    if cpu and interp_problem:
        skip["fused"] = interp_problem

    env = environment(device)
    out = Path(args.out) if args.out else default_out_dir(device_slug(device), env["date"][:10].replace("-", ""))
    out.mkdir(parents=True, exist_ok=True)
    data = {"schema": 1, "env": env, "args": {**vars(args), "what": what, "size": size, "device": str(device)}}
    log = lambda s: print(s, flush=True)  # noqa: E731
    log(f"rspeft_fast bench on {env['device']} (torch {env['torch']}, triton {env['triton']}); results in {out}")
    t_start = time.perf_counter()

    if "ops" in what:
        bw = copy_bandwidth(device)
        data["copy_bandwidth"] = bw
        log(f"copy bandwidth {bw['GB_per_s']} GB/s")
        data["ops"] = {}
        for op in ops:
            data["ops"][op] = {"status": "ok", "cases": []}
            op_cases = C.cases(op, size)
            if cpu and args.quick:
                op_cases = op_cases[:1]  # smoke run: one case per op
            for case in op_cases:
                rec = run_op_case(case, device, variants=variants, skip=skip, rep_ms=rep_ms, copy_bw=bw["bytes_per_s"], log=log)
                data["ops"][op]["cases"].append(rec)
                _write(out, data)
    if "e2e" in what:
        e2e_size = "spec" if size == "spec" else "tiny"
        names = [n.strip() for n in args.e2e_cases.split(",")] if args.e2e_cases else None
        if names is None and cpu and args.quick:
            names = ["vit_tiny_mufa"]  # smoke run: one model
            data["e2e"] = {"note": "--quick on CPU: only vit_tiny_mufa is run"}
        iters = args.e2e_iters or ((10 if args.quick else 20) if not cpu else (1 if args.quick else 3))
        data["e2e"] = {**data.get("e2e", {}), "size": e2e_size, "iters": iters, "cases": []}
        for case in E.e2e_cases(e2e_size):
            if names and case.name not in names:
                continue
            data["e2e"]["cases"].append(E.run_case(case, device, warmup=1 if cpu else 3, iters=iters, log=log,
                                                   interp_iters=1 if args.quick else None))
            _write(out, data)
    if "parity" in what:
        from .parity import run_parity

        steps = args.parity_steps or (200 if not cpu else (2 if args.quick else 6))
        try:
            data["parity"] = run_parity(device, steps=steps, log=log)
        except Exception as e:  # recorded like any other failure
            status, reason = C.classify_error(e)
            data["parity"] = {"status": status, "reason": reason, "passed": None}
        _write(out, data)

    data["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    errs = _errors(data)
    data["errors"] = errs
    _write(out, data, final=True)
    log(f"wrote {out / 'results.json'}, {out / 'results.md'}" + (f", {out / 'speedup.png'}" if data.get("plot") == "speedup.png" else f" (plot {data.get('plot')})"))
    for e in errs:
        log(f"ERROR {e}")
    parity_failed = bool(data.get("parity")) and data["parity"].get("passed") is False
    if parity_failed:
        log("parity check FAILED")
    return 1 if errs or parity_failed else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
