"""The output folder of a training job: one job per folder, checked before the first step.

:class:`OutputFolder` (a context manager, rank 0 only):

* takes an exclusive lock on ``OUT/.rspeft_fast.lock`` (``flock``; released and removed on exit, released by the
  kernel if the process dies) — a second job on the same folder stops with the other process's pid;
* removes the hidden temporary files an interrupted atomic write of this job's own files left behind
  (``.checkpoint.pt.<random>.tmp``, ...; :func:`rspeft_fast._fileio.stale_temporaries`), nothing else;
* checks the folder can be written (a probe file), :meth:`refuse_existing_checkpoint` refuses to start afresh
  over a checkpoint without ``--resume`` or ``--overwrite``, and :meth:`check_room` that the disk has room for
  the files the run will write.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Callable, Iterable

from .._fileio import stale_temporaries

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no lock
    fcntl = None

__all__ = ["OutputFolder", "LOCK_NAME"]

LOCK_NAME = ".rspeft_fast.lock"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


class OutputFolder:
    """``with OutputFolder(out, targets, log=print):`` — see the module docstring. ``targets``: the file names
    this job writes in ``out`` (their stale temporaries are removed)."""

    def __init__(self, out: str, targets: Iterable[str], log: Callable[[str], None] = print, active: bool = True):
        self.out, self.targets, self.log, self.active = out, tuple(targets), log, active
        self._fd = None

    # -- lock ----------------------------------------------------------------------------------------
    def __enter__(self) -> "OutputFolder":
        if not self.active:
            return self
        try:
            os.makedirs(self.out, exist_ok=True)
        except OSError as e:
            raise SystemExit(f"--out {self.out}: cannot create the folder ({e.strerror or e})") from None
        self._probe()
        self._lock()
        try:
            stale = stale_temporaries(self.out, self.targets)
            for p in stale:
                with contextlib.suppress(OSError):
                    os.unlink(p)
            if stale:
                self.log(f"removed {len(stale)} temporary file(s) an interrupted write left in {self.out}: "
                         + ", ".join(os.path.basename(p) for p in stale))
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._unlock()

    def _probe(self) -> None:
        try:
            fd, probe = tempfile.mkstemp(prefix=".rspeft_fast.probe.", dir=self.out)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise SystemExit(f"--out {self.out}: the folder is not writable ({e.strerror or e})") from None

    def _lock(self) -> None:
        if fcntl is None:  # pragma: no cover
            return
        path = os.path.join(self.out, LOCK_NAME)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pid = ""
                with contextlib.suppress(OSError):
                    pid = os.read(fd, 32).decode(errors="replace").strip()
                os.close(fd)
                raise SystemExit(f"--out {self.out} is in use by another job (pid {pid or 'unknown'}): one job per "
                                 "output folder; wait for it to end or choose another --out") from None
            try:  # the holder we waited for may have removed the file meanwhile: lock the current file
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except OSError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def _unlock(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(self.out, LOCK_NAME))
        os.close(self._fd)
        self._fd = None

    # -- checks before the first step -----------------------------------------------------------------
    def refuse_existing_checkpoint(self, ckpt_path: str, resuming: bool, overwrite: bool) -> None:
        """A checkpoint of an earlier run in the folder: continue it (``--resume``) or replace it (``--overwrite``),
        never silently start another run over it."""
        if not self.active or resuming or not os.path.exists(ckpt_path):
            return
        if not overwrite:
            raise SystemExit(f"{ckpt_path} exists (an earlier run's checkpoint): continue that run with --resume, or pass "
                             "--overwrite to start afresh and replace it (or choose another --out)")
        os.unlink(ckpt_path)
        self.log(f"--overwrite: removed the earlier run's checkpoint {ckpt_path}")

    def check_room(self, need: dict) -> None:
        """``need``: ``{file name: expected bytes}``; stops when the disk holding the folder has less free space."""
        if not self.active:
            return
        total = sum(need.values())
        free = shutil.disk_usage(self.out).free
        if free < total:
            parts = ", ".join(f"{k} ~{_size(v)}" for k, v in need.items())
            raise SystemExit(f"--out {self.out}: {_size(free)} free on its disk, the run writes about {_size(total)} "
                             f"({parts}); free some space or choose another --out")
