"""Datasets and aligned augmentations for the dense jobs.

Geometry is drawn once per sample and applied to every array of it (image and mask; both dates and the
change label): random scale (bilinear for images, nearest for masks), padding to the crop (image 0, mask
255 = ignore), a random crop, horizontal / vertical flips and 90° rotations (overhead imagery has no up).
Photometric jitter (brightness, contrast, saturation) touches images only — each date on its own draw, as
two acquisitions differ. Randomness comes from torch's global generator, which
:class:`~rspeft_fast.train.data.SeededSamples` seeds per (seed, epoch, sample): the augmentation of a sample
does not depend on workers or on where a run was resumed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["Augment", "DenseDataset", "read_rgb"]


def read_rgb(path: str) -> torch.Tensor:
    """``(3, H, W)`` uint8 of an image file."""
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def _u(lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand(()).item()


@dataclass
class Augment:
    """Training augmentation of ``images`` (float ``(3, H, W)`` in [0, 1]) and one ``mask`` (int64 ``(H, W)``).
    ``crop`` = 0 keeps the size (no scale, no crop)."""

    crop: int = 0
    scale: Sequence[float] = (0.5, 2.0)
    hflip: float = 0.5
    vflip: float = 0.5
    rot90: bool = True
    jitter: float = 0.2

    def __call__(self, images: list, mask: torch.Tensor):
        if self.crop:
            s = _u(*self.scale)
            h, w = mask.shape
            nh, nw = max(1, round(h * s)), max(1, round(w * s))
            if (nh, nw) != (h, w):
                images = [F.interpolate(x[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=s < 1)[0]
                          for x in images]
                mask = F.interpolate(mask[None, None].float(), size=(nh, nw), mode="nearest-exact")[0, 0].long()
            ph, pw = max(self.crop - nh, 0), max(self.crop - nw, 0)
            if ph or pw:
                images = [F.pad(x, (0, pw, 0, ph)) for x in images]
                mask = F.pad(mask, (0, pw, 0, ph), value=255)
            hh, ww = mask.shape
            y = int(torch.randint(0, hh - self.crop + 1, ()).item())
            x0 = int(torch.randint(0, ww - self.crop + 1, ()).item())
            images = [x[:, y:y + self.crop, x0:x0 + self.crop] for x in images]
            mask = mask[y:y + self.crop, x0:x0 + self.crop]
        if torch.rand(()).item() < self.hflip:
            images, mask = [x.flip(-1) for x in images], mask.flip(-1)
        if torch.rand(()).item() < self.vflip:
            images, mask = [x.flip(-2) for x in images], mask.flip(-2)
        if self.rot90 and mask.shape[0] == mask.shape[1]:
            k = int(torch.randint(0, 4, ()).item())
            if k:
                images, mask = [x.rot90(k, (-2, -1)) for x in images], mask.rot90(k, (-2, -1))
        if self.jitter:
            images = [self._jitter(x) for x in images]
        return [x.contiguous() for x in images], mask.contiguous()

    def _jitter(self, x: torch.Tensor) -> torch.Tensor:
        j = self.jitter
        b, c, s = _u(1 - j, 1 + j), _u(1 - j, 1 + j), _u(1 - j, 1 + j)
        x = x * b
        m = x.mean()
        x = (x - m) * c + m
        g = x.mean(0, keepdim=True)
        x = (x - g) * s + g
        return x.clamp(0, 1)


class DenseDataset(torch.utils.data.Dataset):
    """Samples of a :class:`~rspeft_fast.dense.readers.DenseData` split: ``(image, mask)`` (segmentation) or
    ``(a, b, label)`` (change), images normalised with ``mean`` / ``std`` ``(3, H, W)`` float32, masks int64
    ``(H, W)`` with 255 = ignore. ``augment``: an :class:`Augment` (training) or None (evaluation)."""

    def __init__(self, samples, decode, mean, std, augment: Augment | None = None):
        self.samples, self.decode, self.augment = list(samples), decode, augment
        self.mean = torch.tensor(mean, dtype=torch.float32).reshape(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).reshape(3, 1, 1)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        *imgs, mask_path = self.samples[i]
        images = [read_rgb(p).float().div_(255) for p in imgs]
        mask = torch.from_numpy(self.decode(mask_path).astype(np.int64))
        if self.augment is not None:
            images, mask = self.augment(images, mask)
        images = [(x - self.mean) / self.std for x in images]
        return (*images, mask)
