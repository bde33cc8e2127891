"""The training engine and the jobs built on it.

* :mod:`rspeft_fast.train.loop` — :class:`Trainer` (AdamW, warm-up + cosine, autocast, clipping, progress,
  per-epoch metrics, atomic checkpoints, bit-exact resume, DDP / FSDP2), shared by every job;
* :mod:`rspeft_fast.train.checkpoint` — what a checkpoint holds, atomic writes;
* :mod:`rspeft_fast.train.data` — resumable sampling, seeded augmentation, up-front image checks, the
  classification data (torchvision ``ImageFolder`` + timm transforms);
* :mod:`rspeft_fast.train.cli` — ``python -m rspeft_fast train`` (classification);
  ``python -m rspeft_fast retrieval`` lives in :mod:`rspeft_fast.retrieval.job`.
"""
from .checkpoint import TrainState, atomic_torch_save, backbone_checksum, run_fingerprint
from .cli import build_parser, main
from .loop import StopRequest, Trainer, build_optim

__all__ = ["main", "build_parser", "Trainer", "TrainState", "StopRequest", "build_optim", "atomic_torch_save",
           "backbone_checksum", "run_fingerprint"]
