"""Embedded dense sets: tiny, deterministic, written in the users' layouts so the same readers serve them.

* :func:`write_segmentation_set` — a 5-class land-cover set of textured polygons in the generic folders layout
  (``{split}/{images,masks}/tile_NNNN.png`` + ``classes.txt``). Each class has its own texture (fine noise,
  roof stripes, blotchy canopy, smooth ripples, furrows) and a colour that is jittered per tile, so a model
  must look at both.
* :func:`write_change_set` — a building change set in the LEVIR-CD layout (``{split}/{A,B,label}/pair_NNNN.png``,
  label 0 / 255): date B is date A with buildings removed (ground shows through) and added, photometric
  jitter and a ±2 px misregistration; some pairs have no change at all.

Both are a function of ``seed`` only (numpy's PCG64 and PIL's rasteriser), so every machine writes the same files.
"""
from __future__ import annotations

import os

import numpy as np

__all__ = ["SEG_CLASSES", "SEG_PALETTE", "write_segmentation_set", "write_change_set"]

SEG_CLASSES = ("impervious", "building", "vegetation", "water", "bare_soil")
SEG_PALETTE = ((160, 160, 160), (200, 60, 50), (40, 150, 40), (30, 70, 200), (210, 180, 110))  # legend colours
_BASE = np.array([(128, 128, 132), (170, 85, 70), (60, 120, 50), (45, 70, 125), (170, 140, 100)], dtype=np.float64)


def _lowfreq(rng, size: int, cells: int) -> np.ndarray:
    """Smooth noise in [-1, 1]: a random ``cells²`` grid, bilinearly upsampled."""
    from PIL import Image

    g = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
    im = Image.fromarray(g, mode="F").resize((size, size), Image.BILINEAR)
    return np.asarray(im, dtype=np.float64)


def _texture(cls: int, rng, size: int) -> np.ndarray:
    """A ``(size, size, 3)`` float texture of class ``cls`` (before clipping), colour jittered."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    base = _BASE[cls] + rng.uniform(-18, 18, 3)
    if cls == 0:  # impervious: fine grain
        t = rng.normal(0, 10, (size, size, 1))
    elif cls == 1:  # building roofs: stripes along a random axis
        th = rng.uniform(0, np.pi)
        u = xx * np.cos(th) + yy * np.sin(th)
        t = (12 * np.sign(np.sin(u * 2 * np.pi / rng.uniform(3, 5))))[..., None] + rng.normal(0, 3, (size, size, 1))
    elif cls == 2:  # vegetation: blotchy canopy
        t = 30 * _lowfreq(rng, size, max(2, size // 6))[..., None] + rng.normal(0, 6, (size, size, 1))
    elif cls == 3:  # water: smooth, faint ripples
        th = rng.uniform(0, np.pi)
        u = xx * np.cos(th) + yy * np.sin(th)
        t = (4 * np.sin(u * 2 * np.pi / rng.uniform(8, 14)))[..., None] + rng.normal(0, 1.5, (size, size, 1))
    else:  # bare soil: furrows
        th = rng.uniform(0, np.pi)
        u = xx * np.cos(th) + yy * np.sin(th)
        t = (16 * np.sin(u * 2 * np.pi / rng.uniform(6, 9)))[..., None] + rng.normal(0, 4, (size, size, 1))
    return base + t


def _shape(draw, rng, size: int, value: int, kind: str) -> None:
    cx, cy = rng.uniform(0, size, 2)
    if kind == "rect":
        w, h, th = rng.uniform(size * 0.08, size * 0.3), rng.uniform(size * 0.08, size * 0.3), rng.uniform(0, np.pi / 2)
        c, s = np.cos(th), np.sin(th)
        pts = [(cx + c * dx - s * dy, cy + s * dx + c * dy) for dx, dy in ((-w, -h), (w, -h), (w, h), (-w, h))]
        draw.polygon([(float(x), float(y)) for x, y in pts], fill=value)
    elif kind == "ellipse":
        rx, ry = rng.uniform(size * 0.1, size * 0.35, 2)
        draw.ellipse([float(cx - rx), float(cy - ry), float(cx + rx), float(cy + ry)], fill=value)
    else:
        n = int(rng.integers(5, 8))
        ang = np.sort(rng.uniform(0, 2 * np.pi, n))
        r = rng.uniform(size * 0.1, size * 0.35, n)
        draw.polygon([(float(cx + ri * np.cos(a)), float(cy + ri * np.sin(a))) for a, ri in zip(ang, r)], fill=value)


def _render(mask: np.ndarray, rng) -> np.ndarray:
    size = mask.shape[0]
    img = np.zeros((size, size, 3))
    for c in range(len(SEG_CLASSES)):
        sel = mask == c
        if sel.any():
            img[sel] = _texture(c, rng, size)[sel]
    img += rng.uniform(-12, 12)  # tile brightness
    return np.clip(img, 0, 255).astype(np.uint8)


def _seg_tile(rng, size: int):
    from PIL import Image, ImageDraw

    m = Image.new("L", (size, size), int(rng.choice([0, 2, 4])))
    d = ImageDraw.Draw(m)
    for _ in range(int(rng.integers(4, 9))):
        c = int(rng.integers(0, len(SEG_CLASSES)))
        kind = "rect" if c == 1 else ("ellipse" if c == 3 else str(rng.choice(["ellipse", "poly"])))
        _shape(d, rng, size, c, kind)
    mask = np.asarray(m, dtype=np.uint8).copy()
    return _render(mask, rng), mask


def _save(arr: np.ndarray, path: str) -> None:
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path)


_SPLITS = ("train", "val", "test")


def write_segmentation_set(root: str, *, n=(48, 12, 12), size: int = 96, seed: int = 0) -> str:
    """Write the land-cover set under ``root`` (generic folders layout, ``classes.txt``); returns ``root``."""
    for k, split in enumerate(_SPLITS):
        rng = np.random.default_rng([seed, k, 1])
        for i in range(n[k]):
            img, mask = _seg_tile(rng, size)
            _save(img, os.path.join(root, split, "images", f"tile_{i:04d}.png"))
            _save(mask, os.path.join(root, split, "masks", f"tile_{i:04d}.png"))
    with open(os.path.join(root, "classes.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(SEG_CLASSES) + "\n")
    return root


_ROOFS = np.array([(190, 70, 55), (150, 160, 175), (225, 220, 210), (110, 90, 80)], dtype=np.float64)


def _change_pair(rng, size: int, pad: int = 2):
    """Date A, date B (misregistered by up to ``pad`` px), change label in A's frame (0 / 255)."""
    from PIL import Image, ImageDraw

    big = size + 2 * pad
    g = Image.new("L", (big, big), int(rng.choice([0, 2, 4])))
    d = ImageDraw.Draw(g)
    for _ in range(int(rng.integers(2, 5))):
        _shape(d, rng, big, int(rng.choice([0, 2, 4])), str(rng.choice(["ellipse", "poly"])))
    ground_mask = np.asarray(g, dtype=np.uint8)
    ground = _render(ground_mask, rng).astype(np.float64)

    def boxes(k):
        out = []
        for _ in range(k):
            w, h = rng.integers(size // 10, size // 4, 2)
            x, y = rng.integers(pad, big - pad - w), rng.integers(pad, big - pad - h)
            out.append((int(x), int(y), int(w), int(h), int(rng.integers(0, len(_ROOFS)))))
        return out

    before = boxes(int(rng.integers(2, 6)))
    no_change = rng.uniform() < 0.2
    removed = set() if no_change else {i for i in range(len(before)) if rng.uniform() < 0.35}
    after = [b for i, b in enumerate(before) if i not in removed] + ([] if no_change else boxes(int(rng.integers(1, 4))))

    def draw(bs):
        img, occ = ground.copy(), np.zeros((big, big), bool)
        for x, y, w, h, r in bs:
            img[y:y + h, x:x + w] = _ROOFS[r] + rng.normal(0, 4, (h, w, 3))
            img[y + h - 1:y + h + 1, x + 1:x + w + 1] *= 0.55  # a shadow edge
            occ[y:y + h, x:x + w] = True
        return img, occ

    a_img, a_occ = draw(before)
    b_img, b_occ = draw(after)
    b_img = (b_img - b_img.mean()) * rng.uniform(0.85, 1.15) + b_img.mean() + rng.uniform(-20, 20)  # other light
    dy, dx = rng.integers(-pad, pad + 1, 2)
    crop = (slice(pad, pad + size), slice(pad, pad + size))
    a = np.clip(a_img[crop], 0, 255).astype(np.uint8)
    b = np.clip(b_img[pad + dy:pad + dy + size, pad + dx:pad + dx + size], 0, 255).astype(np.uint8)
    label = ((a_occ != b_occ)[crop] * 255).astype(np.uint8)
    return a, b, label


def write_change_set(root: str, *, n=(48, 12, 12), size: int = 64, seed: int = 0) -> str:
    """Write the building change set under ``root`` (LEVIR-CD layout); returns ``root``."""
    for k, split in enumerate(_SPLITS):
        rng = np.random.default_rng([seed, k, 2])
        for i in range(n[k]):
            a, b, label = _change_pair(rng, size)
            for sub, arr in (("A", a), ("B", b), ("label", label)):
                _save(arr, os.path.join(root, split, sub, f"pair_{i:04d}.png"))
    return root
