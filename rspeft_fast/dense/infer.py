"""Sliding-window inference: a large tile scored whole from crop-sized windows (SPEC §6).

Windows of ``crop`` pixels start every ``stride`` pixels, the last one flush with the far edge (so a size that
stride does not divide is still covered, with a larger overlap at the end); an image smaller than ``crop`` is
zero-padded to it (the padding's logits are dropped). Overlapping logits are averaged. With one window
covering the image exactly the result is the model's output on the whole image.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["window_starts", "sliding_window"]


def window_starts(size: int, crop: int, stride: int) -> list:
    """Start offsets along one axis of ``size`` (≥ ``crop``): ``0, stride, 2·stride, ...`` and a last window
    ending at ``size``."""
    if crop <= 0 or stride <= 0:
        raise ValueError(f"crop and stride must be positive, got crop={crop}, stride={stride}")
    if stride > crop:
        raise ValueError(f"stride {stride} > crop {crop} would leave pixels unscored")
    if size <= crop:
        return [0]
    starts = list(range(0, size - crop, stride))
    starts.append(size - crop)
    return starts


@torch.no_grad()
def sliding_window(model: Callable, *images: torch.Tensor, crop: int, stride: int, num_classes: int,
                   batch_size: int = 8) -> torch.Tensor:
    """Logits ``(B, num_classes, H, W)`` of ``model(*windows)`` over ``images`` (each ``(B, C, H, W)``, the same
    ``H, W``; a change model takes two), ``batch_size`` windows (per image of the batch) per forward,
    overlapping logits averaged (float32 accumulation)."""
    x0 = images[0]
    if any(t.shape[-2:] != x0.shape[-2:] for t in images):
        raise ValueError(f"sliding_window: inputs differ in size: {[tuple(t.shape) for t in images]}")
    b, _, h, w = x0.shape
    ph, pw = max(crop - h, 0), max(crop - w, 0)
    if ph or pw:
        images = tuple(F.pad(t, (0, pw, 0, ph)) for t in images)
    hp, wp = h + ph, w + pw
    boxes = [(y, x) for y in window_starts(hp, crop, stride) for x in window_starts(wp, crop, stride)]
    out = torch.zeros(b, num_classes, hp, wp, device=x0.device, dtype=torch.float32)
    count = torch.zeros(1, 1, hp, wp, device=x0.device, dtype=torch.float32)
    for i in range(0, len(boxes), batch_size):
        chunk = boxes[i:i + batch_size]
        wins = [torch.cat([t[:, :, y:y + crop, x:x + crop] for y, x in chunk], 0) for t in images]
        logits = model(*wins).float()
        for j, (y, x) in enumerate(chunk):
            out[:, :, y:y + crop, x:x + crop] += logits[j * b:(j + 1) * b]
            count[:, :, y:y + crop, x:x + crop] += 1
    return (out / count)[:, :, :h, :w]
