"""Module constructors reject bad sizes with one line that names the module and the argument (never a torch
internal, never a silent int() truncation)."""
from __future__ import annotations

import numpy as np
import pytest

from rspeft_fast.modules.mufa import MuFAAdapter
from rspeft_fast.modules.qlinear import EQAM, QLinear


@pytest.mark.parametrize("make, message", [
    (lambda: MuFAAdapter(64, rates=16), "MuFAAdapter: rates must be a non-empty sequence of positive ints, e.g. (8, 16, 32), got 16"),
    (lambda: MuFAAdapter(64, rates="8,16"), "MuFAAdapter: rates must be a non-empty sequence of positive ints, e.g. (8, 16, 32), got '8,16'"),
    (lambda: MuFAAdapter(64, rates=()), "MuFAAdapter: rates must be a non-empty sequence of positive ints, e.g. (8, 16, 32), got ()"),
    (lambda: MuFAAdapter(64, rates=(8, 8.7)), "MuFAAdapter: rates[1] must be a positive int, got 8.7"),
    (lambda: MuFAAdapter(64, rates=(0,)), "MuFAAdapter: rates[0] must be a positive int, got 0"),
    (lambda: MuFAAdapter(64.9), "MuFAAdapter: dim must be a positive int, got 64.9"),
    (lambda: MuFAAdapter(-64), "MuFAAdapter: dim must be a positive int, got -64"),
    (lambda: MuFAAdapter(True), "MuFAAdapter: dim must be a positive int, got True"),
    (lambda: MuFAAdapter(100, rates=(8,)), "MuFAAdapter: dim=100 is not divisible by rate 8 (rates=(8,))"),
    (lambda: MuFAAdapter(64, scale="x"), "MuFAAdapter: scale must be a number, got 'x'"),
    (lambda: EQAM(0), "EQAM: dim must be a positive int, got 0"),
    (lambda: EQAM(64, hidden=2.5), "EQAM: hidden must be a positive int, got 2.5"),
    (lambda: EQAM(64, hidden=0), "EQAM: hidden must be a positive int, got 0"),
    (lambda: EQAM(64, reduction=2.5), "EQAM: reduction must be a positive int, got 2.5"),
    (lambda: EQAM(64, reduction=5), "EQAM: dim=64 is not divisible by reduction=5"),
    (lambda: QLinear(0, 4), "QLinear: in_features must be a positive int, got 0"),
    (lambda: QLinear(4, 4.5), "QLinear: out_features must be a positive int, got 4.5"),
])
def test_bad_sizes_raise_one_line_naming_the_argument(make, message):
    with pytest.raises(ValueError) as e:
        make()
    assert str(e.value) == message


def test_integer_sizes_of_any_integer_type_are_accepted():
    m = MuFAAdapter(np.int64(64), rates=[8, np.int32(16)])
    assert m.dim == 64 and m.rates == (8, 16) and m.sizes == (8, 4) and type(m.dim) is int
    assert EQAM(64).hidden == 16 and EQAM(64, reduction=4).hidden == 16 and EQAM(np.int64(32), hidden=np.int16(8)).hidden == 8
    q = QLinear(np.int64(8), 4)
    assert (q.in_features, q.out_features) == (8, 4) and type(q.in_features) is int
