"""Loading the C++/CUDA extension ``rspeft_fast._C``; a missing build is reported when an op needs it."""
from __future__ import annotations

REBUILD = "rebuild with `pip install --no-build-isolation -e .`"

# Cached in a plain dict (not functools.lru_cache) so torch.compile traces the lookup without warnings.
_LOADED: dict[str, tuple] = {}


def _load():
    if "C" not in _LOADED:
        import torch  # noqa: F401  (loads libc10/libtorch that _C links against)

        try:
            from . import _C  # type: ignore[attr-defined]

            _LOADED["C"] = (_C, "")
        except ImportError as e:
            _LOADED["C"] = (None, f"the extension rspeft_fast._C is not built or failed to load ({e}); {REBUILD}")
    return _LOADED["C"]


def extension():
    """The loaded extension module, or raise ImportError saying how to build it."""
    mod, why = _load()
    if mod is None:
        raise ImportError(why)
    return mod


def has(kind: str) -> tuple[bool, str]:
    """(does the extension have ``kind`` ("cpu" or "cuda") kernels, reason if not)."""
    mod, why = _load()
    if mod is None:
        return False, why
    if kind == "cuda":
        if not getattr(mod, "with_cuda", lambda: False)():
            return False, f"rspeft_fast._C was built without CUDA sources; {REBUILD} where nvcc and a CUDA torch exist"
        import torch

        if not torch.cuda.is_available():
            return False, "no CUDA device is available"
    return True, ""
