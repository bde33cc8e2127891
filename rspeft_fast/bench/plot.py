"""Speedup bar chart (matplotlib, Agg backend): compile and fused against eager, per op case and end to end."""
from __future__ import annotations

__all__ = ["plot_speedups"]


def _op_rows(data: dict) -> list[tuple[str, dict]]:
    rows = []
    for op, od in data.get("ops", {}).items():
        for c in od.get("cases", []):
            for mode, res in c["results"].items():
                vals = {}
                for v in ("eager", "compile", "fused"):
                    e = res.get(v, {})
                    if e.get("status") == "ok" and not e.get("interpreted") and e.get("speedup_vs_eager"):
                        vals[v] = e["speedup_vs_eager"]
                if vals:
                    rows.append((f"{op} {c['case']} {mode}", vals))
    return rows


def _e2e_rows(data: dict) -> list[tuple[str, dict]]:
    rows = []
    for c in data.get("e2e", {}).get("cases", []):
        vs = c["variants"]
        eager = vs.get("eager", {})
        if eager.get("status") != "ok":
            continue
        vals = {}
        for v in ("none", "eager", "fused"):
            e = vs.get(v, {})
            if e.get("status") == "ok" and not e.get("interpreted"):
                vals[v] = eager["step_ms"] / e["step_ms"]
        rows.append((f"{c['id']} step", vals))
    return rows


def plot_speedups(data: dict, path: str) -> str:
    """Write the chart to ``path``; returns ``path`` or ``"unavailable: reason"`` (matplotlib missing,
    nothing measurable)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        return f"unavailable: matplotlib cannot be imported ({type(e).__name__}: {e})"
    ops, e2e = _op_rows(data), _e2e_rows(data)
    if not ops and not e2e:
        return "unavailable: no measured (non-interpreted) timings to plot"
    panels = [(ops, ("eager", "compile", "fused"), "ops: speedup over eager (higher is better)"),
              (e2e, ("eager", "fused", "none"), "training step: speedup over eager adapters ('none' = no adapter, the floor)")]
    panels = [p for p in panels if p[0]]
    heights = [max(2.0, 0.32 * len(rows) * len(keys) / 2 + 1.2) for rows, keys, _ in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, sum(heights)), gridspec_kw={"height_ratios": heights}, squeeze=False)
    colors = {"eager": "#9e9e9e", "compile": "#4c72b0", "fused": "#dd8452", "none": "#55a868"}
    for ax, (rows, keys, title) in zip(axes[:, 0], panels):
        n = len(keys)
        w = 0.8 / n
        for j, k in enumerate(keys):
            ys = [i + (j - (n - 1) / 2) * w for i in range(len(rows))]
            xs = [r[1].get(k, 0.0) for r in rows]
            bars = ax.barh(ys, xs, height=w, color=colors[k], label=k)
            for b, x in zip(bars, xs):
                if x:
                    ax.text(b.get_width(), b.get_y() + b.get_height() / 2, f" {x:.2f}×", va="center", fontsize=7)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([r[0] for r in rows], fontsize=8)
        ax.invert_yaxis()
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
    env = data.get("env", {})
    fig.suptitle(f"rspeft_fast on {env.get('device', '?')} (torch {env.get('torch')}, triton {env.get('triton')}, {env.get('date', '')[:10]})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
