"""Builders shared by the op-level hardening tests (``test_hardening_ops.py``, ``test_properties.py``).

Each fused op is exercised through its nn.Module with *random* parameters (the modules zero-initialise
their ``up`` projections, which would hide most bugs), once with ``impl="triton"`` (``"cpu"`` for the
triplet loss's C++ kernel) and once with ``impl="reference"`` on the very same parameters.
"""
from __future__ import annotations

import contextlib
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from rspeft_fast.modules.mga import BiShareAdapter, MGAdapter
from rspeft_fast.modules.mufa import MuFAAdapter
from rspeft_fast.modules.qlinear import EQAM, QLinear
from rspeft_fast.modules.triplet import WeightedTripletLoss

OPS = ("mufa", "qlinear", "eqam", "mga", "triplet")


# ----------------------------------------------------------------------------------------- modules
@torch.no_grad()
def randomize(module: torch.nn.Module, scale: float = 1.0) -> torch.nn.Module:
    """Fresh random parameters of a sensible magnitude (weights ~ fan_in^-1/2, biases/gates O(0.3))."""
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            p.copy_(torch.randn_like(p) * scale * p.shape[-1] ** -0.5)
        elif "gate" in name:
            p.copy_(torch.rand_like(p) * 1.5 - 0.5)
        else:
            p.copy_(torch.randn_like(p) * 0.3 * scale)
    return module


def set_impl(module: torch.nn.Module, impl: str) -> None:
    for m in module.modules():
        if hasattr(m, "impl"):
            m.impl = impl


@contextlib.contextmanager
def impl_of(module: torch.nn.Module, impl: str):
    old = {m: m.impl for m in module.modules() if hasattr(m, "impl")}
    set_impl(module, impl)
    try:
        yield module
    finally:
        for m, v in old.items():
            m.impl = v


def make_mufa(d: int = 64, rates=(8, 16), scale: float = 1.0, dtype=torch.float32) -> MuFAAdapter:
    return randomize(MuFAAdapter(d, rates=rates, scale=scale, impl="triton")).to(dtype)


def make_qlinear(fin: int = 48, fout: int = 40, bits: int = 4, bias: bool = True, dtype=torch.float32) -> QLinear:
    return randomize(QLinear(fin, fout, bias=bias, bits=bits, impl="triton")).to(dtype)


def make_eqam(d: int = 64, reduction: int = 4, bits: int = 8, dtype=torch.float32) -> EQAM:
    return randomize(EQAM(d, reduction=reduction, bits=bits, impl="triton")).to(dtype)


def make_mga(dim: int = 48, hidden: int = 32, heads: int = 2, share: bool = True, share_heads: int = 1,
             dtype=torch.float32) -> MGAdapter:
    sh = BiShareAdapter(hidden, share_heads) if share else None
    m = MGAdapter(dim, hidden=hidden, heads=heads, share=sh, impl="triton")
    return randomize(m).to(dtype)


def triplet_fused_impl() -> str:
    """The fused triplet implementation on CPU: the C++ kernel of ``rspeft_fast._C`` (``impl="cpu"``)."""
    return "cpu"


def require_triplet_fused() -> str:
    """``"cpu"``, after checking the C++ extension is built: a missing or broken ``_C`` FAILS (never skips)."""
    from rspeft_fast import _native

    ok, why = _native.has("cpu")
    if not ok:
        pytest.fail(f"the C++ triplet kernel is unavailable: {why}", pytrace=False)
    return "cpu"


def make_triplet(max_violation: bool = False, margin: float = 0.2, gamma: float = 2.0) -> WeightedTripletLoss:
    return WeightedTripletLoss(margin=margin, gamma=gamma, max_violation=max_violation, impl=require_triplet_fused())


def make(op: str, dtype=torch.float32, **kw) -> torch.nn.Module:
    return {"mufa": make_mufa, "qlinear": make_qlinear, "eqam": make_eqam, "mga": make_mga,
            "triplet": lambda dtype=None, **k: make_triplet(**k)}[op](dtype=dtype, **kw)


def inputs(op: str, module: torch.nn.Module, rows: int, dtype=torch.float32, seq: int = 4) -> tuple:
    """Random inputs of ``rows`` rows (MGA: ``rows`` sequences of length ``seq``; triplet: a batch of ``rows``)."""
    if op == "mufa":
        return (torch.randn(rows, module.dim, dtype=dtype),)
    if op == "qlinear":
        return (torch.randn(rows, module.in_features, dtype=dtype),)
    if op == "eqam":
        return (torch.randn(rows, module.dim, dtype=dtype),)
    if op == "mga":
        return (torch.randn(rows, seq, module.dim, dtype=dtype),)
    if op == "triplet":
        img = F.normalize(torch.randn(rows, 16), dim=1).to(dtype)
        txt = F.normalize(torch.randn(rows, 16), dim=1).to(dtype)
        return img, txt
    raise KeyError(op)


# ----------------------------------------------------------------------------------------- running
def leaves_of(module: torch.nn.Module, xs) -> list[torch.Tensor]:
    return list(xs) + [p for p in module.parameters() if p.requires_grad]


def magnitude_close(actual, expected, atol: float, rtol: float, name: str):
    """Verbose allclose with ``atol`` scaled by the tensor's magnitude (sums over rows grow with N)."""
    from rspeft_fast.testing import assert_close

    assert actual is not None and expected is not None, f"{name}: missing ({actual is None}, {expected is None})"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    finite = expected.detach()[torch.isfinite(expected.detach())]
    mag = float(finite.abs().max()) if finite.numel() else 1.0
    assert_close(actual, expected, atol=atol * max(1.0, mag), rtol=rtol, name=name)


# ----------------------------------------------------------------------------- torch.distributed (gloo) tests
def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a test's process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gloo_group(rank: int, port: int, world: int):
    """Inside a spawned test worker: a gloo process group of ``world`` CPU ranks on ``port`` (one thread per
    rank, so the ranks don't fight over the cores), destroyed on exit."""
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- deterministic faults
def signal_at(phase: str, n: int = 1, sig=None):
    """An engine phase hook (``Settings.hooks``) raising ``sig`` (default SIGTERM) in this process when ``phase``
    ("step", "checkpoint", "eval", "final") begins for the ``n``-th time: interruptions at a named point, no race."""
    import signal

    sig = signal.SIGTERM if sig is None else sig
    seen = {"count": 0}

    def hook(name, state):
        if name == phase:
            seen["count"] += 1
            if seen["count"] == n:
                signal.raise_signal(sig)

    return hook


def tiny_clip(seed: int = 0):
    """A CPU-sized open_clip CLIP (two 64-wide layers per tower, 32-px images, 12-token context), seeded."""
    import open_clip

    torch.manual_seed(seed)
    return open_clip.CLIP(
        embed_dim=32,
        vision_cfg=dict(layers=2, width=64, patch_size=16, image_size=32, head_width=32),
        text_cfg=dict(context_length=12, vocab_size=500, width=64, heads=4, layers=2),
    )

