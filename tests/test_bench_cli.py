"""The benchmark CLI (``python -m rspeft_fast bench --quick``) on CPU, and the pieces it is made of.

The quick run is done once per session (ops, e2e, parity at tiny sizes; fused Triton kernels through the
interpreter, the triplet loss on the C++ extension) and its JSON checked: every op present, every
implementation either timed or marked unavailable with a reason, nothing substituted.
"""
import json
import math

import pytest
import torch

from rspeft_fast.bench import cases as C
from rspeft_fast.bench.cli import main
from rspeft_fast.bench.report import to_markdown
from rspeft_fast.bench.suite import derive, run_op_case


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = main(["--quick", "--what", "ops,e2e,parity", "--out", str(out)])
    data = json.loads((out / "results.json").read_text())
    return rc, out, data


def _check_entry(e, where):
    assert e["status"] in ("ok", "unavailable"), f"{where}: {e}"
    if e["status"] == "ok":
        for k in ("median_us", "q20_us", "q80_us", "min_us"):
            assert math.isfinite(e[k]) and e[k] > 0, f"{where}: {k}={e.get(k)}"
        assert e["min_us"] <= e["q20_us"] <= e["median_us"] <= e["q80_us"] <= e["max_us"], where
        assert e["n"] >= 1 and e["method"]
    else:
        assert isinstance(e["reason"], str) and len(e["reason"]) > 10, f"{where}: unavailable without a reason"


def test_quick_run_exit_status_and_files(quick_run):
    rc, out, data = quick_run
    assert rc == 0, f"bench --quick failed: errors {data.get('errors')}, parity {data.get('parity', {}).get('passed')}"
    assert data["errors"] == []
    md = (out / "results.md").read_text()
    assert "## Ops" in md and "## End to end" in md and "## Parity" in md
    if data["plot"] == "speedup.png":
        assert (out / "speedup.png").stat().st_size > 1000
    else:
        assert data["plot"].startswith("unavailable: ")


def test_quick_run_environment(quick_run):
    env = quick_run[2]["env"]
    for k in ("device", "torch", "triton", "date", "python", "device_type"):
        assert env[k], k
    assert env["device_type"] == ("cuda" if torch.cuda.is_available() else "cpu")
    bw = quick_run[2]["copy_bandwidth"]
    assert bw["bytes_per_s"] > 0 and bw["bytes_copied"] > 0


@pytest.mark.parametrize("op", C.OPS)
def test_quick_run_every_op_every_impl(quick_run, op):
    data = quick_run[2]
    assert op in data["ops"], f"op {op} missing from the JSON"
    cases = data["ops"][op]["cases"]
    assert cases, f"no cases recorded for {op}"
    for c in cases:
        assert c["shapes"] and c["dtype"] and c["flops"]["fwd"] > 0
        assert set(c["results"]) == set(C.MODES)
        for mode, res in c["results"].items():
            assert set(res) == set(C.VARIANTS), f"{c['id']} {mode}: {sorted(res)}"
            for v, e in res.items():
                _check_entry(e, f"{c['id']} {mode} {v}")
            assert res["eager"]["status"] == "ok", "the eager reference always runs"
            if res["fused"]["status"] == "ok" and "check_vs_eager" in res["fused"]:
                tol = 1e-3  # float32 on CPU: the fused result must match the reference
                for name, err in res["fused"]["check_vs_eager"].items():
                    assert err["rel_err"] < tol, f"{c['id']} {mode} fused {name}: {err}"
        # a fused run on CPU through the interpreter is never presented as a speedup
        for res in c["results"].values():
            f = res["fused"]
            if f.get("interpreted"):
                assert "speedup_vs_eager" not in f


def test_quick_run_e2e_and_parity(quick_run):
    data = quick_run[2]
    e2e = data["e2e"]["cases"]
    assert e2e
    for c in e2e:
        assert set(c["variants"]) == {"none", "eager", "fused"}
        for v, e in c["variants"].items():
            assert e["status"] in ("ok", "unavailable"), f"{c['id']} {v}: {e}"
            if e["status"] == "ok":
                assert e["step_ms"] > 0 and e["images_per_s"] > 0 and math.isfinite(e["last_loss"])
            else:
                assert e["reason"]
        assert c["variants"]["eager"]["status"] == "ok" and c["variants"]["none"]["status"] == "ok"
    p = data["parity"]
    assert p["status"] in ("ok", "unavailable"), p
    if p["status"] == "ok":
        assert p["passed"] is True, f"max |fused - eager| {p['max_abs_diff_fused_vs_eager']} > bound {p['bound']}"
        assert len(p["curves"]["fused"]) == len(p["curves"]["eager"]) == p["config"]["steps"]


def test_unavailable_impl_is_recorded_not_substituted(monkeypatch):
    """Without the interpreter, impl='triton' on CPU cannot run: the record says so and has no timing."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    case = C.cases("mufa", "tiny")[0]
    rec = run_op_case(case, "cpu", variants=("eager", "fused"), modes=("fwd",), rep_ms=1.0, log=lambda s: None)
    f = rec["results"]["fwd"]["fused"]
    assert f["status"] == "unavailable" and "TRITON_INTERPRET" in f["reason"] and "median_us" not in f
    assert rec["results"]["fwd"]["eager"]["status"] == "ok"
    assert "unavailable" in to_markdown({"env": {}, "ops": {"mufa": {"cases": [rec]}}})


def test_classify_error():
    from rspeft_fast._impl import ImplUnavailableError

    assert C.classify_error(ImplUnavailableError("no"))[0] == "unavailable"
    # a benchmark that cannot import its op, or whose op rejects the impl it asks for, fails: never a skip
    assert C.classify_error(ModuleNotFoundError("No module named 'x'"))[0] == "error"
    assert C.classify_error(ValueError("f: impl='cpu' is not one of ('auto',)"))[0] == "error"
    assert C.classify_error(RuntimeError("kernel crashed")) == ("error", "RuntimeError: kernel crashed")
    assert C.classify_error(ValueError("bad shape"))[0] == "error"


def test_derive_speedups_and_floor():
    rec = {
        "flops": {"fwd": 2e9}, "bytes_floor": {"fwd": 1e6}, "floor_us": {"fwd": 1.0},
        "results": {"fwd": {
            "eager": {"status": "ok", "median_us": 100.0},
            "compile": {"status": "ok", "median_us": 50.0},
            "fused": {"status": "ok", "median_us": 10.0},
        }},
    }
    derive(rec)
    f = rec["results"]["fwd"]["fused"]
    assert f["speedup_vs_eager"] == 10.0 and f["speedup_vs_compile"] == 5.0 and f["x_floor"] == 10.0
    assert f["TFLOP_per_s"] == pytest.approx(200.0) and f["GB_per_s_floor_bytes"] == pytest.approx(100.0)


def test_plot_from_synthetic_results(tmp_path):
    import matplotlib  # noqa: F401,E402  (pinned: a missing one fails)
    from rspeft_fast.bench.plot import plot_speedups

    data = {"env": {"device": "test"}, "ops": {"mufa": {"cases": [{"case": "x", "results": {"fwd": {
        "eager": {"status": "ok", "speedup_vs_eager": 1.0}, "fused": {"status": "ok", "speedup_vs_eager": 4.0},
        "compile": {"status": "unavailable", "reason": "r"}}}}]}},
        "e2e": {"cases": [{"id": "m", "variants": {"eager": {"status": "ok", "step_ms": 4.0}, "fused": {"status": "ok", "step_ms": 2.0},
                                                    "none": {"status": "ok", "step_ms": 1.5}}}]}}
    p = plot_speedups(data, str(tmp_path / "s.png"))
    assert p == str(tmp_path / "s.png") and (tmp_path / "s.png").stat().st_size > 1000
    assert plot_speedups({"env": {}}, str(tmp_path / "t.png")).startswith("unavailable")


def test_bad_arguments():
    assert main(["--what", "nonsense"]) == 2
    assert main(["--ops", "nope", "--what", "ops"]) == 2


def test_host_overhead_run(tmp_path):
    """``bench --host``: one short run writes its JSON and table, with the calibration, the launch and device-op
    counts of every variant and the targets; the fused MuFA call runs no device torch op and never syncs."""
    rc = main(["--host", "--cases", "mufa,mga_seq", "--reps", "4", "--rounds", "1", "--out", str(tmp_path), "--tag", "t"])
    assert rc == 0
    data = json.loads((tmp_path / "host-t.json").read_text())
    assert (tmp_path / "host-t.md").read_text().startswith("# Host overhead")
    assert {"sum_range_1000", "torch_add_4x4"} <= set(data["calibration"]["before"])
    for name, rec in data["cases"].items():
        for mode in ("fwd", "fwd+bwd"):
            res = rec["results"][mode]
            assert {"floor", "module", "eager"} <= set(res), (name, mode)
            for v, r in res.items():
                assert r["n"] == 4 and r["median_us"] > 0 and r["syncs"] == 0, (name, mode, v, r)
            assert res["module"]["triton_launches"] >= 1
        assert set(rec["targets"]) == {"fwd", "fwd+bwd"}
    mufa = data["cases"]["mufa"]["results"]
    assert mufa["fwd"]["module"]["device_ops"] == 0 and mufa["fwd+bwd"]["module"]["device_ops"] == 0
    assert mufa["fwd"]["module"]["triton_launches"] == 1 and mufa["fwd+bwd"]["module"]["triton_launches"] == 6
