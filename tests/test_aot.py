"""Every Triton kernel compiles and fits for the GPUs researchers own, under the Triton releases torch ships.

CI checks the kernels' numerics through Triton's interpreter, which never runs the Triton compiler: errors only
a GPU compile shows (``tl.dot`` layout/dtype rules, ptxas limits, shared memory per block) would otherwise first
appear on a user's GPU. ``tools/aot_compile.py`` compiles the launches of ``kernels/*.py``, as their plans
choose them for each arch (``kernels.<mod>.aot_launches``), ahead of time through the bundled ptxas, and checks
shared memory against the arch's limit (``kernels._launch.ARCH_PROPS``), registers/spills and tensor cores.

The CI slice (``--profile ci``: SPEC §2 shapes, bf16 with the first and the largest config of each autotuned
launch, fp32 with the first, planned launches always), not marked slow: every kernel on sm_86 (99 KB: RTX
3090/4090, A6000, L4 — the same limit as sm_89 / sm_120) and sm_90 (227 KB: H100/H200) under the installed
Triton. Marked ``slow`` (the rest of the matrix, its own command: ``python -m pytest tests/test_aot.py -m slow``):
the same slice on the other archs (sm_75, 80, 89, 100, 120) under the installed Triton, on sm_90 under the Triton
releases of the other supported torch versions installed as side packages (3.6: torch 2.11, 3.9: torch 2.15;
``scripts/setup.sh`` installs them with ``pip install --no-deps --target .triton-side/<version>``; set
``RSPEFT_TRITON_SIDE`` to a folder holding ``<version>/`` subfolders to use others), and the MGA kernels on
sm_100 (B200) under Triton 3.6, whose Blackwell pipeline once rejected them. A missing side package or ptxas
FAILS (never a skip). ``RSPEFT_AOT_FULL=1``: every part with the full profile (every dtype, config, edge shape;
the documented matrix of benchmarks/NOTES.md "Portability").

Each part is a subprocess (``TRITON_INTERPRET``, set by conftest.py here, must be unset before triton is
imported); ``pytest -n 2`` spreads the parts over its workers. Compiles are cached by Triton (``~/.triton/cache``).
"""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "aot_compile.py"
FULL = os.environ.get("RSPEFT_AOT_FULL", "0") == "1"
SIDE_RELEASES = ("3.6.0", "3.9.0")
GROUPS = {"mufa": "mufa_fwd,mufa_bwd,mufa_atb", "qlinear": "qlinear", "mga": "mga"}

PROFILE = "full" if FULL else "ci"
DTYPES = {"bf16", "fp16", "fp32", "tf32"} if FULL else {"bf16", "fp32"}
CI_ARCHS = (86, 90)  # the not-slow slice: every kernel for these under the installed Triton
OTHER_ARCHS = (75, 80, 89, 100, 120)


def _part(name, side, arch, groups, slow):
    part = (name, side, ["--profile", PROFILE, "--arch", str(arch), "--groups", groups], DTYPES)
    return pytest.param(part, id=name, marks=pytest.mark.slow) if slow else pytest.param(part, id=name)


PARTS = [_part(f"sm{a}-{g}", None, a, gs, slow=a not in CI_ARCHS)
         for a in CI_ARCHS + OTHER_ARCHS for g, gs in GROUPS.items()]
PARTS += [_part(f"triton{v}-sm90-{g}", v, 90, gs, slow=True) for v in SIDE_RELEASES for g, gs in GROUPS.items()]
# Triton 3.6's Blackwell pipeline (TMEM layouts) once aborted on MGA's per-sequence backward (a sum of a sum,
# kernels/mga.py): the MGA kernels on sm_100 under torch 2.11's Triton, as a regression check
PARTS += [_part("triton3.6.0-sm100-mga", "3.6.0", 100, "mga", slow=True)]

KERNELS = {  # every kernel the kernel files define today (a new one must get jobs from an aot_launches)
    "mufa._bottleneck_fwd_kernel", "mufa._bottleneck_bwd_rows_kernel", "mufa._atb_splitk_kernel", "mufa._bwd_finalize_kernel",
    "mufa._bwd_gate_kernel",
    "qlinear._row_scale_kernel", "qlinear._weight_kernel", "qlinear._quantize_rows_kernel", "qlinear._fwd_kernel",
    "qlinear._bwd_dx_kernel", "qlinear._bwd_dw_kernel",
    "mga._mga_fwd_kernel", "mga._bwd_msa2_kernel", "mga._bwd_share_kernel", "mga._bwd_msa1_kernel",
    "attention._attn_fwd_kernel", "attention._attn_bwd_dq_kernel", "attention._attn_bwd_dkdv_kernel",
}


def side_package(version: str) -> Path:
    base = Path(os.environ.get("RSPEFT_TRITON_SIDE", ROOT / ".triton-side"))
    return base / version


def _run(args, timeout=1500, pythonpath=None):
    """The tool in a subprocess on this checkout's package (ROOT first on the path, after a side Triton)."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join([str(p) for p in (pythonpath, ROOT) if p]
                                        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _bundled(tool: str) -> Path:
    import triton  # (imported under the interpreter here: only its location is used)

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool


def test_bundled_ptxas_and_cuobjdump_present():
    """No ptxas, no AOT compile: that is a failure of this CI machine, never a skip."""
    for tool in ("ptxas", "cuobjdump"):
        path = _bundled(tool)
        assert path.is_file() and os.access(path, os.X_OK), (
            f"Triton's bundled {tool} is missing or not executable at {path}: the AOT compile test cannot run "
            f"(reinstall triton with its NVIDIA backend binaries)")
    out = subprocess.run([str(_bundled("ptxas")), "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "release" in out.stdout, f"bundled ptxas does not run: {out.stdout}{out.stderr}"


@pytest.mark.slow
@pytest.mark.parametrize("version", SIDE_RELEASES)
def test_side_release_installed(version):
    path = side_package(version)
    meta = list(path.glob("triton-*.dist-info"))
    assert (path / "triton" / "__init__.py").is_file() and meta, (
        f"Triton {version} side package missing at {path}: run scripts/setup.sh (or pip install --no-deps "
        f"--target {path} triton=={version})")
    assert meta[0].name == f"triton-{version}.dist-info", f"{path} holds {meta[0].name}, expected triton {version}"


def test_every_kernel_has_jobs():
    """Each @triton.jit kernel of kernels/{mufa,qlinear,mga,attention}.py is compiled by some part."""
    p = _run(["--coverage"], timeout=300)
    assert p.returncode == 0, f"aot_compile.py --coverage failed:\n{p.stdout}\n{p.stderr}"
    cov = json.loads(p.stdout.strip().splitlines()[-1])
    assert set(cov["found"]) >= KERNELS, f"kernel discovery lost kernels: {sorted(KERNELS - set(cov['found']))}"
    assert not cov["missing"], f"kernels without AOT jobs (add them to the module's aot_launches): {cov['missing']}"


def test_unknown_arch_is_refused():
    p = _run(["--arch", "90,61", "--list"], timeout=300)
    assert p.returncode != 0 and "unknown arch" in (p.stdout + p.stderr)


def _aot():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import aot_compile
    finally:
        sys.path.pop(0)
    return aot_compile


def _res(kernel="mufa._bottleneck_fwd_kernel", case="bf16 x", config="c1", shared=1000, limit=2000, autotuned=False,
         ok=True, spill=0, strict=False, arch=86):
    r = dict(arch=arch, group="g", kernel=kernel, case=case, config=config, ok=ok, autotuned=autotuned, edge=False,
             spill_strict=strict, limit=limit, shared=shared, spill_bytes=spill, regs=64)
    if not ok:
        r["error"] = "CompilationError: boom"
    return r


def test_problems_rules():
    """The exit-status rules of aot_compile.py: a planned launch over its arch's limit, an autotuned launch with no
    fitting config, a compile error and strict spills fail; an over-limit config of an autotuned launch that has
    a fitting one, and other spills, only warn."""
    A = _aot()
    fails, warns = A.problems([_res(shared=2500)])
    assert len(fails) == 1 and "sm_86" in fails[0] and not warns
    fails, warns = A.problems([_res(shared=2500, autotuned=True, config="a"), _res(shared=100, autotuned=True, config="b")])
    assert not fails and len(warns) == 1
    fails, _ = A.problems([_res(shared=2500, autotuned=True, config="a"), _res(shared=2100, autotuned=True, config="b")])
    assert any("no autotune config fits" in f for f in fails)
    fails, _ = A.problems([_res(ok=False)])
    assert fails and "COMPILE ERROR" in fails[0]
    fails, warns = A.problems([_res(spill=8), _res(spill=8, strict=True, config="s")])
    assert len(fails) == 1 and len(warns) == 1
    cells = A.matrix([_res(shared=2500), _res(case="bf16 y"), _res(case="fp32 y", spill=4)])
    assert cells[(86, "bf16")] == dict(launches=2, fit=1, compiles=2, over=1, spills=0, errors=0)
    assert cells[(86, "fp32")]["spills"] == 1


def test_mma_kind():
    """The tensor-core column: mma.sync (sm_80-class), wgmma (sm_90), tcgen05 (sm_100), none."""
    A = _aot()
    assert A.mma_kind("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {...}") == "mma.bf16"
    assert A.mma_kind("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {...}") == "wgmma.bf16"
    assert A.mma_kind("tcgen05.mma.cta_group::1.kind::f16 [%r1], ...;\n tcgen05.mma.cta_group::1.kind::tf32 [%r2]") \
        == "tcgen05.f16,tcgen05.tf32"
    assert A.mma_kind("fma.rn.f32 %f1, %f2, %f3, %f4;") == "-"


def test_merge_runs(tmp_path):
    """``--merge``: several --json runs (e.g. one per release and arch) become one Triton x arch x dtype table with
    each cell's counts summed over the runs; a run with a failure makes the exit status 1."""
    A = _aot()
    run = dict(triton="3.6.0", archs=[86], groups=["qlinear"], profile="quick", cpu_s=1.0, wall_s=2.0, failures=[],
               results=[_res(shared=2500, autotuned=True, config="a"), _res(autotuned=True, config="b"),
                        _res(case="fp32 y", spill=4)])
    other = dict(run, triton="3.9.0", archs=[120], results=[_res(arch=120, case="bf16 z")], failures=["sm_120 boom"])
    paths = []
    for i, r in enumerate((run, other)):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(r))
    text = A.merge_md([run, other], ["r0", "r1"])
    assert "| 3.6.0 | sm_86 | bf16 | quick | qlinear | 1 / 1 | 2 | 1 | 0 | 0 |" in text
    assert "| 3.6.0 | sm_86 | fp32 | quick | qlinear | 1 / 1 | 1 | 0 | 1 | 0 |" in text
    assert "| 3.9.0 | sm_120 | bf16 |" in text and "Failures (exit status 1): 1" in text and "- sm_120 boom" in text
    p = _run(["--merge", str(paths[0]), "--md", str(tmp_path / "m.md")], timeout=300)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "m.md").read_text().startswith("| Triton | arch |")
    assert _run(["--merge", *map(str, paths)], timeout=300).returncode == 1


@pytest.mark.parametrize("part", PARTS)
def test_aot_compile(part, tmp_path):
    name, side, args, dtypes = part
    pythonpath = None
    if side is not None:
        pythonpath = side_package(side)
        assert (pythonpath / "triton" / "__init__.py").is_file(), (
            f"Triton {side} side package missing at {pythonpath}: run scripts/setup.sh")
    out = tmp_path / "aot.json"
    md = tmp_path / "aot.md"
    jobs = "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2"  # under xdist the parts share the cores
    args = args + ["--jobs", jobs, "--json", str(out), "--md", str(md), "--quiet"]
    p = _run(args, pythonpath=pythonpath)
    assert out.exists(), f"aot_compile.py {' '.join(args)} crashed (rc {p.returncode}):\n{p.stdout}\n{p.stderr[-4000:]}"
    data = json.loads(out.read_text())
    if side is not None:
        assert data["triton"] == side, f"{name}: compiled with Triton {data['triton']}, not the side package {side}"
    results = data["results"]
    assert results, f"{name}: no compile jobs"
    assert {r["case"].split()[0] for r in results} == dtypes, f"{name}: a dtype has no jobs"
    arch = int(args[args.index("--arch") + 1])
    assert {r["arch"] for r in results} == {arch}
    for w in data["warnings"]:
        warnings.warn(f"AOT {name}: {w}", stacklevel=1)
    errors = [f"{r['kernel']} [{r['case']}] {r['config']}:\n{r['error']}" for r in results if not r["ok"]]
    assert not errors, f"{name}: {len(errors)}/{len(results)} compile(s) failed:\n\n" + "\n\n".join(errors)
    assert not data["failures"], f"{name}: resource check failed:\n" + "\n".join(data["failures"])
    assert p.returncode == 0, f"{name}: rc {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    for cell, c in data["matrix"].items():
        assert c["fit"] == c["launches"] > 0 and c["errors"] == 0, (cell, c)
    assert f"| sm_{arch} |" in md.read_text()
    for r in results:
        assert r["regs"] > 0 and r["shared"] >= 0, r
        if not r["autotuned"]:  # a planned launch: its one config fits
            assert r["shared"] <= r["limit"], r
        if r["case"].startswith("bf16") and r["kernel"].endswith("_fwd_kernel") and arch >= 80:
            # the bf16 fused forwards must use tensor cores (wgmma on sm_90, mma.sync on sm_80-class, tcgen05 on
            # sm_100), never scalar FMAs; before sm_80 there is no bf16 tensor-core instruction: the plans size those
            # dots as FMA dots (kernels/_launch.operand_bytes), so sm_75 is checked for fit and compile only
            assert r["mma"] != "-", f"{r['kernel']} [{r['case']}] {r['config']}: no tensor-core instruction in the PTX"
    # autotuned launches: the plan's pruner (its shared-memory estimate) drops the configs over the arch's limit,
    # so every config it keeps compiles within the limit (the autotuner never meets one it must skip) ...
    launches = {}
    for r in results:
        if r["autotuned"]:
            launches.setdefault((r["kernel"], r["case"]), []).append(r)
    over = [f"{k} [{c}] {r['config']}: {r['shared']} B > {r['limit']} B" for (k, c), rs in launches.items() for r in rs
            if r["shared"] > r["limit"]]
    assert not over, f"{name}: configs the plan kept over sm_{arch}'s shared memory:\n" + "\n".join(over)
    # ... and leaves at least one config of every launch: tools/aot_compile.py exits on a launch its plan left
    # without one (before the JSON this test reads is written), so each listed launch has compiled configs here
    assert all(launches.values()), name
