"""Choosing an implementation of an op: ``impl="auto" | "reference" | "triton" | "cpu" | "cuda"``.

* ``"reference"`` always selects the eager PyTorch path (``rspeft_fast.reference``).
* ``"auto"`` picks the fastest implementation that can run for the inputs' device: the Triton
  kernels on CUDA tensors, the C++ extension for the triplet loss on CPU, otherwise the reference.
  Setting ``RSPEFT_FAST_IMPL=reference`` in the environment makes every ``"auto"`` resolve to the
  reference (a global kill switch for debugging); explicit requests are still honoured.
* An explicit request that cannot run raises :class:`ImplUnavailableError` saying why; nothing falls
  back silently.
* ``"triton"`` on CPU tensors runs the kernels through Triton's interpreter, which must be switched on
  with ``TRITON_INTERPRET=1`` *before* triton is imported (this is how CI checks the kernels).
"""
from __future__ import annotations

import os

import torch

__all__ = [
    "ImplUnavailableError",
    "resolve_impl",
    "triton_available",
    "triton_interpret",
    "force_reference",
]

ENV_FORCE = "RSPEFT_FAST_IMPL"


class ImplUnavailableError(RuntimeError):
    """An explicitly requested implementation cannot run here."""


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip() == "1"


# Cached in a plain dict (not functools.lru_cache) so torch.compile traces the lookup without warnings.
_TRITON_IMPORT: dict[str, str | None] = {}


def _triton_import_error() -> str | None:
    if "error" not in _TRITON_IMPORT:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _TRITON_IMPORT["error"] = None
        except Exception as e:  # pragma: no cover - depends on the machine
            _TRITON_IMPORT["error"] = f"{type(e).__name__}: {e}"
    return _TRITON_IMPORT["error"]


def triton_available(device: torch.device | str) -> tuple[bool, str]:
    """(can Triton kernels run on tensors of ``device``, reason if not)."""
    device = torch.device(device)
    err = _triton_import_error()
    if err is not None:
        return False, f"triton cannot be imported ({err}); install triton>=3.0"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA tensors given but torch.cuda.is_available() is False"
        return True, ""
    if device.type == "cpu":
        if triton_interpret():
            return True, ""
        return False, (
            "the Triton kernels run on CPU tensors only through Triton's interpreter: set "
            "TRITON_INTERPRET=1 in the environment before triton is imported, or use impl='reference'"
        )
    return False, f"no Triton path for device type {device.type!r}"


def force_reference() -> bool:
    return os.environ.get(ENV_FORCE, "").strip().lower() == "reference"


def resolve_impl(op: str, impl: str, device: torch.device | str, choices: tuple[str, ...]) -> str:
    """Resolve ``impl`` for ``op`` on ``device`` to one concrete name out of ``choices``.

    ``choices`` lists the op's implementations besides ``"reference"``, fastest first, each one of
    ``"triton"``, ``"cuda"`` (the C++/CUDA extension on CUDA tensors), ``"cpu"`` (the extension on CPU).
    """
    valid = ("auto", "reference") + tuple(choices)
    if impl not in valid:
        raise ValueError(f"{op}: impl={impl!r} is not one of {valid}")
    device = torch.device(device)
    if impl == "reference":
        return impl
    if impl != "auto":
        ok, why = available(impl, device)
        if not ok:
            raise ImplUnavailableError(f"{op}: impl={impl!r} cannot run here: {why}")
        return impl
    if force_reference():
        return "reference"
    for name in choices:
        if name == "triton" and device.type != "cuda":
            continue  # the interpreter is for checking, never picked by "auto"
        if available(name, device)[0]:
            return name
    return "reference"


def available(name: str, device: torch.device) -> tuple[bool, str]:
    if name == "triton":
        return triton_available(device)
    if name in ("cpu", "cuda"):
        if device.type != name:
            return False, f"impl={name!r} needs {name} tensors, got tensors on {device}"
        from . import _native

        return _native.has(name)
    return False, f"unknown implementation {name!r}"
