"""Adapter weights on disk: only the trainable tensors, in safetensors, with the config in the metadata.

``save_adapters(model, path)`` writes every tensor that is trainable: those injection made trainable
(adapters, and the head / biases / norms where the method tunes them) **and** any parameter that requires
grad now (e.g. ``vit.norm`` or ``clip.logit_scale`` unfrozen by hand after injection; HF peft's
``modules_to_save``), plus the modules or parameters named in ``extra=``; with them the persistent buffers of
every module that owns one of those parameters (a tuned BatchNorm's running statistics: peft's
``modules_to_save`` keeps the whole module); under ``full`` the whole state dict. Under their state-dict names,
with ``rspeft_fast.config`` (the method and its options as JSON), the model's family, the list of those extra
parameters and a SHA-256 of the tensors in the file's metadata. Nothing trainable is silently dropped. After :func:`~rspeft_fast.pack_adapters` the packed
Q-Linear layers are saved in their packed form (``qweight`` / ``scale`` buffers). After
:func:`~rspeft_fast.merge_adapters` there are no adapter tensors left: the error says what to do instead.

``load_adapters(model, path)`` reads them back. On a fresh, un-injected model it first re-injects from
the stored config; on an injected model the stored config must match the model's. A timm classifier
whose head has another number of classes than the file's is refused unless ``replace_head=True``.
Everything (the metadata, the family, names, shapes, the head, the checksum and that every float is finite) is
checked before any tensor is copied, so a failed load leaves the model as it was; every error names the file. The file is written atomically (``rspeft_fast._fileio.atomic_write``).
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
from typing import Iterable, Optional

import torch
from torch import nn

from .._fileio import atomic_write
from ..modules.qlinear import QLinear
from ..reference.qlinear_pack import storage_dtype
from .config import AdapterConfig
from .inject import CONFIG_ATTR, adapter_names, inject, injected_config, model_family, set_adapter

__all__ = ["save_adapters", "load_adapters", "read_adapter_config", "trainable_state_dict"]

META_CONFIG = "rspeft_fast.config"
META_VERSION = "rspeft_fast.version"
META_FAMILY = "rspeft_fast.family"
META_EXTRA = "rspeft_fast.extra"  # JSON list: trainable parameters beyond those injection recorded
META_PACKED = "rspeft_fast.packed"  # JSON list: module names of QLinear layers saved packed
META_SHA256 = "rspeft_fast.sha256"  # hex SHA-256 of the tensors (names, dtypes, shapes, bytes; by name)


def _persistent_buffers(model: nn.Module, owners=None) -> dict:
    """``{state-dict name: buffer}`` of the persistent buffers of ``model``'s modules (only of the modules named in
    ``owners`` when given)."""
    out = {}
    for mname, mod in model.named_modules():
        if owners is not None and mname not in owners:
            continue
        for bname, b in mod._buffers.items():
            if b is not None and bname not in mod._non_persistent_buffers_set:
                out[f"{mname}.{bname}" if mname else bname] = b
    return out


def _state_of(model: nn.Module, param_names: Iterable[str], whole: bool) -> dict:
    """The persistent buffers saved beside ``param_names``: those of the modules that own one of them, or every one
    (``whole``: the ``full`` method saves the whole state dict)."""
    if whole:
        return _persistent_buffers(model)
    return _persistent_buffers(model, {n.rpartition(".")[0] for n in param_names})


def _find_config(model: nn.Module):
    for m in model.modules():  # the model, or the injected model inside a wrapper (DDP's .module, torch.compile's)
        cfg = getattr(m, CONFIG_ATTR, None)
        if cfg is not None:
            return cfg
    return None


def trainable_state_dict(model: nn.Module) -> dict:
    """``{state-dict name: tensor}`` of what training changes: every parameter that requires grad (detached: the
    same storage) and the persistent buffers of each module owning one (a tuned BatchNorm's running statistics);
    under ``full`` the whole state dict. ``model`` may be wrapped (DDP, torch.compile): the names are the
    wrapper's. A training checkpoint saves these (copied to the CPU) and, on resume, copies them back into the
    tensors this returns for the resumed model."""
    cfg = _find_config(model)
    if cfg is not None and cfg.to_dict()["method"] == "full":
        return model.state_dict()
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    return {**params, **_state_of(model, params, whole=False)}


def _sha256(tensors: dict) -> str:
    h = hashlib.sha256()
    for n in sorted(tensors):
        # a copy: .numpy() marks a storage non-resizable, and FSDP2 frees its unsharded parameters with resize_(0)
        t = tensors[n].detach().to("cpu", copy=True).contiguous()
        h.update(f"{n}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _names_of(model: nn.Module, extra: Iterable[str]) -> list[str]:
    """Parameter names of ``extra`` entries: a parameter name, or a module name (all its parameters)."""
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    out = []
    for e in extra:
        if e in params:
            out.append(e)
        elif e in modules and e != "":
            out += [f"{e}.{n}" for n, _ in modules[e].named_parameters()]
        else:
            raise ValueError(f"save_adapters: extra={e!r} names no parameter or module of the model")
    return out


def _packed_prefixes(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, QLinear) and m.packed]


def _layout_packed(model: nn.Module, prefixes: Iterable[str]) -> None:
    """Give the QLinear layers at ``prefixes`` the packed layout (storage only, values not computed: on a
    meta copy, or right before the file's codes are copied in)."""
    modules = dict(model.named_modules())
    for pre in prefixes:
        m = modules.get(pre)
        if not isinstance(m, QLinear):
            raise ValueError(f"the file holds a packed Q-Linear at {pre!r}, which is not a QLinear in this model")
        if m.packed:
            continue
        dev = m.weight.device
        cols = m.in_features if m.bits > 4 else (m.in_features + 1) // 2
        m._to_packed_layout(torch.empty(m.out_features, cols, dtype=storage_dtype(m.bits), device=dev),
                            torch.empty(m.out_features, dtype=torch.float32, device=dev))


def save_adapters(model: nn.Module, path: str | os.PathLike, extra: Iterable[str] = (),
                  adapter_name: Optional[str] = None) -> None:
    """Write the trainable tensors of ``model`` and its config to ``path`` (safetensors, atomically).

    Saved: what injection made trainable, every parameter that requires grad now, and the parameters of the
    modules / the parameters named in ``extra`` (HF peft's ``modules_to_save``); packed Q-Linear layers in
    their packed form. Raises RuntimeError on a model without adapters (or whose adapters were merged),
    saying what to do. ``adapter_name``: save that named adapter (default: the active one) under the model's
    usual names, so ``load_adapters`` into a fresh model reproduces it; the active adapter and every
    ``requires_grad`` flag are as before afterwards.
    """
    active = getattr(model, "rspeft_active", None)
    if adapter_name is not None and adapter_name != active:
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        set_adapter(model, adapter_name)
        try:
            _save(model, path, extra)
        finally:
            set_adapter(model, active)
            for n, p in model.named_parameters():
                if n in flags:
                    p.requires_grad_(flags[n])
        return
    _save(model, path, extra)


def _save(model: nn.Module, path, extra) -> None:
    from safetensors.torch import save

    from .. import __version__

    cfg = injected_config(
        model, "save_adapters",
        "merge_adapters folded this model's {method} adapters into its backbone weights, so no adapter tensors are "
        "left to save. Save the adapters before merging (save_adapters, then merge_adapters), or save the merged "
        "model whole (torch.save(model.state_dict(), path))")
    params = dict(model.named_parameters())
    packed = _packed_prefixes(model)
    packed_weights = {f"{p}.weight" for p in packed}
    recorded = list(model.rspeft_trainable)
    missing = [n for n in recorded if n not in params and n not in packed_weights]
    if missing:
        raise RuntimeError(f"save_adapters: parameters recorded at injection are gone: {missing[:5]}")
    extras = [n for n, p in params.items() if p.requires_grad and n not in recorded]
    extras += [n for n in _names_of(model, extra) if n not in recorded and n not in extras]
    tensors = {}
    for n in recorded + extras:
        if n in packed_weights:  # packed: the int codes and scales replace the master weight
            m = model.get_submodule(n.rsplit(".", 1)[0])
            tensors[n[: -len("weight")] + "qweight"] = m.qweight
            tensors[n[: -len("weight")] + "scale"] = m.scale
        else:
            tensors[n] = params[n]
    tensors.update(_state_of(model, [n for n in recorded + extras if n not in packed_weights], _is_full(cfg)))
    tensors = {n: t.detach().to("cpu", copy=True).contiguous() for n, t in tensors.items()}
    meta = {META_CONFIG: cfg.to_json(), META_VERSION: __version__, META_FAMILY: model_family(model),
            META_EXTRA: json.dumps(extras), META_PACKED: json.dumps(packed), META_SHA256: _sha256(tensors)}
    atomic_write(os.fspath(path), lambda f: f.write(save(tensors, metadata=meta)))


def _is_full(cfg: AdapterConfig) -> bool:
    return cfg.to_dict()["method"] == "full"


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
    try:
        cfg = AdapterConfig.from_json(meta[META_CONFIG])
        for k in (META_EXTRA, META_PACKED):
            if not isinstance(json.loads(meta.get(k, "[]")), list):
                raise ValueError(f"{k} is not a JSON list")
    except (ValueError, TypeError) as e:  # json.JSONDecodeError and OptionError are ValueErrors
        raise ValueError(f"{path}: the adapter file's metadata is broken ({type(e).__name__}: {e})") from None
    return cfg, meta, keys


def _meta_copy(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` whose tensors live on the meta device (costs no memory)."""
    memo = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        if isinstance(t, nn.Parameter):
            memo[id(t)] = nn.Parameter(torch.empty_like(t, device="meta"), requires_grad=t.requires_grad)
        else:
            memo[id(t)] = torch.empty_like(t, device="meta")
    return copy.deepcopy(model, memo)


def _tensors_wanted(model: nn.Module, extras: list[str]) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` a file must hold for ``model``: its recorded trainable parameters (packed Q-Linear
    layers as their ``qweight``/``scale`` buffers), ``extras`` and the buffers saved with them (:func:`_state_of`)."""
    params = dict(model.named_parameters())
    packed = {f"{p}.weight": model.get_submodule(p) for p in _packed_prefixes(model)}
    want = {}
    for n in list(model.rspeft_trainable) + [e for e in extras if e not in model.rspeft_trainable]:
        if n in packed:
            base = n[: -len("weight")]
            want[base + "qweight"], want[base + "scale"] = packed[n].qweight, packed[n].scale
        elif n in params:
            want[n] = params[n]
        else:
            want[n] = None  # reported as "not in the model"
    want.update(_state_of(model, [n for n, t in want.items() if t is not None and n in params],
                          _is_full(model.rspeft_config)))
    return want


def load_adapters(model: nn.Module, path: str | os.PathLike, impl: Optional[object] = None, *,
                  replace_head: bool = False, adapter_name: Optional[str] = None) -> nn.Module:
    """Load adapter weights from ``path`` into ``model`` (re-injecting from the stored config when the
    model has no adapters yet). ``impl`` overrides the stored kernel switch. A timm classifier whose head
    has another number of classes than the file's is refused unless ``replace_head=True`` (then the head
    is reset to the file's and loaded). Extra trainable parameters saved with the file are loaded and made
    trainable again; packed Q-Linear layers are packed in the model. ``adapter_name`` (named adapters, LoRA):
    load into the adapter of that name, made the active one (added beside the model's adapters when it has none of
    that name; on a fresh model, the first adapter gets that name). Returns the model."""
    from safetensors.torch import load_file

    cfg, meta, keys = _read_meta(path)
    extras = json.loads(meta.get(META_EXTRA, "[]"))
    packed = json.loads(meta.get(META_PACKED, "[]"))
    fam = model_family(model)
    if meta.get(META_FAMILY, fam) != fam:
        raise ValueError(f"load_adapters: {path} holds adapters for family {meta[META_FAMILY]}, the model is {fam} "
                         f"({type(model).__name__}); nothing was loaded")
    if impl is not None:
        cfg = cfg.replace(impl=impl)
    current = getattr(model, CONFIG_ATTR, None)
    if adapter_name is not None and current is not None and adapter_name in adapter_names(model):
        set_adapter(model, adapter_name)
        current = getattr(model, CONFIG_ATTR)
    adding = adapter_name is not None and current is not None and adapter_name not in adapter_names(model)
    if current is not None and not adding:
        a, b = current.identity(), cfg.identity()
        if a != b:
            diff = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
            raise ValueError(
                f"load_adapters: {path} holds adapters for a different configuration; differing fields "
                f"(model, file): {diff}"
            )
        plan = _meta_copy(model) if packed else model  # the packed layout is checked on a copy first
    else:
        have = getattr(model, "num_classes", None)
        if not adding and (cfg.num_classes is not None and isinstance(have, int) and have != cfg.num_classes
                and not replace_head):
            raise ValueError(
                f"load_adapters: {path} holds a {cfg.num_classes}-class head, this model's has {have} classes; "
                f"pass replace_head=True to replace the model's head by the file's, or build the model with "
                f"num_classes={cfg.num_classes}")
        plan = _meta_copy(model)
        try:
            inject(plan, cfg, adapter_name=adapter_name)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"load_adapters: the adapters in {path} ({cfg.to_dict()['method']}) cannot be injected into this model: {e}") from e
    problems = []
    model_packed = set(_packed_prefixes(plan))
    if model_packed - set(packed):
        problems.append(f"the model's Q-Linear layers {sorted(model_packed - set(packed))[:4]} are packed and the file "
                        "holds their float weights: load into an unpacked model and pack_adapters after loading")
    else:
        try:
            _layout_packed(plan, packed)
        except ValueError as e:
            problems.append(str(e))
    want = _tensors_wanted(plan, extras) if not problems else {}
    try:
        tensors = load_file(os.fspath(path), device="cpu")
    except Exception as e:
        raise ValueError(f"load_adapters: cannot read the tensors of {path} ({type(e).__name__}: {e}); nothing was loaded") from e
    missing = sorted(n for n in set(want) - set(tensors))
    extra_in_file = sorted(n for n in set(tensors) - set(want))
    gone = sorted(n for n, t in want.items() if t is None)
    if missing and not problems:
        problems.append(f"missing from the file: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if (extra_in_file or gone) and not problems:
        problems.append(f"not in the model: {(gone + extra_in_file)[:8]}{' ...' if len(gone + extra_in_file) > 8 else ''}")
    for n in sorted(set(want) & set(tensors)):
        if want[n] is None:
            continue
        if tuple(want[n].shape) != tuple(tensors[n].shape):
            problems.append(f"{n}: shape {tuple(tensors[n].shape)} in the file, {tuple(want[n].shape)} in the model")
        elif tensors[n].is_floating_point() != want[n].is_floating_point() or (
                not want[n].is_floating_point() and tensors[n].dtype != want[n].dtype):
            problems.append(f"{n}: dtype {tensors[n].dtype} in the file, {want[n].dtype} in the model")
    if problems:
        raise ValueError(
            f"load_adapters: {path} ({cfg.to_dict()['method']}) does not fit this model; nothing was loaded:\n  "
            + "\n  ".join(problems[:20])
        )
    # the bytes last: a file edited by hand gets the message about what is missing or misshapen first
    if META_SHA256 in meta and _sha256(tensors) != meta[META_SHA256]:
        raise ValueError(f"load_adapters: {path} is corrupt: its tensors do not match the checksum written when it was "
                         "saved; nothing was loaded")
    bad = sorted(n for n, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if bad:
        raise ValueError(f"load_adapters: {path} holds non-finite values (NaN / inf) in {bad[:8]}"
                         f"{' ...' if len(bad) > 8 else ''}; nothing was loaded")

    if current is None or adding:
        inject(model, cfg, adapter_name=adapter_name)
    _layout_packed(model, packed)
    targets = _tensors_wanted(model, extras)
    backup = {n: targets[n].detach().clone() for n in tensors} if current is not None and not adding else None
    done = []
    with torch.no_grad():
        try:
            for n, t in tensors.items():
                targets[n].copy_(t)
                done.append(n)
        except BaseException:
            if backup is not None:  # all or nothing: restore the tensors already overwritten
                for n in done + [n for n in tensors if n not in done][:1]:
                    targets[n].copy_(backup[n])
            raise
    params = dict(model.named_parameters())
    for n in extras:  # trainable when saved: trainable again
        params[n].requires_grad_(True)
    return model
