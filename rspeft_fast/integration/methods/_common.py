"""What the injectors share: where a family's blocks are, and how an adapter is put on one of them."""
from __future__ import annotations

from torch import nn

from .. import _blocks
from ..families import Family


def dd(module: nn.Module) -> dict:
    """``{"device", "dtype"}`` of ``module``'s first parameter (for the adapters made beside it)."""
    p = next(module.parameters())
    return {"device": p.device, "dtype": p.dtype}


def check_free(module: nn.Module, name: str, *attrs) -> None:
    for a in attrs:
        if hasattr(module, a):
            raise RuntimeError(f"{name}: the block already has an attribute {a!r}; cannot inject")


def blocks_of(model: nn.Module, fam: Family) -> list:
    """The ``(name, block)`` pairs of the family's block classes; a subclass the family does not declare is
    refused (its forward may differ)."""
    want = fam.block_classes()
    if not want:
        raise TypeError(f"{fam.label}: no block classes declared (or the library that defines them is missing)")
    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, want)]
    for n, m in blocks:
        if type(m) not in want:
            raise TypeError(
                f"{n}: block class {type(m).__name__} is a subclass of {', '.join(c.__name__ for c in want)} that "
                "rspeft_fast does not know; its forward may differ, so no adapter was injected"
            )
    if not blocks:
        raise TypeError(f"no {', '.join(c.__name__ for c in want)} blocks found in the model")
    return blocks


def attach(fam: Family, name: str, blk: nn.Module, adapter: nn.Module, kind: str, gate=None, ctx=None) -> str:
    """Put ``adapter`` on block ``blk`` by the family's protocol (``kind``: ``"parallel" | "serial" | "mga" |
    "eqam"``, see ``_blocks``); returns the name of the adapted module. The adapter, its gate and switches live on
    the block whether the block's class is swapped or its MLP is wrapped."""
    check_free(blk, name, "adapter", "adapter_gate")
    if fam.swap_block:
        swapped = _blocks.ADAPTED_BLOCKS.get(type(blk))
        if swapped is None:
            raise TypeError(f"{name}: no adapted forward for {type(blk).__name__}")
        blk.__class__ = swapped
        if _blocks.ClipBlock is not None and swapped is _blocks.AdaptedClipBlock:
            blk.adapter_seq_first = not blk.attn.batch_first
    else:
        _blocks.wrap_mlp(getattr(blk, fam.mlp), blk)
    blk.adapter = adapter
    blk.adapter_kind = kind
    if gate is not None:
        blk.adapter_gate = gate
    if ctx is not None:
        blk.adapter_text_ctx = ctx
    blk.adapter_enabled = True
    return name


def unfreeze(model: nn.Module, target, pred, what: str) -> list:
    """Make trainable every parameter ``pn`` of a selected module ``mod`` (named ``mname``) with
    ``pred(mname, mod, pn)``; returns the names of the modules touched. ``ValueError`` when there is none."""
    n, names = 0, []
    for mname, mod in model.named_modules():
        if not target.selects(mname):
            continue
        hit = False
        for pn, p in mod.named_parameters(recurse=False):
            if pred(mname, mod, pn):
                p.requires_grad_(True)
                n += 1
                hit = True
        if hit:
            names.append(mname)
    if n == 0:
        raise ValueError(f"no {what} parameters found" + (f" in modules selected by target={target.spec!r}" if target.spec is not None else ""))
    return names
