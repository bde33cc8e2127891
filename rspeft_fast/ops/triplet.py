"""Weighted triplet loss: functional entry point (the C++/CUDA Function lands with issue 8)."""
from __future__ import annotations

import torch

from .._impl import resolve_impl
from .._validate import check_float, check_same_device
from ..reference.triplet import weighted_triplet_ref


def check_triplet_inputs(img, txt, ids):
    check_float(img, "img")
    check_float(txt, "txt")
    if img.dim() != 2 or txt.dim() != 2:
        raise ValueError(f"img and txt must be 2-D (B, D); got {tuple(img.shape)} and {tuple(txt.shape)}")
    if img.shape != txt.shape:
        raise ValueError(f"img and txt must have the same shape (B, D); got {tuple(img.shape)} and {tuple(txt.shape)}")
    if ids is not None:
        if ids.dim() != 1 or ids.shape[0] != img.shape[0]:
            raise ValueError(f"ids must have shape (B,) = ({img.shape[0]},), got {tuple(ids.shape)}")
        if ids.is_floating_point() or ids.is_complex():
            raise TypeError(f"ids must be an integer tensor, got {ids.dtype}")
    check_same_device(("img", img), ("txt", txt), ("ids", ids))


def weighted_triplet_loss(img, txt, margin=0.2, gamma=2.0, max_violation=False, ids=None, impl="auto"):
    """HarMA's adaptive triplet loss (SPEC §1): ``img (B, D)``, ``txt (B, D)``, ``ids (B,)`` → scalar."""
    check_triplet_inputs(img, txt, ids)
    impl = resolve_impl("weighted_triplet_loss", impl, img.device, ())
    return weighted_triplet_ref(img, txt, margin, gamma, max_violation, ids)
