"""Adapter weights on disk: only the trainable tensors, in safetensors, with the config in the metadata.

``save_adapters(model, path)`` writes the tensors that injection made trainable (adapters, and the
head / biases / norms where the method tunes them) under their parameter names, plus
``rspeft_fast.config`` (the method and its options as JSON) in the file's metadata.

``load_adapters(model, path)`` reads them back. On a fresh, un-injected model it first re-injects from
the stored config; on an injected model the stored config must match the model's. Everything (config,
names, shapes) is checked before any tensor is copied, so a failed load leaves the model as it was.
"""
from __future__ import annotations

import copy
import itertools
import os
from typing import Optional

import torch
from torch import nn

from .config import AdapterConfig
from .inject import CONFIG_ATTR, inject, model_family

__all__ = ["save_adapters", "load_adapters", "read_adapter_config"]

META_CONFIG = "rspeft_fast.config"
META_VERSION = "rspeft_fast.version"
META_FAMILY = "rspeft_fast.family"


def _config_of(model: nn.Module, what: str) -> AdapterConfig:
    cfg = getattr(model, CONFIG_ATTR, None)
    if cfg is None:
        merged = getattr(model, "rspeft_merged", None)
        if merged is not None:
            raise RuntimeError(f"{what}: the adapters of this model were merged into its weights; nothing to {what.split('_')[0]}")
        raise RuntimeError(f"{what}: the model has no injected adapters (call rspeft_fast.inject first)")
    return cfg


def save_adapters(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the trainable adapter tensors of ``model`` and its config to ``path`` (safetensors)."""
    from safetensors.torch import save_file

    from .. import __version__

    cfg = _config_of(model, "save_adapters")
    params = dict(model.named_parameters())
    missing = [n for n in model.rspeft_trainable if n not in params]
    if missing:
        raise RuntimeError(f"save_adapters: parameters recorded at injection are gone: {missing[:5]}")
    tensors = {n: params[n].detach().to("cpu").contiguous() for n in model.rspeft_trainable}
    meta = {META_CONFIG: cfg.to_json(), META_VERSION: __version__, META_FAMILY: model_family(model)}
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written adapter file


def read_adapter_config(path: str | os.PathLike) -> AdapterConfig:
    """The config stored in an adapter file."""
    return _read_meta(path)[0]


def _read_meta(path):
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            meta = f.metadata() or {}
            keys = list(f.keys())
    except (OSError, ValueError):
        raise
    except Exception as e:  # safetensors' own error type: truncated, empty or non-safetensors files
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    if META_CONFIG not in meta:
        raise ValueError(f"{path}: not an rspeft_fast adapter file (no {META_CONFIG!r} in its metadata)")
    return AdapterConfig.from_json(meta[META_CONFIG]), meta, keys


def _meta_copy(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` whose tensors live on the meta device (costs no memory)."""
    memo = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        if isinstance(t, nn.Parameter):
            memo[id(t)] = nn.Parameter(torch.empty_like(t, device="meta"), requires_grad=t.requires_grad)
        else:
            memo[id(t)] = torch.empty_like(t, device="meta")
    return copy.deepcopy(model, memo)


def load_adapters(model: nn.Module, path: str | os.PathLike, impl: Optional[object] = None) -> nn.Module:
    """Load adapter weights from ``path`` into ``model`` (re-injecting from the stored config when the
    model has no adapters yet). ``impl`` overrides the stored kernel switch. Returns the model."""
    from safetensors.torch import load_file

    cfg, meta, keys = _read_meta(path)
    if impl is not None:
        cfg = cfg.replace(impl=impl)
    current = getattr(model, CONFIG_ATTR, None)
    if current is not None:
        a, b = current.identity(), cfg.identity()
        if a != b:
            diff = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
            raise ValueError(
                f"load_adapters: {path} holds adapters for a different configuration; differing fields "
                f"(model, file): {diff}"
            )
        plan = model
    else:
        plan = _meta_copy(model)
        try:
            inject(plan, cfg)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"load_adapters: the adapters in {path} ({cfg.to_dict()['method']}) cannot be injected into this model: {e}") from e

    want = {n: p for n, p in plan.named_parameters() if n in set(plan.rspeft_trainable)}
    try:
        tensors = load_file(os.fspath(path), device="cpu")
    except Exception as e:
        raise ValueError(f"load_adapters: cannot read the tensors of {path} ({type(e).__name__}: {e}); nothing was loaded") from e
    problems = []
    missing = sorted(set(want) - set(tensors))
    extra = sorted(set(tensors) - set(want))
    if missing:
        problems.append(f"missing from the file: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if extra:
        problems.append(f"not in the model: {extra[:8]}{' ...' if len(extra) > 8 else ''}")
    for n in sorted(set(want) & set(tensors)):
        if tuple(want[n].shape) != tuple(tensors[n].shape):
            problems.append(f"{n}: shape {tuple(tensors[n].shape)} in the file, {tuple(want[n].shape)} in the model")
        elif not tensors[n].is_floating_point() and want[n].is_floating_point():
            problems.append(f"{n}: dtype {tensors[n].dtype} in the file, {want[n].dtype} in the model")
    if problems:
        raise ValueError(
            f"load_adapters: {path} ({cfg.to_dict()['method']}) does not fit this model; nothing was loaded:\n  "
            + "\n  ".join(problems[:20])
        )

    if current is None:
        inject(model, cfg)
    params = dict(model.named_parameters())
    backup = {n: params[n].detach().clone() for n in tensors} if current is not None else None
    done = []
    with torch.no_grad():
        try:
            for n, t in tensors.items():
                params[n].copy_(t)
                done.append(n)
        except BaseException:
            if backup is not None:  # all or nothing: restore the tensors already overwritten
                for n in done + [n for n in tensors if n not in done][:1]:
                    params[n].copy_(backup[n])
            raise
    return model
