"""``python -m rspeft_fast compare``: MuFA's Table 1 as one job — several methods on one backbone, same data, schedule
and seed, one table and one plot.

Each method is an ordinary ``train`` run (:func:`rspeft_fast.train.cli.main`, the same options) in its own folder
``OUT/<method>``; a method whose folder holds ``metrics.json`` is finished and skipped on a re-run, one holding a
checkpoint (``--ckpt-every``) is resumed. After a run the job rebuilds the model exactly as the engine built it (same
seed, so the same frozen backbone), loads ``adapters.safetensors`` and measures top-1 on the test split — ``DIR/test``
of ``--data DIR`` (ImageFolder, the training classes), or for the embedded set a held-out set drawn with another seed
— kept in ``OUT/<method>/test.json``. The embedded set's validation accuracy is re-measured on the rebuilt model and
must equal the run's (a check that the rebuild is the trained model). Results:

* ``OUT/table.md``: method, trainable % (of the backbone, head included: the papers' convention), top-1 val (last
  epoch) / test, images/s (last epoch), peak memory (CUDA: per run; CPU: the process' peak RSS, which only grows in
  one process), training time (Σ of the epochs' training seconds);
* ``OUT/table.json`` (the same, machine-readable) and ``OUT/table.png`` (test — else val — top-1 against trainable %,
  log x-axis, one labelled point per method).

Usage::

    python -m rspeft_fast compare --methods all --out runs/compare --model vit_tiny_patch16_224 --img-size 32 \\
        --global-pool avg --epochs 4 --lr 1e-2 --scale 0.7 1.0          # the embedded set at CPU size
    python -m rspeft_fast compare --methods all --out runs/ucm --model vit_base_patch16_224 --pretrained \\
        --data UCMerced_LandUse/Images --epochs 30                        # the paper's experiment

Every option not listed below goes to each ``train`` run unchanged (see ``python -m rspeft_fast train --help``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import warnings
from types import SimpleNamespace
from typing import Optional

import torch

from .._fileio import atomic_write_text
from .engine import ADAPTERS, CHECKPOINT, METRICS, parse_option

__all__ = ["main", "TABLE1", "build_parser"]

# MuFA's Table 1, in its order (full fine-tuning, frozen backbone = linear probe, LayerNorm, Adapter, LoRA, BitFit,
# AdaptFormer, Convpass, LoRand, VPT, IVPT, E2VPT, MuFA) and its figures: % of parameters tuned on ViT-B/16
TABLE1 = ("full", "linear", "layernorm", "adapter", "lora", "bitfit", "adaptformer", "convpass", "lorand", "vpt",
          "ivpt", "e2vpt", "mufa")
MUFA_PERCENT = {"full": 100.0, "linear": 0.0, "layernorm": 0.07, "adapter": 2.08, "lora": 4.04, "bitfit": 0.24,
                "adaptformer": 2.08, "convpass": 4.12, "lorand": 1.84, "vpt": 0.78, "ivpt": 0.78, "e2vpt": 0.39,
                "mufa": 3.64}
TEST_JSON = "test.json"
_OWN = ("--method", "--out", "--option", "--resume")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m rspeft_fast compare", allow_abbrev=False,  # --method (a train flag) is no --methods
        description="Train several PEFT methods on one backbone with the same data, schedule and seed; write "
                    "OUT/table.md, OUT/table.json and OUT/table.png. Other options go to every `train` run.")
    p.add_argument("--methods", default="all",
                   help="'all' (MuFA's Table 1: " + ", ".join(TABLE1) + ") or a comma list (default %(default)s)")
    p.add_argument("--out", default=os.path.join("runs", "compare"), help="output folder (default %(default)s)")
    p.add_argument("--method-option", action="append", default=[], metavar="METHOD:KEY=VALUE",
                   help="an option of one method, e.g. convpass:width=8 (repeatable)")
    p.add_argument("--test-per-class", type=int, default=None,
                   help="embedded set: test images per class (default: the validation split's size)")
    return p


def _methods(spec: str) -> list:
    from ..integration.registry import REGISTRY

    names = list(TABLE1) if spec.strip().lower() == "all" else [m.strip() for m in spec.split(",") if m.strip()]
    bad = [m for m in names if m not in REGISTRY]
    if not names or bad:
        raise SystemExit(f"--methods: unknown method(s) {bad}; known: {', '.join(sorted(REGISTRY))}")
    if len(set(names)) != len(names):
        raise SystemExit(f"--methods names a method twice: {spec}")
    return names


def _method_options(items) -> dict:
    out: dict = {}
    for it in items:
        m, sep, kv = it.partition(":")
        if not sep or not m:
            raise SystemExit(f"--method-option {it!r}: expected METHOD:KEY=VALUE")
        parse_option(kv)  # KEY=VALUE or SystemExit/argparse error
        out.setdefault(m.strip(), []).append(kv)
    return out


# --------------------------------------------------------------------------------------------------
# the test split


class _EmbeddedHeldOut(torch.utils.data.Dataset):
    """The embedded texture classes drawn with a seed no train / val split of any ``--seed`` up to 10⁶ uses."""

    def __init__(self, per_class: int, size: int, seed: int, transform):
        from ..data import make_textures

        imgs, self.labels, self.classes = make_textures(per_class, size, seed=2 * seed + 3_000_001)
        self.images = imgs.permute(0, 2, 3, 1).contiguous().numpy()
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def _test_accuracy(train_argv: list, folder: str, test_per_class: Optional[int]) -> dict:
    """Rebuild the run's model (the engine's seeding: same frozen backbone), load its adapters, measure top-1 on the
    test split (and, for the embedded set, re-measure val: it must equal the run's)."""
    from ..integration import load_adapters
    from .cli import build_model, build_parser as train_parser, evaluate
    from .data import _image_folder, class_names, classification_datasets, timm_transforms
    from .loop import autocast, resolve_device

    args = train_parser().parse_args(train_argv)
    device = resolve_device(args.device)
    img_size = args.img_size if args.img_size is not None else (None if device.type == "cuda" else 64)
    if args.data is None:
        from ..data import CLASSES

        classes = list(CLASSES)
    else:
        classes = class_names(args.data)
    torch.manual_seed(args.seed)  # as engine._run before job.model(): the same backbone draw
    random.seed(args.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(args, len(classes), img_size)
    load_adapters(model, os.path.join(folder, ADAPTERS))
    model.to(device).eval()
    ctx = SimpleNamespace(device=device, autocast=lambda: autocast(args.amp, device))
    _, t_eval, cfg = timm_transforms(model, args, img_size)
    size = int(cfg["input_size"][-1])
    out: dict = {"test_acc": None, "test_split": None}
    if args.data is None:
        per = test_per_class or max(args.embedded_per_class // 4, 2)
        test = _EmbeddedHeldOut(per, size, args.seed, t_eval)
        out["test_split"] = f"embedded held-out ({per} per class)"
        val = classification_datasets(args, model, img_size)[1]
        out["val_acc_rebuilt"] = evaluate(model, torch.utils.data.DataLoader(val, batch_size=2 * args.batch_size), ctx)
    elif os.path.isdir(os.path.join(args.data, "test")):
        test = _image_folder(os.path.join(args.data, "test"), t_eval, classes)
        out["test_split"] = os.path.join(args.data, "test")
    else:
        return out
    loader = torch.utils.data.DataLoader(test, batch_size=2 * args.batch_size, num_workers=0)
    out["test_acc"] = evaluate(model, loader, ctx)
    return out


# --------------------------------------------------------------------------------------------------
# table and plot


def _row(method: str, folder: str) -> dict:
    with open(os.path.join(folder, METRICS)) as f:
        m = json.load(f)
    test = {}
    if os.path.exists(os.path.join(folder, TEST_JSON)):
        with open(os.path.join(folder, TEST_JSON)) as f:
            test = json.load(f)
    hist = m.get("state", {}).get("history") or [{}]
    last = hist[-1]
    return {"method": method, "trainable_percent": m["trainable"]["percent"], "trainable": m["trainable"]["trainable"],
            "mufa_table1_percent": MUFA_PERCENT.get(method), "val_acc": last.get("val_acc"),
            "best_val_acc": max((h.get("val_acc", float("-inf")) for h in hist), default=None),
            "test_acc": test.get("test_acc"), "test_split": test.get("test_split"),
            "images_per_s": last.get("images_per_s"), "peak_memory": last.get("peak_memory"),
            "train_s": sum(h.get("train_s", 0.0) for h in hist), "epochs": len(hist)}


def _fmt(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def _table_md(rows: list, header: str) -> str:
    lines = [header, "",
             "| method | trainable % | MuFA Table 1 % | top-1 val | top-1 test | images/s | peak memory | train time (s) |",
             "|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | — | {_fmt(MUFA_PERCENT.get(r['method']), '.2f')} | failed: {r['error']} "
                         "| — | — | — | — |")
            continue
        lines.append(f"| {r['method']} | {r['trainable_percent']:.3f} | {_fmt(r['mufa_table1_percent'], '.2f')} | "
                     f"{_fmt(r['val_acc'], '.2f')} | {_fmt(r['test_acc'], '.2f')} | {_fmt(r['images_per_s'], '.1f')} | "
                     f"{r['peak_memory'] or '—'} | {r['train_s']:.1f} |")
    return "\n".join(lines) + "\n"


def _plot(rows: list, path: str, title: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - matplotlib is a dependency
        return f"unavailable: {e}"
    pts = [r for r in rows if "error" not in r and r["trainable_percent"] > 0]
    use_test = pts and all(r["test_acc"] is not None for r in pts)
    key = "test_acc" if use_test else "val_acc"
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for r in pts:
        if r[key] is None:
            continue
        star = r["method"] == "mufa"
        ax.scatter([r["trainable_percent"]], [r[key]], s=70 if star else 40, marker="*" if star else "o",
                   color="crimson" if star else "tab:blue", zorder=3)
        ax.annotate(r["method"], (r["trainable_percent"], r[key]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (% of the backbone, log scale)")
    ax.set_ylabel(f"top-1 {'test' if use_test else 'val'} accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------


def main(argv: Optional[list] = None) -> int:
    from .cli import build_parser as train_parser, main as train_main

    args, rest = build_parser().parse_known_args(argv)
    for flag in _OWN:
        if any(a == flag or a.startswith(flag + "=") for a in rest):
            raise SystemExit(f"compare: {flag} is set per method by compare (use --methods / --method-option / --out; "
                             "a re-run resumes by itself)")
    methods = _methods(args.methods)
    per_method = _method_options(args.method_option)
    unknown = sorted(set(per_method) - set(methods))
    if unknown:
        raise SystemExit(f"--method-option names methods not in --methods: {unknown}")
    train_parser().parse_args(rest + ["--method", methods[0]])  # the shared options are valid before anything runs
    os.makedirs(args.out, exist_ok=True)

    rows, failed = [], 0
    for i, m in enumerate(methods, 1):
        folder = os.path.join(args.out, m)
        argv_m = rest + ["--method", m, "--out", folder] + [x for kv in per_method.get(m, []) for x in ("--option", kv)]
        if os.path.exists(os.path.join(folder, METRICS)):
            print(f"[compare {i}/{len(methods)}] {m}: finished ({os.path.join(folder, METRICS)}), skipped", flush=True)
        else:
            resume = os.path.exists(os.path.join(folder, CHECKPOINT))
            print(f"[compare {i}/{len(methods)}] {m}: {'resuming' if resume else 'training'} in {folder}", flush=True)
            try:
                rc = train_main(argv_m + (["--resume"] if resume else []))
            except SystemExit as e:  # a method that cannot run here (e.g. not supported on this backbone)
                if e.code in (0, None):
                    rc = 0
                else:
                    msg = str(e.code) if not isinstance(e.code, int) else f"exit code {e.code}"
                    print(f"[compare] {m} failed: {msg}", file=sys.stderr, flush=True)
                    rows.append({"method": m, "error": msg.splitlines()[0][:120]})
                    failed += 1
                    continue
            if rc != 0:
                print(f"[compare] {m}: the run stopped (exit code {rc}); re-run compare to resume", file=sys.stderr)
                return rc
        if not os.path.exists(os.path.join(folder, TEST_JSON)):
            res = _test_accuracy(argv_m, folder, args.test_per_class)
            atomic_write_text(os.path.join(folder, TEST_JSON), json.dumps(res, indent=1))
        row = _row(m, folder)
        with open(os.path.join(folder, TEST_JSON)) as f:
            rebuilt = json.load(f).get("val_acc_rebuilt")
        if rebuilt is not None and row["val_acc"] is not None and not math.isclose(rebuilt, row["val_acc"], abs_tol=1e-6):
            warnings.warn(f"compare: {m}: the rebuilt model's val top-1 is {rebuilt:.2f}, the run's {row['val_acc']:.2f}: "
                          "the test accuracy may not be the trained model's", stacklevel=1)
        rows.append(row)

    tp = train_parser().parse_args(rest + ["--method", methods[0]])
    header = (f"Model `{tp.model}`, data {tp.data or 'embedded textures (8 classes)'}, {tp.epochs} epochs, batch "
              f"{tp.batch_size}, lr {tp.lr}, seed {tp.seed}; options: `{' '.join(rest)}`")
    md = _table_md(rows, header)
    atomic_write_text(os.path.join(args.out, "table.md"), md)
    atomic_write_text(os.path.join(args.out, "table.json"), json.dumps({"header": header, "rows": rows}, indent=1))
    png = _plot(rows, os.path.join(args.out, "table.png"), f"{tp.model}: top-1 against tuned parameters")
    print(md)
    print(f"wrote {os.path.join(args.out, 'table.md')}, table.json, {png}")
    return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
