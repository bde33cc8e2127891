"""Dense prediction on injected backbones (UPetu's segmentation and change detection; SPEC §6).

Public, for drop-in users:

* metrics (:mod:`.metrics`): :func:`confusion_matrix` ``(C, C)`` int64, rows = target, columns = prediction;
  :func:`segmentation_scores` (mIoU, mF1, OA, per-class IoU / F1, mmseg's NaN convention);
  :func:`change_scores` (precision, recall, F1, IoU of class 1, OA); all in percent;
* models (:mod:`.model`): :class:`MultiScaleEncoder` (timm ``forward_intermediates``; ViTDet pyramid for plain
  ViTs; CAPM per level), :class:`Segmentor`, :class:`ChangeDetector` (Siamese), :func:`create_encoder`,
  :func:`parameter_report`;
* :func:`sliding_window` inference (:mod:`.infer`), :class:`DenseLoss` (:mod:`.losses`);
* :class:`DistBatchNorm2d` / :func:`sync_batchnorm` (global-batch BatchNorm under DDP / FSDP, any backend);
* :func:`save_predictions` (:mod:`.pictures`: the ``predictions.png`` grid);
* readers of the layouts users have (:mod:`.readers`) and aligned augmentations (:mod:`.transforms`);
* the jobs ``python -m rspeft_fast segment`` / ``change`` (:mod:`.job`).
"""
from importlib import import_module as _import_module

_LAZY = {
    "confusion_matrix": ".metrics",
    "all_reduce_confusion": ".metrics",
    "segmentation_scores": ".metrics",
    "change_scores": ".metrics",
    "MultiScaleEncoder": ".model",
    "SimplePyramid": ".model",
    "Segmentor": ".model",
    "ChangeDetector": ".model",
    "create_encoder": ".model",
    "level_prompts": ".model",
    "parameter_report": ".model",
    "DistBatchNorm2d": ".model",
    "sync_batchnorm": ".model",
    "save_predictions": ".pictures",
    "sliding_window": ".infer",
    "DenseLoss": ".losses",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'rspeft_fast.dense' has no attribute {name!r}")
    value = getattr(_import_module(mod, __name__), name)
    globals()[name] = value
    return value
