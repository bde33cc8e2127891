"""Image-text retrieval (HarMA): metrics, data readers, the model and the ``python -m rspeft_fast retrieval`` job.

* :func:`recall_at_k` — Recall@1/5/10 both ways and mR, with an explicit tie rule; :func:`selectable` — whether an
  evaluation may be selected (no NaN) (:mod:`.metrics`);
* :func:`read_split`, :class:`CaptionSplit`, :func:`clean_caption` — HarMA / Karpathy / precomp / csv data (:mod:`.readers`);
* :func:`create_clip`, :func:`load_clip_checkpoint`, :class:`RetrievalModel`, :data:`TINY_CLIP` (:mod:`.model`);
* the job: :mod:`.job` (``python -m rspeft_fast retrieval --help``);
* the objective: :func:`rspeft_fast.contrastive_loss` and :func:`rspeft_fast.weighted_triplet_loss`.
"""
from .metrics import TIE_RULES, recall_at_k, selectable
from .readers import CaptionSplit, DataError, clean_caption, detect_format, read_split

__all__ = ["recall_at_k", "selectable", "TIE_RULES", "read_split", "CaptionSplit", "DataError", "clean_caption", "detect_format", "create_clip",
           "load_clip_checkpoint", "RetrievalModel", "TINY_CLIP"]


def __getattr__(name):  # the model helpers import open_clip: only when asked for
    if name in ("create_clip", "load_clip_checkpoint", "RetrievalModel", "TINY_CLIP", "register_tiny_clip"):
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'rspeft_fast.retrieval' has no attribute {name!r}")
