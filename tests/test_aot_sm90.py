"""Every Triton kernel of kernels/{mufa,qlinear,mga}.py compiles for the H100 (sm_90), without a GPU.

CI checks the kernels' numerics through Triton's interpreter, which never runs the Triton compiler: errors
only a GPU compile shows (plain Python float globals in ``@triton.jit`` code, ``tl.dot`` layout/dtype rules,
ptxas limits) would otherwise first appear in a GPU session. ``benchmarks/aot_compile.py`` compiles each
kernel ahead of time for ``GPUTarget("cuda", 90, 32)`` with the argument types, integer specialisations,
constexprs and num_warps/num_stages of the launchers at the SPEC §2 shapes, through the bundled ptxas, and
reads registers/spills (cuobjdump), shared memory and the tensor-core instructions of each result.

It runs in SUBPROCESSES: ``TRITON_INTERPRET`` (set to 1 by conftest.py in this process) must be unset
before triton is imported. The work is split into parts that ``pytest -n 2`` spreads over its workers.

Coverage (default, ``aot_compile.py --profile quick``): bf16 (the GPU dtype) with EVERY autotune config of
every autotuned kernel; fp32 (IEEE dots, torch's default fp32 matmul precision) with the FIRST autotune config
of each (fp32 IEEE dots compile to long FMA code: all their configs cost ~6 CPU minutes); the non-autotuned
kernels (Q-Linear, MGA) at their launcher-chosen blocks in both, except the fp32 MGA text+BiShare
per-sequence kernels (~260 CPU s); the MGA blocked attention backward (L > 128) at L = 197 / 256.
``RSPEFT_AOT_FULL=1`` runs ``--profile full``: every config in bf16, fp32 and fp32-with-TF32, plus the
MGA forward at MAX_L = 256 (about 20 CPU minutes cold).

Fails on: a compile error anywhere; shared memory above sm_90's 227 KB for a non-autotuned kernel at a SPEC
shape (its launch fails with OutOfResources; the AOT compile does not check it), or for every config of an
autotuned kernel; register spills in the forward configs the MuFA kernel owner tuned spill-free (bf16,
R = 168 8-warp 64-row tiles, R = 21 all). Other spills / over-limit autotune configs are reported as warnings.
Compiles are cached by Triton (``~/.triton/cache``): a warm run only recompiles the kernels that changed.
"""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "aot_compile.py"
FULL = os.environ.get("RSPEFT_AOT_FULL", "0") == "1"

GROUPS = ("mufa_fwd", "mufa_bwd", "mufa_atb", "qlinear", "mga")
# (id, aot_compile.py arguments, dtypes expected in the results): one subprocess each, spread by pytest -n
if FULL:
    PARTS = [(f"{g}-{d}", ["--profile", "full", "--groups", g, "--dtypes", d], {d})
             for g in GROUPS for d in ("bf16", "fp32", "tf32")]
else:
    PARTS = [(g, ["--profile", "quick", "--groups", g], {"bf16", "fp32"}) for g in GROUPS]

KERNELS = {  # every kernel the three modules define today (a new one must get jobs in aot_compile.py)
    "mufa._bottleneck_fwd_kernel", "mufa._bottleneck_bwd_rows_kernel", "mufa._atb_splitk_kernel",
    "qlinear._row_scale_kernel", "qlinear._weight_kernel", "qlinear._quantize_rows_kernel", "qlinear._fwd_kernel",
    "qlinear._bwd_dx_kernel", "qlinear._bwd_dw_kernel",
    "mga._mga_fwd_kernel", "mga._bwd_msa2_kernel", "mga._bwd_share_kernel", "mga._bwd_msa1_kernel",
    "mga._attn_bwd_dq_kernel", "mga._attn_bwd_dkdv_kernel",
}


def _run(args, timeout=900):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _bundled(tool: str) -> Path:
    import triton  # (imported under the interpreter here: only its location is used)

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool


def test_bundled_ptxas_and_cuobjdump_present():
    """No ptxas, no sm_90 compile: that is a failure of this CI machine, never a skip."""
    for tool in ("ptxas", "cuobjdump"):
        path = _bundled(tool)
        assert path.is_file() and os.access(path, os.X_OK), (
            f"Triton's bundled {tool} is missing or not executable at {path}: the sm_90 AOT compile test cannot run "
            f"(reinstall triton with its NVIDIA backend binaries)")
    out = subprocess.run([str(_bundled("ptxas")), "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "release" in out.stdout, f"bundled ptxas does not run: {out.stdout}{out.stderr}"


def test_every_kernel_has_jobs():
    """Each @triton.jit kernel of kernels/{mufa,qlinear,mga}.py is compiled by some part."""
    p = _run(["--coverage"], timeout=300)
    assert p.returncode == 0, f"aot_compile.py --coverage failed:\n{p.stdout}\n{p.stderr}"
    cov = json.loads(p.stdout.strip().splitlines()[-1])
    assert set(cov["found"]) >= KERNELS, f"kernel discovery lost kernels: {sorted(KERNELS - set(cov['found']))}"
    assert not cov["missing"], (f"kernels without AOT jobs (add them to benchmarks/aot_compile.py): {cov['missing']}")


@pytest.mark.parametrize("part", PARTS, ids=[p[0] for p in PARTS])
def test_aot_compile_sm90(part, tmp_path):
    name, args, dtypes = part
    out = tmp_path / "aot.json"
    jobs = "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2"  # under xdist the parts share the cores
    args = args + ["--jobs", jobs, "--json", str(out), "--quiet"]
    p = _run(args)
    assert out.exists(), f"aot_compile.py {' '.join(args)} crashed (rc {p.returncode}):\n{p.stdout}\n{p.stderr[-4000:]}"
    data = json.loads(out.read_text())
    results = data["results"]
    assert results, f"{name}: no compile jobs"
    assert {r["case"].split()[0] for r in results} == dtypes, f"{name}: a dtype has no jobs"
    for w in data["warnings"]:
        warnings.warn(f"sm_90 AOT: {w}", stacklevel=1)
    errors = [f"{r['kernel']} [{r['case']}] {r['config']}:\n{r['error']}" for r in results if not r["ok"]]
    assert not errors, f"{name}: {len(errors)}/{len(results)} sm_90 compile(s) failed:\n\n" + "\n\n".join(errors)
    assert not data["failures"], f"{name}: sm_90 resource check failed:\n" + "\n".join(data["failures"])
    assert p.returncode == 0, f"{name}: rc {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    for r in results:
        assert r["regs"] > 0 and r["shared"] >= 0, r
        if r["case"].startswith("bf16") and r["kernel"].endswith("_fwd_kernel"):
            # the bf16 fused forwards must use Hopper tensor cores (wgmma) or at least mma, never scalar FMAs
            assert r["mma"] != "-", f"{r['kernel']} [{r['case']}] {r['config']}: no tensor-core instruction in the PTX"
