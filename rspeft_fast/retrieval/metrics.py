"""Retrieval metrics: Recall@K in both directions and their mean (HarMA's keys and convention, SPEC §5).

Ties need a rule. RSICD's test split holds identical caption strings under different images, so their text
embeddings are bitwise equal and some ranks depend on how equal scores are ordered. The community evaluator
(AMFMN → PIR → HarMA, ``Retrieval.py:itm_eval``) ranks each query with ``np.argsort(row)[::-1]``: numpy's
(unstable) order among equal scores, reversed. ``ties="argsort"`` reproduces exactly that — the tied queries are
ranked by calling ``np.argsort`` on the same values, the others by counting (no sort) — so numbers compare with
published ones; ``ties="pessimistic"`` counts every equal score against the model (a collapsed model with constant
similarities gets chance-level recall, never perfect). Either way the output records the rule and how many
queries had a tie that decided their rank.

A NaN similarity ranks last: a NaN candidate never ranks above the true match, and a query whose true match scores
NaN gets the worst rank. (``np.argsort`` puts NaN first once reversed, so HarMA's evaluator scores a NaN model as
perfect.) The number of queries that saw a NaN is recorded; :func:`selectable` tells a job whether an evaluation
may take part in model selection.
"""
from __future__ import annotations

import math
from numbers import Integral
from typing import Sequence

import numpy as np
import torch

__all__ = ["recall_at_k", "selectable", "TIE_RULES"]

TIE_RULES = ("argsort", "pessimistic")


def _check_args(sim, txt_to_img, ks, chunk, ties) -> tuple:
    if not isinstance(sim, torch.Tensor) or sim.dim() != 2 or not sim.is_floating_point():
        raise ValueError(f"recall_at_k: sim must be a float tensor (N_img, N_txt), got "
                         f"{type(sim).__name__ if not isinstance(sim, torch.Tensor) else (tuple(sim.shape), sim.dtype)}")
    if sim.shape[0] == 0 or sim.shape[1] == 0:
        raise ValueError(f"recall_at_k: sim is empty {tuple(sim.shape)}: need at least one image and one caption")
    if ties not in TIE_RULES:
        raise ValueError(f"recall_at_k: ties={ties!r}: expected one of {', '.join(map(repr, TIE_RULES))}")
    if isinstance(ks, (str, bytes)) or not hasattr(ks, "__iter__"):
        raise ValueError(f"recall_at_k: ks must be a sequence of positive ints, got {ks!r}")
    ks = tuple(ks)
    if not ks:
        raise ValueError("recall_at_k: ks is empty: name at least one K, e.g. ks=(1, 5, 10)")
    bad = [k for k in ks if isinstance(k, bool) or not isinstance(k, Integral) or k < 1]
    if bad:
        raise ValueError(f"recall_at_k: ks must be positive ints, got {bad[0]!r} in {ks}")
    if isinstance(chunk, bool) or not isinstance(chunk, Integral) or chunk < 1:
        raise ValueError(f"recall_at_k: chunk must be a positive int, got {chunk!r}")
    t = torch.as_tensor(txt_to_img, device=sim.device)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"recall_at_k: txt_to_img must be integer image indices, got {t.dtype}")
    t = t.long()
    if t.dim() != 1 or t.shape[0] != sim.shape[1]:
        raise ValueError(f"recall_at_k: txt_to_img must be integer (N_txt,) = ({sim.shape[1]},), got {tuple(t.shape)} {t.dtype}")
    if int(t.min()) < 0 or int(t.max()) >= sim.shape[0]:
        raise ValueError(f"recall_at_k: txt_to_img values must lie in [0, {sim.shape[0]}), got [{int(t.min())}, {int(t.max())}]")
    counts = torch.bincount(t, minlength=sim.shape[0])
    if counts.min() == 0:
        missing = (counts == 0).nonzero().flatten()[:5].tolist()
        raise ValueError(f"recall_at_k: every image needs at least one caption; images {missing} have none")
    return t, tuple(int(k) for k in ks), int(chunk)


def _counts(s: torch.Tensor, pos: torch.Tensor):
    """For queries as rows of ``s`` (q, n) with positives ``pos`` (q, n): the best positive score's number of
    strictly higher and of equal negatives, whether the query has a scorable (non-NaN) positive, and whether its
    row holds a NaN. NaN compares false, so a NaN negative is never counted above the positive."""
    nan = torch.isnan(s)
    ok = (pos & ~nan).any(1)
    best = s.masked_fill(~pos | nan, float("-inf")).amax(1, keepdim=True)
    neg = ~pos
    gt = ((s > best) & neg).sum(1)
    eq = ((s == best) & neg).sum(1)
    last = neg.sum(1)  # the worst rank: every negative above the positive
    gt = torch.where(ok, gt, last)
    eq = torch.where(ok, eq, torch.zeros_like(eq))
    return gt, eq, nan.any(1)


def _argsort_rank(scores: torch.Tensor, positives: torch.Tensor) -> int:
    """HarMA's rank of one query: the first position of a positive in ``np.argsort(scores)[::-1]``."""
    row = scores.detach().cpu()
    if row.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds every bfloat16 value exactly
        row = row.float()
    row = row.contiguous().numpy()
    if np.isnan(row).any():
        row = np.where(np.isnan(row), -np.inf, row)  # ranks last (numpy would put NaN first once reversed)
    inds = np.argsort(row)[::-1]
    where = np.empty(inds.shape[0], dtype=np.int64)
    where[inds] = np.arange(inds.shape[0])
    return int(where[positives.cpu().numpy()].min())


@torch.no_grad()
def recall_at_k(sim: torch.Tensor, txt_to_img, ks: Sequence[int] = (1, 5, 10), chunk: int = 1024,
                ties: str = "argsort") -> dict:
    """Recall@K of image-text retrieval, in percent.

    Args:
        sim: ``(N_img, N_txt)`` similarities (e.g. ``img_emb @ txt_embᵀ`` of L2-normalised embeddings), any float
            dtype; compared in that dtype (float64 stays float64).
        txt_to_img: ``(N_txt,)`` integers, the image of each caption (any number of captions per image, any order).
        ks: the K of Recall@K (positive ints, at least one).
        chunk: rows / columns per block, so no second ``(N_img, N_txt)`` tensor is made.
        ties: ``"argsort"`` (default): ranks exactly as HarMA's ``itm_eval`` (``np.argsort(row)[::-1]``, numpy's
            order among equal scores); ``"pessimistic"``: an equal score ranks above the true match.

    Returns:
        ``{"txt_r{k}", "img_r{k}", "txt_r_mean", "img_r_mean", "r_mean"}`` (floats, percent): ``txt_r{k}``
        (image → text) = share of images with at least one of their captions among the k highest of their row;
        ``img_r{k}`` (text → image) = share of captions whose image is among the k highest of their column;
        ``r_mean`` (mR) = the mean of ``txt_r_mean`` and ``img_r_mean``. Plus ``"ties"`` (the rule),
        ``"tied_queries"`` (images + captions whose rank an equal score decided: a negative scoring exactly the
        best positive) and ``"nan_queries"`` (images + captions whose row / column holds a NaN; NaN ranks last).
    """
    t2i, ks, chunk = _check_args(sim, txt_to_img, ks, chunk, ties)
    n_img, n_txt = sim.shape
    dev = sim.device
    ranks, tied, nans = {}, 0, 0
    for direction, n_q in (("i2t", n_img), ("t2i", n_txt)):
        rank = torch.empty(n_q, dtype=torch.long, device=dev)
        for a in range(0, n_q, chunk):
            if direction == "i2t":  # queries = images (rows), positives = their captions
                s = sim[a:a + chunk]
                pos = t2i[None, :] == torch.arange(a, a + s.shape[0], device=dev)[:, None]
            else:  # queries = captions (columns), the positive = their image
                s = sim[:, a:a + chunk].t()
                pos = torch.arange(n_img, device=dev)[None, :] == t2i[a:a + s.shape[0], None]
            gt, eq, has_nan = _counts(s, pos)
            r = gt + eq if ties == "pessimistic" else gt.clone()
            hit = (eq > 0).nonzero().flatten()
            if ties == "argsort":
                for q in hit.tolist():
                    r[q] = _argsort_rank(s[q], pos[q].nonzero().flatten())
            rank[a:a + s.shape[0]] = r
            tied += int(hit.numel())
            nans += int(has_nan.sum())
        ranks[direction] = rank
    out = {}
    for k in ks:
        out[f"txt_r{k}"] = 100.0 * (ranks["i2t"] < k).double().mean().item()
    for k in ks:
        out[f"img_r{k}"] = 100.0 * (ranks["t2i"] < k).double().mean().item()
    out["txt_r_mean"] = sum(out[f"txt_r{k}"] for k in ks) / len(ks)
    out["img_r_mean"] = sum(out[f"img_r{k}"] for k in ks) / len(ks)
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    out["ties"], out["tied_queries"], out["nan_queries"] = ties, tied, nans
    return out


def selectable(metrics: dict, key: str = "r_mean") -> bool:
    """Whether an evaluation (a :func:`recall_at_k` dict) may be selected as the best epoch: ``metrics[key]`` is a
    finite number and no similarity was NaN (a diverged model is never selected, whatever its recall)."""
    v = metrics.get(key)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        return False
    return int(metrics.get("nan_queries", 0)) == 0
