"""Embedded captioned scene set for the retrieval job: generated images with paraphrased captions, no download.

Each image is composed from three attributes and each caption describes all three in other words:

* land cover (the texture of a region): farmland (parallel stripes), residential (a grid of square roofs),
  forest (round tree crowns), orchard (a regular grid of dots);
* colour of that region: red, green, blue, yellow, white;
* layout (where the region lies): the left half, the right half, the top half, the bottom half, the centre.

The rest of the image is a dark, noisy background. 4 × 5 × 5 = 100 attribute combinations; each image draws
one at random, with random texture phase / frequency, colour shade and pixel noise. Every image has
``captions_per_image`` (default 5, as RSICD / RSITMD) distinct captions from paraphrase templates with
synonyms. :func:`make_scenes` is deterministic for a given seed; the splits use disjoint seeds.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

__all__ = ["COVERS", "COLOURS", "LAYOUTS", "CaptionedScenes", "make_scenes", "scene_captions", "SPLIT_SIZES"]

COVERS = {
    "farmland": ("farmland", "fields", "crop rows", "cultivated land", "striped fields"),
    "residential": ("houses", "buildings", "a residential area", "rows of roofs", "a housing block"),
    "forest": ("forest", "trees", "woodland", "tree crowns", "a wooded area"),
    "orchard": ("an orchard", "dotted plantations", "fruit trees in rows", "a plantation", "planted dots"),
}
COLOURS = {
    "red": ((0.85, 0.15, 0.12), ("red", "reddish", "crimson")),
    "green": ((0.15, 0.75, 0.2), ("green", "greenish", "bright green")),
    "blue": ((0.15, 0.3, 0.9), ("blue", "bluish", "deep blue")),
    "yellow": ((0.9, 0.85, 0.15), ("yellow", "yellowish", "golden")),
    "white": ((0.92, 0.92, 0.92), ("white", "whitish", "pale")),
}
LAYOUTS = {
    "left": ("the left half", "the left side", "the western part"),
    "right": ("the right half", "the right side", "the eastern part"),
    "top": ("the top half", "the upper part", "the northern part"),
    "bottom": ("the bottom half", "the lower part", "the southern part"),
    "centre": ("the centre", "the middle", "the central area"),
}
_TEMPLATES = (
    "{colour} {cover} in {layout} of the image",
    "an aerial view of {colour} {cover} in {layout}",
    "{layout} shows {colour} {cover}",
    "there is {colour} {cover} in {layout}",
    "a remote sensing image with {colour} {cover} covering {layout}",
    "{colour} {cover} occupy {layout} of the scene",
    "in {layout} we see {colour} {cover}",
)

#: images per split of the default embedded set (``scale`` multiplies them)
SPLIT_SIZES = {"train": 240, "val": 60, "test": 60}
_SPLIT_SEED = {"train": 1, "val": 2, "test": 3}


def _texture(cover: str, size: int, g: torch.Generator) -> torch.Tensor:
    """A (size, size) pattern in [0, 1]."""
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    r = lambda lo, hi: lo + (hi - lo) * torch.rand((), generator=g).item()  # noqa: E731
    if cover == "farmland":
        th, period = r(0, math.pi), r(3.5, 5.5)
        return (torch.sin(2 * math.pi * (xx * math.cos(th) + yy * math.sin(th)) / period + r(0, 6.3)) > 0).float()
    if cover == "residential":
        p = r(5.0, 7.0)
        ox, oy = r(0, p), r(0, p)
        return ((((xx + ox) % p) < p * 0.6) & (((yy + oy) % p) < p * 0.6)).float()
    if cover == "forest":
        n = int(size * size / 14)
        cx, cy = torch.rand(n, 1, 1, generator=g) * size, torch.rand(n, 1, 1, generator=g) * size
        rad = 1.2 + 1.3 * torch.rand(n, 1, 1, generator=g)
        tone = 0.6 + 0.4 * torch.rand(n, 1, 1, generator=g)
        return ((((xx - cx) ** 2 + (yy - cy) ** 2) < rad ** 2).float() * tone).amax(0)
    if cover == "orchard":
        p = r(4.0, 5.0)
        ox, oy = r(0, p), r(0, p)
        return ((((xx + ox) % p) - p / 2) ** 2 + (((yy + oy) % p) - p / 2) ** 2 < 1.1 ** 2).float()
    raise ValueError(f"unknown land cover {cover!r}")


def _region(layout: str, size: int) -> torch.Tensor:
    m = torch.zeros(size, size)
    h = size // 2
    q = size // 4
    if layout == "left":
        m[:, :h] = 1
    elif layout == "right":
        m[:, h:] = 1
    elif layout == "top":
        m[:h, :] = 1
    elif layout == "bottom":
        m[h:, :] = 1
    elif layout == "centre":
        m[q:size - q, q:size - q] = 1
    else:
        raise ValueError(f"unknown layout {layout!r}")
    return m


def scene_captions(cover: str, colour: str, layout: str, n: int, rng: random.Random) -> list:
    """``n`` distinct paraphrased captions of one attribute combination."""
    seen, out = set(), []
    for _ in range(200):
        c = rng.choice(_TEMPLATES).format(colour=rng.choice(COLOURS[colour][1]), cover=rng.choice(COVERS[cover]),
                                          layout=rng.choice(LAYOUTS[layout]))
        c = c[0].upper() + c[1:] + "."
        if c not in seen:
            seen.add(c)
            out.append(c)
            if len(out) == n:
                break
    return out


def make_scenes(n: int, size: int = 32, seed: int = 0, captions_per_image: int = 5, noise: float = 0.05):
    """``(images uint8 (n, 3, size, size), captions: list of n lists, attributes: list of n (cover, colour, layout))``."""
    g = torch.Generator().manual_seed(int(seed))
    rng = random.Random(int(seed))
    covers, colours, layouts = list(COVERS), list(COLOURS), list(LAYOUTS)
    imgs, caps, attrs = [], [], []
    for _ in range(int(n)):
        cover, colour, layout = rng.choice(covers), rng.choice(colours), rng.choice(layouts)
        rgb = torch.tensor(COLOURS[colour][0]).view(3, 1, 1)
        shade = 0.85 + 0.15 * torch.rand((), generator=g)
        bg = 0.08 + 0.12 * torch.rand(3, 1, 1, generator=g)
        pat = _texture(cover, size, g)
        region = _region(layout, size)
        fg = (0.35 + 0.65 * pat) * rgb * shade
        img = bg * (1 - region) + fg * region + noise * torch.randn(3, size, size, generator=g)
        imgs.append((img.clamp(0, 1) * 255).round().to(torch.uint8))
        caps.append(scene_captions(cover, colour, layout, captions_per_image, rng))
        attrs.append((cover, colour, layout))
    return torch.stack(imgs), caps, attrs


@dataclass
class CaptionedScenes:
    """One split of the embedded set: ``images uint8 (N, 3, H, W)``, ``captions`` (flat list), ``txt_to_img`` (per caption)."""

    images: torch.Tensor
    captions: list
    txt_to_img: list
    attributes: list

    @classmethod
    def split(cls, name: str, size: int = 32, seed: int = 0, scale: float = 1.0, captions_per_image: int = 5) -> "CaptionedScenes":
        if name not in SPLIT_SIZES:
            raise ValueError(f"split must be one of {sorted(SPLIT_SIZES)}, got {name!r}")
        n = max(4, int(round(SPLIT_SIZES[name] * scale)))
        imgs, caps, attrs = make_scenes(n, size, seed=seed * 10 + _SPLIT_SEED[name], captions_per_image=captions_per_image)
        flat = [c for cs in caps for c in cs]
        t2i = [i for i, cs in enumerate(caps) for _ in cs]
        return cls(imgs, flat, t2i, attrs)
