"""Choosing an implementation of an op: ``impl="auto" | "reference" | "triton" | "cpu" | "cuda"``.

* ``"reference"`` always selects the eager PyTorch path (``rspeft_fast.reference``).
* ``"auto"`` picks the fastest implementation that can run for the inputs' device: the Triton
  kernels on CUDA tensors, the C++ extension for the triplet loss on CPU, otherwise the reference.
  Setting ``RSPEFT_FAST_IMPL=reference`` in the environment makes every ``"auto"`` resolve to the
  reference (a global kill switch for debugging); explicit requests are still honoured.
* An explicit request that cannot run raises :class:`ImplUnavailableError` saying why, before any
  kernel launch; nothing falls back silently.
* Inputs outside a fused kernel's limits (shared memory of the device, a bottleneck too wide, ...): the
  op passes ``limits=``, a zero-argument callable returning None or a one-line reason naming the limit
  (the kernel files' ``why_unsupported``). ``"auto"`` then runs the reference and warns once per
  ``(op, reason)``; an explicit request raises :class:`ImplUnavailableError` with the reason.
* An unknown name raises ``ValueError`` listing the op's choices: at the construction of every module
  (:func:`check_impl`) and at the call of every functional (:func:`resolve_impl`).

The one dispatch rule: the functionals (``rspeft_fast.ops``) call :func:`resolve_impl` and run the chosen
implementation; modules validate ``impl`` at construction and pass it to their functional.
* ``"triton"`` on CPU tensors runs the kernels through Triton's interpreter, which must be switched on
  with ``TRITON_INTERPRET=1`` *before* triton is imported (this is how CI checks the kernels).
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, Optional

import torch

__all__ = [
    "ImplUnavailableError",
    "IMPLS",
    "check_impl",
    "impl_property",
    "resolve_impl",
    "kernel_limits",
    "triton_available",
    "triton_interpret",
    "force_reference",
    "register_plan_cache",
    "clear_plans",
    "autocast_state",
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


# The implementations of each op besides "reference", fastest first (what "auto" tries, in order).
IMPLS: dict[str, tuple[str, ...]] = {
    "mufa": ("triton",),
    "qlinear": ("triton",),
    "qlinear_packed": ("triton",),
    "eqam": ("triton",),
    "eqam_packed": ("triton",),
    "mga": ("triton",),
    "weighted_triplet_loss": ("cuda", "cpu"),
}

# (op, reason) pairs "auto" has already warned about (one warning each per process).
_WARNED: set[tuple[str, str]] = set()


def _choices_of(op: str, choices: Optional[tuple[str, ...]]) -> tuple[str, ...]:
    if choices is not None:
        return tuple(choices)
    if op not in IMPLS:
        raise KeyError(f"unknown op {op!r}: pass choices= (known ops: {sorted(IMPLS)})")
    return IMPLS[op]


def check_impl(op: str, impl: str, choices: Optional[tuple[str, ...]] = None) -> str:
    """Validate ``impl`` for ``op`` (its choices from :data:`IMPLS` unless given); returns it.

    Raises ``ValueError`` listing the valid names; used by every module's constructor so that a typo fails
    where it is made, not at the first forward.
    """
    valid = ("auto", "reference") + _choices_of(op, choices)
    if not isinstance(impl, str) or impl not in valid:
        raise ValueError(f"{op}: impl={impl!r} is not one of {valid}")
    return impl


def impl_property(op: str) -> property:
    """An ``impl`` attribute for a module of ``op``: validated by :func:`check_impl` whenever it is set
    (at construction and later), stored as ``_impl``."""

    def get(self) -> str:
        return self.__dict__["_impl"]

    def set_(self, value: str) -> None:
        self.__dict__["_impl"] = check_impl(op, value)

    return property(get, set_, doc=f"implementation of {op}: one of ('auto', 'reference') + IMPLS[{op!r}]")


def resolve_impl(op: str, impl: str, device: torch.device | str, choices: Optional[tuple[str, ...]] = None,
                 limits: Optional[Callable[[], Optional[str]]] = None) -> str:
    """Resolve ``impl`` for ``op`` on ``device`` to one concrete name: ``"reference"`` or one of ``choices``.

    ``choices`` lists the op's implementations besides ``"reference"``, fastest first, each one of
    ``"triton"``, ``"cuda"`` (the C++/CUDA extension on CUDA tensors), ``"cpu"`` (the extension on CPU);
    default: ``IMPLS[op]``. ``limits``: optional zero-argument callable returning None when the inputs are
    inside the fused implementation's limits, else a one-line reason naming the limit; ``"auto"`` then
    resolves to ``"reference"`` with one ``warnings.warn`` per ``(op, reason)``, an explicit request raises
    :class:`ImplUnavailableError` (before any kernel runs).
    """
    choices = _choices_of(op, choices)
    check_impl(op, impl, choices)
    device = torch.device(device)
    if impl == "reference":
        return impl
    if impl != "auto":
        ok, why = available(impl, device)
        if not ok:
            raise ImplUnavailableError(f"{op}: impl={impl!r} cannot run here: {why}")
        reason = limits() if limits is not None else None
        if reason:
            raise ImplUnavailableError(f"{op}: impl={impl!r} cannot run these inputs: {reason}; use impl='reference' "
                                       "(or 'auto', which falls back to it with a warning)")
        return impl
    if force_reference():
        return "reference"
    for name in choices:
        if name == "triton" and device.type != "cuda":
            continue  # the interpreter is for checking, never picked by "auto"
        if available(name, device)[0]:
            reason = limits() if limits is not None else None
            if reason:
                if (op, reason) not in _WARNED:
                    _WARNED.add((op, reason))
                    warnings.warn(f"{op}: impl='auto' runs the eager reference: the {name} implementation does not "
                                  f"support these inputs ({reason})", stacklevel=3)
                return "reference"
            return name
    return "reference"


def kernel_limits(kernels: Callable[[], object], device: torch.device | str, dtype: torch.dtype,
                  **shapes: int) -> Callable[[], Optional[str]]:
    """A ``limits=`` callable for :func:`resolve_impl` from a kernel file's ``why_unsupported``.

    ``kernels`` returns the kernel module (imported lazily: only called when a fused implementation is
    considered); ``why_unsupported(*, dtype, props, **shapes)`` is called with the device's properties
    (``kernels/_launch.device_props``). A kernel file without ``why_unsupported`` has no declared limits.
    """
    def limits() -> Optional[str]:
        kmod = kernels()
        why = getattr(kmod, "why_unsupported", None)
        if why is None:
            return None
        from .kernels import _launch  # the one launch policy (kernels/_launch.py)

        return why(dtype=dtype, props=_launch.device_props(torch.device(device)), **shapes)

    return limits


# The ops' plan caches (checks, resolution and launch plans kept per call key: ``ops/mufa.py``, ``ops/qlinear.py``).
# Their keys hold everything that legitimately changes a plan (shapes, dtypes, devices, autocast, the fp32 matmul
# precision, TRITON_INTERPRET and RSPEFT_FAST_IMPL); code that replaces the package's own functions (tests with
# monkeypatch) calls :func:`clear_plans` first.
_PLAN_CACHES: list[dict] = []


_AUTOCAST_TYPES: dict[str, bool] = {}


def autocast_state(device_type: str):
    """The autocast dtype active for ``device_type`` or None (also for device types without autocast, e.g. meta):
    part of the ops' plan keys."""
    ok = _AUTOCAST_TYPES.get(device_type)
    if ok is None:
        ok = _AUTOCAST_TYPES[device_type] = bool(torch.amp.is_autocast_available(device_type))
    if ok and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def register_plan_cache(cache: dict) -> dict:
    _PLAN_CACHES.append(cache)
    return cache


def clear_plans() -> None:
    """Forget every op's cached plans and the launchers' launch plans (the next call of each key checks, resolves
    and plans again)."""
    import sys

    for c in _PLAN_CACHES:
        c.clear()
    launch = sys.modules.get(__package__ + ".kernels._launch")
    for c in getattr(launch, "PLAN_CACHES", ()):
        c.clear()


def available(name: str, device: torch.device) -> tuple[bool, str]:
    if name == "triton":
        return triton_available(device)
    if name in ("cpu", "cuda"):
        if device.type != name:
            return False, f"impl={name!r} needs {name} tensors, got tensors on {device}"
        from . import _native

        return _native.has(name)
    return False, f"unknown implementation {name!r}"
