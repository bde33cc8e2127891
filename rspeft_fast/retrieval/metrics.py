"""Retrieval metrics: Recall@K in both directions and their mean (HarMA's keys and convention, SPEC §5)."""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["recall_at_k"]


def _check(sim: torch.Tensor, txt_to_img: torch.Tensor) -> None:
    if not isinstance(sim, torch.Tensor) or sim.dim() != 2 or not sim.is_floating_point():
        raise ValueError(f"recall_at_k: sim must be a float tensor (N_img, N_txt), got "
                         f"{type(sim).__name__ if not isinstance(sim, torch.Tensor) else (tuple(sim.shape), sim.dtype)}")
    if txt_to_img.dim() != 1 or txt_to_img.shape[0] != sim.shape[1] or txt_to_img.is_floating_point():
        raise ValueError(f"recall_at_k: txt_to_img must be integer (N_txt,) = ({sim.shape[1]},), got "
                         f"{tuple(txt_to_img.shape)} {txt_to_img.dtype}")
    if txt_to_img.numel() and (int(txt_to_img.min()) < 0 or int(txt_to_img.max()) >= sim.shape[0]):
        raise ValueError(f"recall_at_k: txt_to_img values must lie in [0, {sim.shape[0]}), got "
                         f"[{int(txt_to_img.min())}, {int(txt_to_img.max())}]")
    if torch.bincount(txt_to_img, minlength=sim.shape[0]).min() == 0:
        missing = (torch.bincount(txt_to_img, minlength=sim.shape[0]) == 0).nonzero().flatten()[:5].tolist()
        raise ValueError(f"recall_at_k: every image needs at least one caption; images {missing} have none")


@torch.no_grad()
def recall_at_k(sim: torch.Tensor, txt_to_img, ks: Sequence[int] = (1, 5, 10), chunk: int = 1024) -> dict:
    """Recall@K of image-text retrieval, in percent.

    Args:
        sim: ``(N_img, N_txt)`` similarities (e.g. ``img_emb @ txt_embᵀ`` of L2-normalised embeddings).
        txt_to_img: ``(N_txt,)`` int64, the image of each caption (any number of captions per image, in any order).
        ks: the K of Recall@K.

    Returns:
        ``{"txt_r{k}": ..., "img_r{k}": ..., "txt_r_mean", "img_r_mean", "r_mean"}`` (floats, percent):
        ``txt_r{k}`` (image → text) = share of images with at least one of their captions among the k highest of
        their row; ``img_r{k}`` (text → image) = share of captions whose image is among the k highest of their
        column; ``r_mean`` (mR) = the mean of all of them (the six for k ∈ {1, 5, 10}).

    Ties are counted against the model: a candidate that scores equal to the true match ranks above it (so a
    collapsed model with constant similarities gets chance-level, not perfect, recall). Work is chunked by
    ``chunk`` rows / columns, so no second ``(N_img, N_txt)`` tensor is made.
    """
    txt_to_img = torch.as_tensor(txt_to_img, device=sim.device).long()
    _check(sim, txt_to_img)
    n_img, n_txt = sim.shape
    ks = tuple(int(k) for k in ks)
    s = sim.float()
    # image -> text: rank of the image's best caption = number of *other images'* captions scoring >= it
    i2t_rank = torch.empty(n_img, dtype=torch.long, device=sim.device)
    for a in range(0, n_img, chunk):
        rows = s[a:a + chunk]
        own = txt_to_img[None, :] == torch.arange(a, a + rows.shape[0], device=sim.device)[:, None]
        best = rows.masked_fill(~own, float("-inf")).amax(1, keepdim=True)
        i2t_rank[a:a + rows.shape[0]] = ((rows >= best) & ~own).sum(1)
    # text -> image: rank of the caption's image = number of other images scoring >= it
    t2i_rank = torch.empty(n_txt, dtype=torch.long, device=sim.device)
    for a in range(0, n_txt, chunk):
        cols = s[:, a:a + chunk]
        tgt = txt_to_img[a:a + cols.shape[1]]
        true = cols.gather(0, tgt[None, :])
        other = torch.arange(n_img, device=sim.device)[:, None] != tgt[None, :]
        t2i_rank[a:a + cols.shape[1]] = ((cols >= true) & other).sum(0)
    out = {}
    for k in ks:
        out[f"txt_r{k}"] = 100.0 * (i2t_rank < k).double().mean().item()
    for k in ks:
        out[f"img_r{k}"] = 100.0 * (t2i_rank < k).double().mean().item()
    out["txt_r_mean"] = sum(out[f"txt_r{k}"] for k in ks) / len(ks)
    out["img_r_mean"] = sum(out[f"img_r{k}"] for k in ks) / len(ks)
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out
