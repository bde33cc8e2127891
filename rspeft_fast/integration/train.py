"""Moved: the fine-tuning CLI is :mod:`rspeft_fast.train` (``python -m rspeft_fast train``). This module
re-exports its public names so ``from rspeft_fast.integration.train import main`` keeps working."""
from ..train import TrainState, Trainer, atomic_torch_save, build_parser, main  # noqa: F401

__all__ = ["main", "build_parser", "TrainState", "Trainer", "atomic_torch_save"]
