"""Dense-prediction metrics from one confusion matrix (SPEC §6).

``cm[target, pred]`` counts pixels over a whole split (ignored pixels left out), accumulated on the device the
predictions live on and summed over the ranks under ``torch.distributed``; every score is derived from it:

* segmentation (:func:`segmentation_scores`): per class ``IoU = TP/(TP+FP+FN)``, ``F1 = 2TP/(2TP+FP+FN)``, NaN when
  the class is absent from both target and prediction (mmseg's convention) and left out of ``mIoU`` / ``mF1``;
  ``OA = trace / total``;
* change detection (:func:`change_scores`): precision, recall, F1 and IoU of class 1 (changed), plus OA.

All scores are in percent. A ratio whose denominator is 0 is NaN (never a silent 0 or 100).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["confusion_matrix", "all_reduce_confusion", "segmentation_scores", "change_scores"]


def _dist_world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_confusion(cm: torch.Tensor) -> torch.Tensor:
    """``cm`` summed over the ranks of the initialised process group (in place; the tensor itself without one).
    gloo cannot reduce CUDA tensors: the sum then goes through the CPU."""
    if _dist_world() == 1:
        return cm
    import torch.distributed as dist

    if dist.get_backend() != "nccl" and cm.device.type != "cpu":
        t = cm.cpu()
        dist.all_reduce(t)
        cm.copy_(t)
    else:
        dist.all_reduce(cm)
    return cm


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: Optional[int] = 255,
                     *, all_reduce: Optional[bool] = None) -> torch.Tensor:
    """The ``(num_classes, num_classes)`` int64 confusion matrix of a batch: rows = target, columns = prediction.

    ``pred``, ``target``: integer label maps of one shape (any number of dimensions), on the same device (the
    matrix is computed there). Pixels whose target is ``ignore_index`` are left out. A target or prediction
    outside ``[0, num_classes)`` (other than ignored pixels) raises ``ValueError``. ``all_reduce``: sum the
    matrix over the ranks of ``torch.distributed`` (default: when a process group is initialised). To
    accumulate a split, pass ``all_reduce=False`` per batch and call :func:`all_reduce_confusion` once on
    the sum.
    """
    if pred.shape != target.shape:
        raise ValueError(f"confusion_matrix: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if pred.is_floating_point() or target.is_floating_point():
        raise TypeError("confusion_matrix: pred and target must be integer label maps (argmax the logits first)")
    n = int(num_classes)
    if n <= 0:
        raise ValueError(f"confusion_matrix: num_classes must be positive, got {num_classes}")
    t = target.reshape(-1).long()
    p = pred.reshape(-1).long().to(t.device)
    if ignore_index is not None:
        keep = t != ignore_index
        t, p = t[keep], p[keep]
    if t.numel():
        for name, v in (("target", t), ("pred", p)):
            lo, hi = int(v.min()), int(v.max())
            if lo < 0 or hi >= n:
                raise ValueError(f"confusion_matrix: {name} has label {lo if lo < 0 else hi} outside [0, {n}) "
                                 f"(ignore_index={ignore_index})")
    cm = torch.bincount(t * n + p, minlength=n * n).reshape(n, n).to(torch.int64)
    if all_reduce is None:
        all_reduce = _dist_world() > 1
    return all_reduce_confusion(cm) if all_reduce else cm


def _ratio(num: float, den: float) -> float:
    return 100.0 * num / den if den > 0 else math.nan


def _nanmean(xs) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else math.nan


def _counts(cm: torch.Tensor):
    if cm.dim() != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"expected a square confusion matrix, got shape {tuple(cm.shape)}")
    c = cm.detach().to("cpu", torch.float64)
    tp = c.diagonal()
    fp = c.sum(0) - tp  # predicted as the class, target another
    fn = c.sum(1) - tp
    return c, tp.tolist(), fp.tolist(), fn.tolist()


def segmentation_scores(cm: torch.Tensor) -> dict:
    """``{"miou", "mf1", "oa", "iou": [per class], "f1": [per class]}`` in percent from ``cm[target, pred]``.
    A class absent from target and prediction has NaN IoU / F1 and is left out of the means; with no pixel
    at all every score is NaN."""
    c, tp, fp, fn = _counts(cm)
    iou = [_ratio(a, a + b + d) for a, b, d in zip(tp, fp, fn)]
    f1 = [_ratio(2 * a, 2 * a + b + d) for a, b, d in zip(tp, fp, fn)]
    return {"miou": _nanmean(iou), "mf1": _nanmean(f1), "oa": _ratio(sum(tp), float(c.sum())), "iou": iou, "f1": f1}


def change_scores(cm: torch.Tensor) -> dict:
    """``{"precision", "recall", "f1", "iou", "oa"}`` of class 1 (changed) in percent from a 2×2 ``cm[target, pred]``
    (a larger matrix: class 1 against the rest). A ratio with a zero denominator (no predicted change:
    precision) is NaN."""
    c, tp, fp, fn = _counts(cm)
    if c.shape[0] < 2:
        raise ValueError("change_scores: the confusion matrix needs at least 2 classes (0 unchanged, 1 changed)")
    a, b, d = tp[1], fp[1], fn[1]
    return {"precision": _ratio(a, a + b), "recall": _ratio(a, a + d), "f1": _ratio(2 * a, 2 * a + b + d),
            "iou": _ratio(a, a + b + d), "oa": _ratio(sum(tp), float(c.sum()))}
