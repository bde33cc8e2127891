"""Markdown rendering of a results JSON (``results.md`` beside ``results.json``)."""
from __future__ import annotations

__all__ = ["to_markdown"]


def _note(notes: list, text: str) -> int:
    if text not in notes:
        notes.append(text)
    return notes.index(text) + 1


def _us(e: dict | None, notes: list) -> str:
    if not e:
        return "—"
    if e.get("status") != "ok":
        return f"{e.get('status')} [{_note(notes, str(e.get('status')) + ': ' + str(e.get('reason')))}]"
    s = f"{e['median_us']:.1f}"
    if e.get("interpreted"):
        return s + " (interp.)"
    return s


def _relerr(e: dict) -> str:
    chk = e.get("check_vs_eager") or {}
    if not chk:
        return "—"
    return f"{max(v['rel_err'] for v in chk.values()):.1e}"


def _x(v) -> str:
    return "—" if v is None else f"{v:.2f}×"


def to_markdown(data: dict) -> str:
    env = data.get("env", {})
    lines = [f"# rspeft_fast benchmarks: {env.get('device', '?')}", ""]
    lines.append(
        f"{env.get('date', '?')} · torch {env.get('torch')} · triton {env.get('triton')} · CUDA {env.get('cuda')} · "
        f"commit {env.get('git_commit')} · mode {'quick' if data.get('args', {}).get('quick') else 'full'}"
    )
    bw = data.get("copy_bandwidth")
    if bw:
        lines.append("")
        lines.append(
            f"Measured copy bandwidth: **{bw['GB_per_s']} GB/s** ({bw['method']}). Memory floor of an adapter = bytes of "
            "reading x and writing the output once (fwd; fwd+bwd adds reading x and dy and writing dx) / that bandwidth."
        )
    notes: list = []
    ops = data.get("ops", {})
    if ops:
        lines += ["", "## Ops (median µs; speedups against eager in the same mode)", "",
                  "| op | case | dtype | mode | eager | compile | fused | fused vs eager | fused vs compile | floor µs | fused / floor | fused rel. err vs eager | SPEC §3 eager (H100) |",
                  "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for op, od in ops.items():
            for c in od.get("cases", []):
                for mode, res in c["results"].items():
                    f = res.get("fused", {})
                    floor = (c.get("floor_us") or {}).get(mode)
                    anchor = (c.get("anchor_h100_us") or {}).get(f"eager {mode}")
                    lines.append(
                        f"| {op} | {c['case']} | {c['dtype']} | {mode} | {_us(res.get('eager'), notes)} | {_us(res.get('compile'), notes)} | "
                        f"{_us(f, notes)} | {_x(f.get('speedup_vs_eager'))} | {_x(f.get('speedup_vs_compile'))} | "
                        f"{'—' if floor is None else f'{floor:.1f}'} | {_x(f.get('x_floor'))} | {_relerr(f)} | {'—' if anchor is None else anchor} |"
                    )
            if od.get("status") and od["status"] != "ok":
                lines.append(f"| {op} | — | — | — | {od['status']}: {od.get('reason')} | | | | | | | | |")
    e2e = data.get("e2e", {}).get("cases", [])
    if e2e:
        lines += ["", "## End to end: one training step (forward, backward, AdamW) with a frozen backbone", "",
                  "| case | batch | no adapter (floor) ms | eager ms | fused ms | fused / floor | eager / fused | fused images/s | peak GiB (floor / eager / fused) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for c in e2e:
            vs = c["variants"]

            def ms(v):
                e = vs.get(v, {})
                if e.get("status") != "ok":
                    return f"{e.get('status')} [{_note(notes, str(e.get('status')) + ': ' + str(e.get('reason')))}]"
                return f"{e['step_ms']:.2f}" + (" (interp.)" if e.get("interpreted") else "")

            def mem(v):
                e = vs.get(v, {})
                return "—" if e.get("peak_mem_GiB") is None else f"{e['peak_mem_GiB']:.2f}"

            f = vs.get("fused", {})
            ips = f"{f['images_per_s']:.0f}" if f.get("status") == "ok" and not f.get("interpreted") else "—"
            r = c.get("ratios", {})
            lines.append(
                f"| {c['desc']} | {c['batch']} | {ms('none')} | {ms('eager')} | {ms('fused')} | {_x(r.get('fused/none'))} | "
                f"{_x(r.get('eager/fused'))} | {ips} | {mem('none')} / {mem('eager')} / {mem('fused')} |"
            )
        for c in e2e:
            for k, t in (c.get("targets") or {}).items():
                verdict = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
                lines.append(f"\nTarget for {c['id']}: {k} {t['bound']}: measured {t['measured']} → **{verdict}** ({t['note']}).")
    p = data.get("parity")
    if p:
        lines += ["", "## Parity: fused vs eager fine-tuning loss curves", ""]
        if p.get("status") == "ok":
            lines.append(
                f"{p['config']['steps']} steps of timm `{p['config']['model']}` + MuFA on {p['data']}, {p['working_precision']}: "
                f"max |fused − eager| = **{p['max_abs_diff_fused_vs_eager']:.3e}** (step {p['step_of_max_diff']}); "
                f"working-precision noise max |eager − eager in {p['high_precision']}| = {p['max_abs_diff_eager_vs_high_precision']:.3e}; "
                f"final losses eager {p['final_loss']['eager']:.4f}, fused {p['final_loss']['fused']:.4f}. "
                f"Rule: {p['rule']} → **{'PASS' if p['passed'] else 'FAIL'}**."
            )
        else:
            lines.append(f"{p.get('status')}: {p.get('reason')}")
    if data.get("plot"):
        lines += ["", f"![speedups]({data['plot']})" if not data["plot"].startswith("unavailable") else f"Plot {data['plot']}"]
    if notes:
        lines += ["", "### Notes", ""] + [f"{i}. {n}" for i, n in enumerate(notes, 1)]
    lines += ["", "`(interp.)`: Triton kernels run by Triton's interpreter on CPU — a check that they run, not a performance number.", ""]
    return "\n".join(lines)
