"""Triton helpers shared by the kernels of every op (exact erf GELU and its derivative).

Written for triton >= 3.6 (torch 2.11's; CI's interpreter runs 3.8; the AOT matrix compiles under 3.6, 3.8 and 3.9):
no newer APIs. The launch / numerics policy of every kernel file is ``kernels/_launch.py``.
"""
import triton
import triton.language as tl

_INV_SQRT2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def gelu(x):
    """Exact GELU ``x * Φ(x)`` in float32."""
    return 0.5 * x * (1.0 + tl.math.erf(x * _INV_SQRT2))


@triton.jit
def gelu_grad(x):
    """d GELU / dx = Φ(x) + x φ(x), in float32."""
    cdf = 0.5 * (1.0 + tl.math.erf(x * _INV_SQRT2))
    pdf = tl.exp(-0.5 * x * x) * _INV_SQRT_2PI
    return cdf + x * pdf
