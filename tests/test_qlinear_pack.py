"""Packed Q-Linear (inference): int8 / int4 storage, dequantise-in-the-matmul kernel, state_dict round trips."""
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rspeft_fast
from rspeft_fast import EQAM, QLinear, pack_adapters
from rspeft_fast.ops import qlinear as Q
from rspeft_fast.reference.qlinear import quantize_weight
from rspeft_fast.reference.qlinear_pack import dequantize, pack_int4, pack_weight, unpack_codes, unpack_int4
from rspeft_fast.testing import assert_close

BITS = list(range(2, 9))


def _randomise(module: nn.Module) -> nn.Module:
    """Random weights everywhere (EQAM's up projection starts at zero)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.2)
    return module


def _nbytes(sd) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())


# ----------------------------------------------------------------------------- int4 storage


@pytest.mark.parametrize("in_features", [1, 2, 13, 96])
def test_int4_pack_unpack_round_trip(in_features):
    codes = torch.randint(-8, 8, (7, in_features), dtype=torch.int8)
    codes[0, :2] = torch.tensor([-8, 7])[: in_features]  # both extremes
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (7, (in_features + 1) // 2)
    assert torch.equal(unpack_int4(packed, in_features), codes)
    if in_features % 2:
        assert torch.all(packed[:, -1] >> 4 == 0)  # padding nibble is a 0 code
    with pytest.raises(ValueError):
        pack_int4(torch.tensor([[8]]))


@pytest.mark.parametrize("bits", BITS)
def test_pack_weight_codes(bits):
    w = torch.randn(11, 13)
    q, s = quantize_weight(w, bits)
    qweight, scale = pack_weight(w, bits)
    assert qweight.dtype == (torch.uint8 if bits <= 4 else torch.int8)
    assert torch.equal(unpack_codes(qweight, 13).float(), q)
    assert torch.equal(scale, s)
    assert torch.equal(dequantize(qweight, scale, 13), q * s[:, None])


# ----------------------------------------------------------------------------- packed forward == fake-quant forward


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("din,dout", [(13, 96), (96, 13), (192, 37)])
@pytest.mark.parametrize("bits", BITS)
def test_packed_equals_fake_quant(bits, din, dout, impl, device):
    m = QLinear(din, dout, bits=bits, impl=impl).to(device)
    x = torch.randn(3, 37, din, device=device)
    with torch.no_grad():
        want = m(x)
        wq = m.dequantize_weight()
        m.pack()
        got = m(x)
    assert m.packed and "weight" not in dict(m.named_parameters())
    assert torch.equal(m.dequantize_weight(), wq)
    assert_close(got, want, atol=1e-6, rtol=1e-6, name="packed vs fake-quant")
    with torch.no_grad():  # and the unpacked layer (master weight = Wq) computes the same again
        assert_close(m.unpack()(x), want, atol=1e-6, rtol=1e-6, name="unpacked")


def test_packed_gelu_noncontiguous_and_autocast(device):
    m = QLinear(13, 40, bits=4, impl="triton").to(device).pack()
    x = torch.randn(5, 6, 13, device=device).transpose(0, 1)
    w = m.dequantize_weight()
    with torch.no_grad():
        y = Q.qlinear_packed(x, m.qweight, m.scale, m.bias, 13, gelu=True)
        assert_close(y, F.gelu(F.linear(x, w, m.bias)), name="packed GELU")
        with torch.autocast(device, dtype=torch.bfloat16):
            got = m(x)
            m.impl = "reference"
            want = m(x)
    assert got.dtype == want.dtype == torch.bfloat16
    assert_close(got, want, name="packed autocast bf16")


@pytest.mark.parametrize("bits", [3, 8])
@pytest.mark.parametrize("two_launch", [False, True])
def test_packed_eqam_equals_fake_quant(bits, two_launch, device, monkeypatch):
    if two_launch:
        monkeypatch.setattr(Q, "FUSED_MAX_RANK", 8)
    e = _randomise(EQAM(64, reduction=4, bits=bits, impl="triton").to(device))
    x = torch.randn(2, 9, 9, 64, device=device)
    with torch.no_grad():
        want = e(x)
        e.pack()
        got = e(x)
        e.impl = e.down.impl = e.up.impl = "reference"
        ref = e(x)
    assert e.packed
    assert_close(got, want, atol=1e-5, rtol=1e-5, name="packed EQAM")
    assert_close(ref, want, atol=1e-5, rtol=1e-5, name="packed EQAM reference")


# ----------------------------------------------------------------------------- storage size, save / load


@pytest.mark.parametrize("bits,ratio", [(8, 3.9), (5, 3.9), (4, 7.5), (2, 7.5)])
def test_state_dict_size_ratio(bits, ratio):
    e = EQAM(1024, reduction=4, bits=bits)
    before = _nbytes(e.state_dict())
    after = _nbytes(e.pack().state_dict())
    assert before / after >= ratio, (before, after)
    dtypes = {k: v.dtype for k, v in e.state_dict().items()}
    assert dtypes["down.qweight"] == (torch.uint8 if bits <= 4 else torch.int8)
    assert dtypes["down.scale"] == torch.float32 and "down.weight" not in dtypes


def _model(bits, impl="reference"):
    return nn.Sequential(nn.Linear(32, 32), EQAM(32, bits=bits, impl=impl), QLinear(32, 13, bits=bits, impl=impl))


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
@pytest.mark.parametrize("bits", [4, 8])
def test_save_load_round_trip(bits, fmt, tmp_path):
    torch.manual_seed(3)
    model = _randomise(_model(bits))
    x = torch.randn(6, 32)
    with torch.no_grad():
        want = model(x)
        pack_adapters(model)
        assert_close(model(x), want, atol=1e-5, rtol=1e-5, name="packed model")
    sd = model.state_dict()
    if fmt == "torch":
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        loaded = torch.load(buf)
    else:
        from safetensors.torch import load_file, save_file

        save_file(sd, str(tmp_path / "m.safetensors"))
        loaded = load_file(str(tmp_path / "m.safetensors"))
    assert all(loaded[k].dtype == v.dtype for k, v in sd.items())
    fresh = _model(bits)  # unpacked: loading a packed state_dict converts it
    fresh.load_state_dict(loaded)
    assert fresh[1].packed and fresh[2].packed
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), sd.values()))
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    # pack() before load works as well
    fresh2 = pack_adapters(_model(bits))
    fresh2.load_state_dict(loaded)
    with torch.no_grad():
        assert torch.equal(fresh2(x), model(x))


def test_load_float_state_into_packed_unpacks():
    src = _randomise(QLinear(13, 8, bits=5))
    dst = QLinear(13, 8, bits=5).pack()
    dst.load_state_dict(src.state_dict())
    assert not dst.packed and dst.weight.requires_grad and torch.equal(dst.weight, src.weight)


def test_load_mismatched_storage_raises():
    sd4 = QLinear(13, 8, bits=4).pack().state_dict()
    with pytest.raises(RuntimeError, match="bits=8"):
        QLinear(13, 8, bits=8).load_state_dict(sd4)
    with pytest.raises(RuntimeError, match="uint8"):
        QLinear(13, 8, bits=8).pack().load_state_dict(sd4)


def test_from_packed():
    src = _randomise(QLinear(13, 8, bits=3)).pack()
    m = QLinear.from_packed(src.qweight, src.scale, src.bias, in_features=13, bits=3, impl="reference")
    x = torch.randn(4, 13)
    with torch.no_grad():
        assert torch.equal(m(x), src(x))
    with pytest.raises(TypeError):
        QLinear.from_packed(src.qweight, src.scale, src.bias, in_features=13, bits=8)


# ----------------------------------------------------------------------------- inference only


def test_packed_is_inference_only(device):
    m = QLinear(16, 8, bits=4, impl="triton").to(device).pack()
    assert not m.bias.requires_grad
    x = torch.randn(3, 16, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference-only"):
        m(x)
    with pytest.raises(AttributeError, match="packed"):
        m.weight
    with pytest.raises(RuntimeError, match="inference-only"):
        EQAM(16, impl="triton").to(device).pack()(x)
    with torch.no_grad():
        m(x)  # fine under no_grad
    with torch.inference_mode():
        m(x.detach())
    e = EQAM(16)
    e.down.pack()
    with pytest.raises(RuntimeError, match="only one of"):
        e(torch.randn(2, 16))
    with pytest.raises(ValueError, match="last dimension"):
        with torch.no_grad():
            m(torch.randn(3, 15, device=device))


def test_packed_compile_no_graph_break(device):
    model = pack_adapters(_randomise(_model(4, impl="triton")).to(device))
    x = torch.randn(5, 32, device=device)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert_close(compiled(x), model(x), name="compiled packed model")


def test_public_name():
    assert rspeft_fast.pack_adapters is pack_adapters
