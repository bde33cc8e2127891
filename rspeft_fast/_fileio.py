"""Atomic file writes shared by adapter files (``save_adapters``) and training checkpoints.

A write goes to a temporary file in the destination's folder, is flushed and fsynced, replaces the
destination with ``os.replace`` (atomic on POSIX and Windows), and the folder is fsynced so the rename
itself is durable. A crash or a kill at any point leaves either the old file or the new one, never a
half-written file; the temporary file is removed when the write fails.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import BinaryIO, Callable

__all__ = ["atomic_write", "atomic_torch_save"]


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(f)`` on a binary file object, then atomically move the result to ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError, AttributeError):  # the rename itself, durable (POSIX)
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path`` through :func:`atomic_write`."""
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))
