"""Atomic file writes shared by adapter files (``save_adapters``), training checkpoints and ``metrics.json``.

A write goes to a hidden temporary file ``.NAME.<random>.tmp`` in the destination's folder, is flushed and
fsynced, replaces the destination with ``os.replace`` (atomic on POSIX and Windows), and the folder is
fsynced so the rename itself is durable. A crash or a kill at any point leaves either the old file or the
new one, never a half-written file; the temporary file is removed when the write fails (a killed process
leaves it behind: :func:`stale_temporaries` finds such files of given targets).

The file gets the mode a plain ``open(path, "w")`` would give it: the existing destination's mode, or
``0o666`` less the umask for a new file (``mkstemp`` alone would leave 0600).
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from typing import BinaryIO, Callable, Iterable

__all__ = ["atomic_write", "atomic_torch_save", "atomic_write_text", "stale_temporaries", "is_no_space"]


def _umask() -> int:
    try:  # Linux ≥ 4.7: read it without changing it
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _mode_for(path: str) -> int:
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(f)`` on a binary file object, then atomically move the result to ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    mode = _mode_for(path)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), mode)
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


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``text`` (UTF-8) to ``path`` through :func:`atomic_write`."""
    data = text.encode("utf-8")
    atomic_write(path, lambda f: f.write(data))


def stale_temporaries(folder: str | os.PathLike, targets: Iterable[str]) -> list[str]:
    """Paths of the temporary files :func:`atomic_write` leaves behind when killed mid-write, for the files
    named ``targets`` in ``folder`` (``.checkpoint.pt.<random>.tmp`` for ``checkpoint.pt``); no others."""
    folder = os.fspath(folder)
    pat = re.compile(r"\.(" + "|".join(re.escape(t) for t in targets) + r")\.[^/\\]+\.tmp")
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return [os.path.join(folder, n) for n in sorted(names) if pat.fullmatch(n) and os.path.isfile(os.path.join(folder, n))]


def is_no_space(e: BaseException) -> bool:
    """Whether ``e`` is a full disk (or quota): ``OSError`` ENOSPC / EDQUOT, or the ``RuntimeError`` torch's
    zip writer raises when a write fails (``enforce fail at inline_container.cc``)."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
    return isinstance(e, RuntimeError) and "inline_container.cc" in str(e)
