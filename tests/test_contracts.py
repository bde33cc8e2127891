"""Cross-op contracts: the implementation choice (``rspeft_fast._impl``), ``impl=`` validation of every module
and functional, and the input contract every implementation shares."""
from __future__ import annotations

import warnings

import pytest
import torch

from rspeft_fast import _impl
from rspeft_fast._impl import ImplUnavailableError, check_impl, resolve_impl


# ----------------------------------------------------------------------------- resolve_impl(limits=)
def test_limits_auto_warns_once_per_op_and_reason(monkeypatch):
    monkeypatch.setattr(_impl, "_WARNED", set())
    monkeypatch.setattr(_impl, "available", lambda name, device: (True, ""))
    calls = []

    def too_wide():
        calls.append(1)
        return "R=512 > 256 (bottleneck too wide for one tile)"

    with pytest.warns(UserWarning, match="R=512 > 256") as rec:
        assert resolve_impl("opA", "auto", "cuda", ("triton",), limits=too_wide) == "reference"
        assert resolve_impl("opA", "auto", "cuda", ("triton",), limits=too_wide) == "reference"
        assert resolve_impl("opB", "auto", "cuda", ("triton",), limits=too_wide) == "reference"
    assert len(rec) == 2, [str(w.message) for w in rec]  # once for opA, once for opB
    assert all("opA" in str(rec[0].message) or "opB" in str(w.message) for w in rec)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_impl("opA", "auto", "cuda", ("triton",), limits=lambda: None) == "triton"
    assert len(calls) == 3


def test_limits_explicit_raises_before_launch(monkeypatch):
    monkeypatch.setattr(_impl, "available", lambda name, device: (True, ""))
    with pytest.raises(ImplUnavailableError, match="shared memory 240000 B > 232448 B"):
        resolve_impl("opC", "triton", "cuda", ("triton",), limits=lambda: "shared memory 240000 B > 232448 B")
    # reference never asks the limits
    assert resolve_impl("opC", "reference", "cuda", ("triton",), limits=lambda: 1 / 0) == "reference"


def test_limits_not_consulted_when_the_implementation_cannot_run(monkeypatch):
    monkeypatch.setattr(_impl, "available", lambda name, device: (False, "no CUDA"))
    assert resolve_impl("opD", "auto", "cuda", ("triton",), limits=lambda: 1 / 0) == "reference"
    with pytest.raises(ImplUnavailableError, match="no CUDA"):
        resolve_impl("opD", "triton", "cuda", ("triton",), limits=lambda: 1 / 0)


def test_check_impl_lists_the_choices():
    assert check_impl("mufa", "triton") == "triton"
    with pytest.raises(ValueError, match=r"impl='tritn' is not one of \('auto', 'reference', 'triton'\)"):
        check_impl("mufa", "tritn")
    with pytest.raises(ValueError, match="'cuda', 'cpu'"):
        check_impl("weighted_triplet_loss", "triton")
    with pytest.raises(ValueError, match="not one of"):
        check_impl("mufa", None)
