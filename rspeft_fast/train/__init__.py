"""The training engine and the jobs built on it.

* :mod:`rspeft_fast.train.engine` — the one entry point, :func:`~rspeft_fast.train.engine.run`: a job describes
  its model, data, objective and metrics (:class:`~rspeft_fast.train.engine.Job`), the engine does the rest;
* :mod:`rspeft_fast.train.loop` — :class:`Trainer` (AdamW, warm-up + cosine, autocast, clipping, progress,
  per-epoch metrics, atomic checkpoints, bit-exact resume, DDP / FSDP2, phase hooks);
* :mod:`rspeft_fast.train.checkpoint` — what a checkpoint holds, atomic writes;
* :mod:`rspeft_fast.train.outdir` — the output folder: lock, leftovers, room;
* :mod:`rspeft_fast.train.data` — resumable sampling, seeded augmentation, up-front image checks, the
  classification data (torchvision ``ImageFolder`` + timm transforms);
* :mod:`rspeft_fast.train.cli` — ``python -m rspeft_fast train`` (classification);
  ``python -m rspeft_fast retrieval`` lives in :mod:`rspeft_fast.retrieval.job`.
"""
from .checkpoint import TrainState, atomic_torch_save, backbone_checksum, run_fingerprint
from .cli import build_parser, main
from .engine import Job, Settings, run
from .loop import StopRequest, Trainer, build_optim

__all__ = ["main", "build_parser", "Job", "Settings", "run", "Trainer", "TrainState", "StopRequest", "build_optim",
           "atomic_torch_save", "backbone_checksum", "run_fingerprint"]
