"""Procedural texture classes (see :mod:`rspeft_fast.data`)."""
from __future__ import annotations

import math
import os

import torch

CLASSES = (
    "stripes_horizontal",
    "stripes_vertical",
    "stripes_diagonal",
    "stripes_fine",
    "checkerboard",
    "blobs",
    "dots",
    "plain_noise",
)


def _grid(size: int, g: torch.Generator):
    c = torch.linspace(-1.0, 1.0, size)
    y, x = torch.meshgrid(c, c, indexing="ij")
    return x, y


def _rand(g, lo=0.0, hi=1.0):
    return lo + (hi - lo) * torch.rand((), generator=g).item()


def _pattern(cls: str, size: int, g: torch.Generator) -> torch.Tensor:
    """A (size, size) pattern in [0, 1]."""
    x, y = _grid(size, g)
    phase = _rand(g, 0, 2 * math.pi)
    jitter = _rand(g, -0.2, 0.2)  # orientation jitter, radians

    def stripes(theta, cycles):
        u = x * math.cos(theta) + y * math.sin(theta)
        return 0.5 + 0.5 * torch.tanh(3.0 * torch.sin(math.pi * cycles * u + phase))

    if cls == "stripes_horizontal":
        return stripes(math.pi / 2 + jitter, _rand(g, 3, 5))
    if cls == "stripes_vertical":
        return stripes(jitter, _rand(g, 3, 5))
    if cls == "stripes_diagonal":
        return stripes(math.pi / 4 + jitter + (math.pi / 2 if _rand(g) < 0.5 else 0.0), _rand(g, 3, 5))
    if cls == "stripes_fine":
        return stripes(_rand(g, 0, math.pi), _rand(g, 9, 12))
    if cls == "checkerboard":
        f = _rand(g, 3, 5)
        t = jitter
        u, v = x * math.cos(t) + y * math.sin(t), -x * math.sin(t) + y * math.cos(t)
        s = torch.sin(math.pi * f * u + phase) * torch.sin(math.pi * f * v + _rand(g, 0, 2 * math.pi))
        return 0.5 + 0.5 * torch.tanh(4.0 * s)
    if cls == "blobs":
        out = torch.zeros(size, size)
        for _ in range(int(_rand(g, 3, 7))):
            cx, cy, r = _rand(g, -1, 1), _rand(g, -1, 1), _rand(g, 0.2, 0.45)
            out = out + torch.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
        return (out > 0.6).float() * 0.8 + 0.2 * out.clamp(0, 1)
    if cls == "dots":
        f = _rand(g, 4, 6)
        u = torch.sin(math.pi * f * x + phase)
        v = torch.sin(math.pi * f * y + _rand(g, 0, 2 * math.pi))
        return ((u > 0.7) & (v > 0.7)).float()
    if cls == "plain_noise":
        lo = torch.rand(1, 1, max(size // 8, 2), max(size // 8, 2), generator=g)
        return torch.nn.functional.interpolate(lo, size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    raise ValueError(f"unknown texture class {cls!r}")


def make_textures(per_class: int = 40, size: int = 64, seed: int = 0, noise: float = 0.06, classes=CLASSES):
    """``(images uint8 (N, 3, size, size), labels int64 (N,), class names)``, N = per_class * len(classes)."""
    g = torch.Generator().manual_seed(int(seed))
    imgs, labels = [], []
    for k, cls in enumerate(classes):
        for _ in range(per_class):
            p = _pattern(cls, size, g)[None]  # (1, H, W)
            # random colours (colour carries no class information) with a guaranteed contrast
            bg = 0.45 * torch.rand(3, 1, 1, generator=g)
            fg = (bg + 0.35 + 0.2 * torch.rand(3, 1, 1, generator=g)).clamp(max=1.0)
            if _rand(g) < 0.5:
                fg, bg = bg, fg
            img = bg + (fg - bg) * p + noise * torch.randn(3, size, size, generator=g)
            imgs.append((img.clamp(0, 1) * 255).round().to(torch.uint8))
            labels.append(k)
    return torch.stack(imgs), torch.tensor(labels, dtype=torch.long), tuple(classes)


class TextureScenes(torch.utils.data.Dataset):
    """The embedded set as a Dataset of ``(float image (3, H, W) normalised with mean/std, label)``.

    ``split``: ``"train"`` or ``"val"`` (disjoint draws: the val set uses another seed)."""

    def __init__(self, split: str = "train", per_class: int = 40, size: int = 64, seed: int = 0, mean=(0.5,) * 3, std=(0.5,) * 3):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        imgs, labels, self.classes = make_textures(per_class, size, seed=seed * 2 + (split == "val") + 1)
        m = torch.tensor(mean).view(1, 3, 1, 1)
        s = torch.tensor(std).view(1, 3, 1, 1)
        self.images = (imgs.float() / 255.0 - m) / s
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def write_image_folder(root: str, per_class: int = 10, size: int = 64, seed: int = 0) -> str:
    """Write the embedded set as ``root/<class>/<i>.png`` (UCM / NWPU-RESISC45 / AID layout)."""
    from PIL import Image

    imgs, labels, classes = make_textures(per_class, size, seed=seed)
    for i, (im, lab) in enumerate(zip(imgs, labels.tolist())):
        d = os.path.join(root, classes[lab])
        os.makedirs(d, exist_ok=True)
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(os.path.join(d, f"{i:05d}.png"))
    return root
