"""QLinear and EQAM (UPetu): linear layers with a fake-quantised weight, and the adapter built of them.

Training: a :class:`QLinear` keeps a float master ``weight`` and quantises it on the fly (SPEC §1); gradients
use the straight-through estimator. Inference: :meth:`QLinear.pack` (or :func:`pack_adapters` on a whole
model) replaces the master weight by integer codes and per-row scales:

* ``qweight``: int8 ``(out, in)`` for ``bits > 4``; uint8 ``(out, ceil(in/2))`` holding two int4 codes
  per byte for ``bits <= 4`` (low nibble = even column; odd ``in`` padded);
* ``scale``: float32 ``(out,)``; ``bias`` stays a float parameter (frozen).

Both are registered buffers, so ``state_dict()`` (``torch.save`` / safetensors) carries the packed form:
about 4× (int8) / 8× (int4) smaller than float32. Loading a packed state_dict into a fresh (unpacked) module
converts the module to the packed layout first (a ``_load_from_state_dict`` hook keyed on ``qweight``), and
loading a float state_dict into a packed module turns it back into a trainable one; so
``QLinear(...).load_state_dict(packed_sd)`` and ``EQAM(...).load_state_dict(packed_sd)`` just work.
:meth:`QLinear.from_packed` builds one straight from tensors.

A packed layer is inference-only: its forward raises if grad mode is on and the input requires grad
(use ``torch.no_grad()``/``torch.inference_mode()``, or :meth:`QLinear.unpack` to train again from the
dequantised weight). Its output equals the fake-quant output of the weight it was packed from (same
``Wq``; up to float rounding of the matmul). ``impl``: ``"triton"`` dequantises inside the matmul kernel;
``"reference"`` (what ``"auto"`` gives on CPU) dequantises eagerly and calls ``F.linear``.
"""
from __future__ import annotations

import torch
from torch import nn

from .._impl import impl_property
from .._validate import check_positive_int
from ..ops.qlinear import PackedLinear, eqam, eqam_packed, qlinear, qlinear_packed
from ..reference.qlinear import check_bits
from ..reference.qlinear_pack import dequantize, pack_weight, storage_dtype

__all__ = ["QLinear", "EQAM", "pack_adapters"]


class QLinear(nn.Module):
    """Linear layer whose forward uses the per-row symmetric ``bits``-bit quantisation of its weight.

    Keeps a float master ``weight (out, in)`` and ``bias (out,)``; the forward computes
    ``y = x Wqᵀ + bias`` (SPEC §1), the backward is the straight-through estimator.
    ``x (..., in)`` → ``(..., out)``. ``impl``: ``"auto" | "reference" | "triton"``.
    After :meth:`pack`: buffers ``qweight``/``scale`` instead of ``weight``, inference only (module docstring).
    """

    impl = impl_property("qlinear")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 8, impl: str = "auto"):
        super().__init__()
        self.in_features = check_positive_int("QLinear", "in_features", in_features)
        self.out_features = check_positive_int("QLinear", "out_features", out_features)
        self.bits = check_bits(bits)
        self.impl = impl
        self.packed = False
        self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features))
        self.bias = nn.Parameter(torch.empty(self.out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.packed:
            raise RuntimeError("QLinear.reset_parameters: the layer is packed; call .unpack() first")
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            self.weight.copy_(lin.weight)
            if self.bias is not None:
                self.bias.copy_(lin.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"bits={self.bits}, impl={self.impl!r}" + (", packed=True" if self.packed else "")
        )

    def __getattr__(self, name: str):
        if name == "weight" and self.__dict__.get("packed", False):
            raise AttributeError(
                "QLinear is packed: its float master weight was replaced by `qweight`/`scale`; "
                "use .dequantize_weight() for the quantised weight, or .unpack() to train again"
            )
        return super().__getattr__(name)

    # ------------------------------------------------------------------ packing

    def _to_packed_layout(self, qweight: torch.Tensor, scale: torch.Tensor) -> None:
        self._parameters.pop("weight", None)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.packed = True

    def _to_float_layout(self, weight: torch.Tensor) -> None:
        self._buffers.pop("qweight", None)
        self._buffers.pop("scale", None)
        self.packed = False
        self.weight = nn.Parameter(weight)
        if self.bias is not None:
            self.bias.requires_grad_(True)

    @torch.no_grad()
    def pack(self) -> "QLinear":
        """Replace the float master weight by packed integer codes and per-row scales (in place; idempotent)."""
        if not self.packed:
            qweight, scale = pack_weight(self.weight, self.bits)
            self._to_packed_layout(qweight, scale)
        return self

    @torch.no_grad()
    def unpack(self) -> "QLinear":
        """Back to a trainable layer whose master weight is the dequantised weight ``Wq`` (float32)."""
        if self.packed:
            self._to_float_layout(self.dequantize_weight())
        return self

    def dequantize_weight(self) -> torch.Tensor:
        """``Wq (out, in)`` float32 (from the packed codes, or fake-quantised from the master weight)."""
        if self.packed:
            return dequantize(self.qweight, self.scale, self.in_features)
        from ..reference.qlinear import quantize_weight

        q, s = quantize_weight(self.weight, self.bits)
        return q * s[:, None]

    @classmethod
    def from_packed(cls, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, in_features: int, bits: int, impl: str = "auto") -> "QLinear":
        """A packed QLinear built from its stored tensors (``qweight`` int8, or uint8 for ``bits <= 4``)."""
        check_bits(bits)
        if qweight.dtype != storage_dtype(bits):
            raise TypeError(f"bits={bits} is stored as {storage_dtype(bits)}, got qweight of dtype {qweight.dtype}")
        m = cls(in_features, qweight.shape[0], bias=bias is not None, bits=bits, impl=impl)
        m._to_packed_layout(torch.empty_like(qweight), torch.empty_like(scale, dtype=torch.float32))
        sd = {"qweight": qweight, "scale": scale}
        if bias is not None:
            sd["bias"] = bias
        m.load_state_dict(sd)
        return m.to(qweight.device)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        q = state_dict.get(prefix + "qweight")
        if q is not None and not self.packed:
            want = storage_dtype(self.bits)
            if q.dtype != want:
                error_msgs.append(
                    f"{prefix}qweight: a packed QLinear with bits={self.bits} stores {want} codes, the state_dict has "
                    f"{q.dtype} (built with bits {'<= 4' if q.dtype == torch.uint8 else '> 4'}?)"
                )
                return
            dev = self.bias.device if self.bias is not None else self.weight.device
            self._to_packed_layout(torch.empty_like(q, device=dev), torch.empty(self.out_features, device=dev))
        elif q is not None and q.dtype != self.qweight.dtype:
            error_msgs.append(f"{prefix}qweight: this packed QLinear stores {self.qweight.dtype} codes, the state_dict has {q.dtype}")
            return
        elif q is None and prefix + "weight" in state_dict and self.packed:
            dev = self.qweight.device
            self._to_float_layout(torch.empty(self.out_features, self.in_features, device=dev))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    # ------------------------------------------------------------------ forward

    def packed_form(self) -> PackedLinear:
        """``(qweight, scale, bias, in_features)`` of a packed layer (what the packed ops take)."""
        if not self.packed:
            raise RuntimeError("QLinear.packed_form: the layer is not packed; call .pack() first")
        return PackedLinear(self.qweight, self.scale, self.bias, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            _check_inference("QLinear", x)
            return qlinear_packed(x, *self.packed_form(), impl=self.impl)
        return qlinear(x, self.weight, self.bias, self.bits, impl=self.impl)


def _check_inference(name: str, x: torch.Tensor) -> None:
    if torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.requires_grad:
        raise RuntimeError(
            f"{name} is packed (inference-only): run it under torch.no_grad()/torch.inference_mode() with an "
            "input that does not require grad, or call .unpack() to train again"
        )


class EQAM(nn.Module):
    """UPetu's efficient quantisation adapter: ``delta = QLinear_up(GELU(QLinear_down(x)))``.

    ``down: dim → hidden``, ``up: hidden → dim`` (zero-initialised, so the adapter starts as the identity of
    the backbone). ``hidden`` defaults to 16 (:data:`DEFAULT_HIDDEN`), UPetu's budget (SPEC §1: 0.73 % of
    ConvNeXt-B's parameters with CAPM); ``reduction=r`` gives the width ``dim // r`` instead (``reduction=4``:
    eight times that budget). ``x (..., dim)`` (channels-last) → delta ``(..., dim)``.
    ``impl="triton"``: one fused bottleneck launch (training) / one dequantise-and-bottleneck launch
    (after :meth:`pack`); ``impl`` is validated here and passed to :func:`rspeft_fast.ops.qlinear.eqam`.
    """

    DEFAULT_HIDDEN = 16
    impl = impl_property("eqam")

    def __init__(self, dim: int, hidden: int | None = None, bits: int = 8, impl: str = "auto",
                 reduction: int | None = None):
        super().__init__()
        self.dim = check_positive_int("EQAM", "dim", dim)
        if hidden is not None and reduction is not None:
            raise ValueError(f"EQAM: give hidden={hidden} or reduction={reduction}, not both")
        if reduction is not None:
            reduction = check_positive_int("EQAM", "reduction", reduction)
            if self.dim % reduction:
                raise ValueError(f"EQAM: dim={dim} is not divisible by reduction={reduction}")
            hidden = self.dim // reduction
        hidden = self.DEFAULT_HIDDEN if hidden is None else hidden
        self.reduction = reduction
        self.hidden = check_positive_int("EQAM", "hidden", hidden)
        self.bits = check_bits(bits)
        self.impl = impl
        self.down = QLinear(self.dim, self.hidden, bits=bits, impl=impl)
        self.up = QLinear(self.hidden, self.dim, bits=bits, impl=impl)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    @property
    def packed(self) -> bool:
        return self.down.packed and self.up.packed

    def pack(self) -> "EQAM":
        self.down.pack()
        self.up.pack()
        return self

    def unpack(self) -> "EQAM":
        self.down.unpack()
        self.up.unpack()
        return self

    def extra_repr(self) -> str:
        red = "" if self.reduction is None else f", reduction={self.reduction}"
        return f"dim={self.dim}, hidden={self.hidden}{red}, bits={self.bits}, impl={self.impl!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down.packed or self.up.packed:
            if not self.packed:
                raise RuntimeError("EQAM: only one of down/up is packed; call .pack() (or .unpack()) on the whole adapter")
            _check_inference("EQAM", x)
            return eqam_packed(x, self.down.packed_form(), self.up.packed_form(), impl=self.impl)
        return eqam(x, self.down.weight, self.down.bias, self.up.weight, self.up.bias, self.bits, impl=self.impl)


@torch.no_grad()
def pack_adapters(model: nn.Module) -> nn.Module:
    """Pack every :class:`QLinear` in ``model`` (EQAM adapters included) for inference, in place; returns ``model``.

    Call it after training (and before saving, so the state_dict holds the packed form), or on a fresh
    model before loading a packed state_dict (loading also converts on its own, see the module docstring).
    """
    for m in model.modules():
        if isinstance(m, QLinear):
            m.pack()
    return model
