"""Training checkpoints: what a run must hold to resume bit-for-bit, written atomically.

A checkpoint (``format`` ``rspeft_fast.train/2``) is a ``torch.save``d dict of plain tensors and Python values
(loadable with ``weights_only=True``):

* ``run``: the run's fingerprint — every option of the job that shapes the training trajectory, as JSON
  strings (:func:`run_fingerprint`; the engine derives it from the parsed options, leaving out only those
  marked as run control: ``--epochs``, which may grow, ``--out``, ``--workers``, ...); a resume with any
  other value is refused;
* ``backbone_checksum``: a hash of the frozen tensors (another backbone file is refused);
* ``trainable``: every trainable tensor by name; ``optimizer``, ``scheduler``, ``scaler`` state dicts;
* ``state``: :class:`TrainState` (epoch, step, history, position within the epoch, running sums);
* ``sampler``: the sampler's generator state at the start of epoch ``state.epoch`` (the epoch in flight, or
  the next one when the checkpoint falls between epochs: after an evaluation, at the end of the run);
* ``rng``: the torch CPU / CUDA, numpy and python RNG states — one entry per rank under ``torch.distributed``.

Writes go through :func:`rspeft_fast._fileio.atomic_torch_save` (temporary file, fsync, ``os.replace``).
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field

import torch
from torch import nn

from .._fileio import atomic_torch_save

__all__ = ["TrainState", "fresh_acc", "run_fingerprint", "backbone_checksum", "rng_state", "set_rng_state",
           "atomic_torch_save", "FORMAT"]

FORMAT = "rspeft_fast.train/2"


@dataclass
class TrainState:
    """Everything besides tensors that a checkpoint must hold to resume."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    history: list = field(default_factory=list)
    epoch_step: int = 0  # steps taken in the epoch in flight
    epoch_acc: dict = field(default_factory=dict)  # running sums of the epoch in flight (loss, images, ...)
    extra: dict = field(default_factory=dict)  # job-specific values (e.g. the retrieval job's best epoch)


def fresh_acc() -> dict:
    return {"total_loss": 0.0, "n_seen": 0, "first_loss": None, "train_s": 0.0}


def run_fingerprint(options: dict) -> dict:
    """``{name: value}`` of the options that shape the training trajectory → ``{name: JSON string}``."""
    return {k: json.dumps(v, sort_keys=True, default=str) for k, v in sorted(options.items())}


@torch.no_grad()
def backbone_checksum(model: nn.Module) -> str:
    """A float64 sum per frozen tensor, hashed: the frozen backbone must be the same on --resume."""
    h = hashlib.sha256()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            t = p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP2 DTensor
            h.update(f"{n}:{tuple(t.shape)}:{t.double().sum().item():.17g}:{t.double().abs().sum().item():.17g};".encode())
    return h.hexdigest()


def rng_state(device: torch.device) -> dict:
    """This process's RNG states (torch CPU, CUDA when used, numpy, python)."""
    try:
        import numpy as np

        ns = np.random.get_state()
        np_state = {"name": ns[0], "keys": torch.from_numpy(ns[1].astype("int64")), "pos": int(ns[2]),
                    "has_gauss": int(ns[3]), "cached_gaussian": float(ns[4])}
    except ImportError:  # pragma: no cover
        np_state = None
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np_state,
            "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None}


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def set_rng_state(rng: dict, device: torch.device) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(_as_tuple(rng["python"]))
    if rng["numpy"] is not None:
        import numpy as np

        n = rng["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if rng["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state_all(rng["cuda"])
