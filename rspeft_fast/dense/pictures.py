"""``OUT/predictions.png``: a few validation tiles as pictures (issue #24 item 5; matplotlib, Agg backend).

One row per tile: image | ground truth | prediction (segmentation) or A | B | label | prediction (change), masks
in the class palette (ISPRS colours on Potsdam / Vaihingen, a fixed qualitative palette otherwise; change: black
unchanged, white changed), ignored pixels (255) in grey, and one legend naming the classes under the grid.
"""
from __future__ import annotations

import io
from typing import Optional, Sequence

import numpy as np

from .._fileio import atomic_write

__all__ = ["default_palette", "colorize", "save_predictions", "IGNORE_COLOR", "CHANGE_PALETTE"]

IGNORE_COLOR = (128, 128, 128)
CHANGE_PALETTE = ((0, 0, 0), (255, 255, 255))
# matplotlib's tab20 order, distinct on screen and in print; classes past 20 cycle
_TAB20 = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120),
          (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210), (199, 199, 199),
          (219, 219, 141), (158, 218, 229))


def default_palette(num_classes: int) -> tuple:
    """``num_classes`` RGB colours (tab20, cycling)."""
    return tuple(_TAB20[i % len(_TAB20)] for i in range(int(num_classes)))


def colorize(mask: np.ndarray, palette: Sequence[tuple]) -> np.ndarray:
    """``(H, W)`` class indices → ``(H, W, 3)`` uint8 colours; 255 (ignore) → :data:`IGNORE_COLOR`."""
    from .readers import index_to_rgb

    return index_to_rgb(np.asarray(mask, dtype=np.uint8), palette, ignore_color=IGNORE_COLOR)


def save_predictions(path: str, rows: Sequence[Sequence[np.ndarray]], classes: Sequence[str], *, change: bool = False,
                     palette: Optional[Sequence[tuple]] = None, title: str = "") -> dict:
    """Write the grid to ``path`` (PNG). ``rows``: per tile ``(image, target, pred)`` or, for ``change``,
    ``(a, b, target, pred)``; images ``(H, W, 3)`` uint8, masks ``(H, W)`` indices (255 = ignore).

    Returns the figure's description: ``{"file", "tiles", "columns", "panels", "legend", "size_px"}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if not rows:
        raise ValueError("save_predictions: no tiles")
    palette = tuple(palette or (CHANGE_PALETTE if change else default_palette(len(classes))))
    heads = ("date A", "date B", "label", "prediction") if change else ("image", "ground truth", "prediction")
    ncol = len(heads)
    if any(len(r) != ncol for r in rows):
        raise ValueError(f"save_predictions: each tile needs {ncol} arrays ({', '.join(heads)})")
    fig, axes = plt.subplots(len(rows), ncol, figsize=(2.4 * ncol, 2.4 * len(rows) + 0.8), squeeze=False, dpi=100)
    for r, tile in enumerate(rows):
        *imgs, target, pred = tile
        panels = [np.asarray(x) for x in imgs] + [colorize(target, palette), colorize(pred, palette)]
        for c, (ax, im) in enumerate(zip(axes[r], panels)):
            ax.imshow(im, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(heads[c], fontsize=9)
    handles = [Patch(facecolor=np.array(palette[i]) / 255, edgecolor="black", linewidth=0.5, label=name)
               for i, name in enumerate(classes)]
    handles.append(Patch(facecolor=np.array(IGNORE_COLOR) / 255, edgecolor="black", linewidth=0.5, label="ignored"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.12 if len(handles) > 4 else 0.07, 1, 0.95 if title else 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    w, h = (int(v) for v in fig.canvas.get_width_height())
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))
    return {"file": path.replace("\\", "/").rsplit("/", 1)[-1], "tiles": len(rows), "columns": list(heads),
            "panels": len(rows) * ncol, "legend": [h.get_label() for h in handles], "size_px": [w, h]}
