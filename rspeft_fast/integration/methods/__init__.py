"""One module per method family, each registering its methods in :data:`..registry.REGISTRY` at import.

Every module here whose name does not start with ``_`` is imported (in name order) when
:mod:`rspeft_fast.integration` is: dropping a file in this folder registers its methods.
"""
from __future__ import annotations

import importlib
import pkgutil

for _m in sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")):
    importlib.import_module(f"{__name__}.{_m}")
