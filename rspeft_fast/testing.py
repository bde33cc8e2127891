"""Test helpers shipped with the package: the one tolerance rule, a forward/backward runner, a verbose allclose.

The rule (after flash-attention), :func:`assert_fused_close`: a fused result in a low dtype (fp16 / bf16 /
fp32) is compared with a float32/float64 reference ``ref`` computed on the same (rounded) inputs, and may
be off by at most ``factor`` times what the eager implementation in the *same* dtype gets wrong, plus a
floor of a few units in the last place of that dtype, relative to the reference's magnitude::

    max|fused - ref| <= factor * max|eager - ref| + floor_ulps * ulp(dtype) * max|ref|

Every kernel test states its accuracy this way; nothing else in the test suite re-implements it.
:func:`run_fwd_bwd` runs a function forward and backward on fresh leaves with a seeded random output
gradient, so the fused, the eager and the reference runs see the very same values.

**Reductions.** A result that is a sum (a gate's or a bias's gradient, a column sum, a weight gradient over
B·L rows) has a rounding error that scales with what was summed, ``Σ|terms|``, not with the (possibly
cancelled) result. For those, ``terms=`` gives :func:`assert_fused_close` the magnitude of the summed terms
per element, and the floor becomes ``floor_ulps * max(ulp(dtype) * max|ref|, ulp(acc) * terms)`` with
``acc`` the accumulation dtype (float32 for 16-bit and float32 results). :class:`AbsTerms` computes these
magnitudes for any reference computation, forward and backward, by evaluating every (multi)linear op a
second time on the magnitudes of its operands (``Σ|a||b|`` beside ``Σ ab``) — the classic a-priori bound
``|fl(s) - s| <= γ_n Σ|terms|``. A dropped term (``≈ Σ|terms| / n``) and a sum accumulated in bf16
(``≈ 2^-8 Σ|terms|``) both stay far above ``4 * 2^-23 * Σ|terms|``: the rule still rejects them.

``assert_close`` (elementwise ``atol + rtol*|expected|`` with a report), ``rel_err`` and the per-dtype
``TOLERANCES`` map stay for exact-algorithm comparisons (float64 kernels, packing round trips).
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import torch

__all__ = [
    "TOLERANCES",
    "tolerances",
    "ulp",
    "assert_close",
    "assert_fused_close",
    "fused_error_report",
    "AbsTerms",
    "run_fwd_bwd",
    "rel_err",
]

# (atol, rtol) per dtype, for comparing a kernel with the eager reference in that dtype.
TOLERANCES = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (2e-5, 2e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """``(atol, rtol)`` of :data:`TOLERANCES` for ``dtype``."""
    return TOLERANCES[dtype]


def ulp(dtype: torch.dtype) -> float:
    """One unit in the last place at 1.0 (machine epsilon) of a floating ``dtype``:
    bf16 2^-7, fp16 2^-10, fp32 2^-23, fp64 2^-52."""
    if not dtype.is_floating_point:
        raise TypeError(f"ulp: {dtype} is not a floating dtype")
    return float(torch.finfo(dtype).eps)


# --------------------------------------------------------------------------------- the fused rule
def _leaves(obj: Any, prefix: str) -> list[tuple[str, Any]]:
    """Flatten tensors / None in (nested) lists, tuples and dicts into ``[(name, leaf)]``."""
    if obj is None or isinstance(obj, torch.Tensor):
        return [(prefix, obj)]
    if isinstance(obj, Mapping):
        out = []
        for k in obj:
            out += _leaves(obj[k], f"{prefix}[{k!r}]")
        return out
    if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):
        out = []
        for i, v in enumerate(obj):
            out += _leaves(v, f"{prefix}[{i}]")
        return out
    raise TypeError(f"{prefix}: expected a tensor, None, or a list/tuple/dict of them, got {type(obj).__name__}")


def _structure(obj: Any) -> Any:
    if obj is None or isinstance(obj, torch.Tensor):
        return "T"
    if isinstance(obj, Mapping):
        return {k: _structure(v) for k, v in obj.items()}
    return [_structure(v) for v in obj]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a reduction producing ``dtype`` accumulates in: float32 for 16-bit and float32, else itself."""
    return torch.promote_types(dtype, torch.float32)


def fused_error_report(fused: torch.Tensor, eager: torch.Tensor, ref: torch.Tensor, *, factor: float = 2.0,
                       floor_ulps: float = 4, name: str = "", dtype: torch.dtype | None = None,
                       terms: torch.Tensor | None = None) -> tuple[bool, str]:
    """``(passes, one-line report)`` of the rule of :func:`assert_fused_close` for single tensors.

    ``terms``: for a reduction, ``Σ|terms|`` per element (shape of ``ref``, e.g. from :class:`AbsTerms`).
    """
    label = name or "tensor"
    if fused.shape != eager.shape or fused.shape != ref.shape:
        return False, (f"{label}: shapes differ: fused {tuple(fused.shape)}, eager {tuple(eager.shape)}, "
                       f"ref {tuple(ref.shape)}")
    if fused.dtype != eager.dtype:
        return False, f"{label}: fused dtype {fused.dtype} != eager dtype {eager.dtype} (must be the same low dtype)"
    if not fused.dtype.is_floating_point:
        ok = torch.equal(fused.cpu(), eager.cpu())
        return ok, f"{label}: non-floating {fused.dtype}: {'equal' if ok else 'fused != eager'}"
    f = fused.detach().double().cpu()
    e = eager.detach().double().cpu()
    r = ref.detach().double().cpu()
    # Non-finite values: the fused result must have them exactly where eager (same dtype) has them.
    nf_f, nf_e = ~torch.isfinite(f), ~torch.isfinite(e)
    if not torch.equal(nf_f, nf_e) or not torch.equal(f[nf_f].isnan(), e[nf_e].isnan()) or not torch.equal(
            f[nf_f & ~f.isnan()], e[nf_e & ~e.isnan()]):
        return False, (f"{label}: non-finite pattern differs from eager {fused.dtype}: fused has {int(nf_f.sum())} "
                       f"({int(f.isnan().sum())} NaN), eager {int(nf_e.sum())} ({int(e.isnan().sum())} NaN)")
    if terms is not None and tuple(terms.shape) != tuple(ref.shape):
        return False, f"{label}: terms shape {tuple(terms.shape)} != ref shape {tuple(ref.shape)}"
    keep = ~nf_f & torch.isfinite(r)
    if f.numel() == 0 or not keep.any():
        return True, f"{label}: {f.numel()} elements, nothing finite to compare"
    f, e, r = f[keep], e[keep], r[keep]
    err_f = (f - r).abs()
    err_e_max = float((e - r).abs().max())
    mag = float(r.abs().max())
    low = dtype or fused.dtype
    floor = floor_ulps * ulp(low) * mag
    if terms is None:
        bound = torch.full_like(err_f, factor * err_e_max + floor)
        floor_txt = f"{floor_ulps:g} ulp x max|ref| {mag:.3e}"
    else:  # a reduction: the floor scales with what was summed, element by element
        t = terms.detach().double().cpu()[keep].abs()
        red = floor_ulps * ulp(_acc_dtype(low)) * t
        bound = factor * err_e_max + torch.clamp(red, min=floor)
        floor_txt = (f"{floor_ulps:g} x max(ulp x max|ref| {mag:.3e}, ulp({_acc_dtype(low)}) x Σ|terms| "
                     f"[max {float(t.max()):.3e}])")
    worst = int(torch.argmax(err_f - bound))
    ok = bool((err_f <= bound).all())
    n_over = int((err_f > bound).sum())
    msg = (f"{label} ({fused.dtype}, {tuple(fused.shape)}): |fused-ref| {float(err_f[worst]):.3e} "
           f"{'<=' if ok else '>'} {factor:g} x max|eager-ref| {err_e_max:.3e} + {floor_txt} = "
           f"{float(bound[worst]):.3e} (worst element; max|fused-ref| {float(err_f.max()):.3e}); {n_over}/{f.numel()} "
           f"elements over; worst: fused {float(f[worst]):.6g}, eager {float(e[worst]):.6g}, ref {float(r[worst]):.6g}")
    return ok, msg


def assert_fused_close(fused: Any, eager: Any, ref: Any, *, factor: float = 2.0, floor_ulps: float = 4,
                       name: str = "", dtype: torch.dtype | None = None, terms: Any = None) -> None:
    """Assert the flash-attention rule for a fused result.

    ``fused`` and ``eager`` are results in the same low dtype (fp16 / bf16 / fp32) of the fused kernel and of
    the eager implementation, ``ref`` the float32/float64 reference on the same (rounded) inputs: single
    tensors or matching (nested) lists / tuples / dicts of tensors (e.g. an output and its gradients). Each
    pair passes iff ``max|fused-ref| <= factor*max|eager-ref| + floor_ulps*ulp(dtype)*max|ref|``; a missing
    tensor (None) must be missing in all three. Non-finite values must sit where eager's are, and are
    excluded from the error. ``dtype``: the dtype whose ulp makes the floor when the computation ran in a
    lower precision than the results are stored in (e.g. float32 gradients of a bf16 autocast region);
    default: the fused result's. ``terms``: None, or a structure like ``ref`` (None leaves allowed) of the
    ``Σ|terms|`` magnitudes of results that are reductions (see :class:`AbsTerms`); where given, the floor is
    ``floor_ulps * max(ulp(dtype) * max|ref|, ulp(float32) * terms)`` element by element. Raises
    AssertionError listing every failing tensor with where and how much.
    """
    if _structure(fused) != _structure(eager) or _structure(fused) != _structure(ref):
        raise AssertionError(f"{name}: structures differ: fused {_structure(fused)}, eager {_structure(eager)}, "
                             f"ref {_structure(ref)}")
    leaves_t = [t for _, t in _leaves(terms, name)] if terms is not None else [None] * len(_leaves(ref, name))
    if len(leaves_t) != len(_leaves(ref, name)):
        raise AssertionError(f"{name}: terms has {len(leaves_t)} leaves, ref {len(_leaves(ref, name))}")
    failures = []
    for (label, f), (_, e), (_, r), t in zip(_leaves(fused, name), _leaves(eager, name), _leaves(ref, name), leaves_t):
        if f is None or e is None or r is None:
            if not (f is None and e is None and r is None):
                failures.append(f"{label}: missing in {[n for n, t in (('fused', f), ('eager', e), ('ref', r)) if t is None]}")
            continue
        ok, msg = fused_error_report(f, e, r, factor=factor, floor_ulps=floor_ulps, name=label, dtype=dtype, terms=t)
        if not ok:
            failures.append(msg)
    if failures:
        raise AssertionError("fused result outside the tolerance rule:\n  " + "\n  ".join(failures))


# ------------------------------------------------------------------- magnitudes of summed terms
_aten = torch.ops.aten
# ops linear in every tensor argument: the same op on the magnitudes bounds the magnitude of the terms (not
# as_strided: a magnitude tensor need not share its value's memory layout; not the allocators, whose output is garbage)
_LINEAR = {
    "view", "_unsafe_view", "reshape", "_reshape_alias", "view_as", "t", "transpose", "permute", "expand",
    "squeeze", "unsqueeze", "slice", "select", "alias", "detach", "clone", "_to_copy", "contiguous",
    "split", "split_with_sizes", "chunk", "unbind", "narrow", "flatten", "unflatten", "cat", "stack", "sum",
    "mean", "neg", "repeat", "index_select", "gather", "constant_pad_nd", "diagonal", "roll", "flip", "unfold",
    "im2col", "col2im", "slice_backward", "select_backward", "embedding_dense_backward", "index_add",
    "scatter_add", "sum_to_size", "copy", "lift_fresh", "masked_select", "where",
}
# ops multilinear in their tensor arguments (products summed): the op on magnitudes gives Σ|a||b|
# elementwise backward ops, linear in grad_output: grad * f(x), so |op(Σ|terms| of grad, x)|
_GRAD_LINEAR = {"sigmoid_backward", "tanh_backward", "gelu_backward", "silu_backward", "threshold_backward",
                "hardtanh_backward", "elu_backward", "leaky_relu_backward", "softplus_backward",
                "native_dropout_backward", "hardswish_backward", "hardsigmoid_backward", "mish_backward"}
_MULTILINEAR = {"mul", "mm", "bmm", "matmul", "dot", "mv", "outer", "convolution", "convolution_backward",
                "addmm", "addbmm", "baddbmm", "addmv", "addcmul", "add", "sub", "div"}


class AbsTerms:
    """Context manager: beside every floating result computed inside it, the magnitude of its summed terms.

    Inside ``with AbsTerms() as m:``, a (reference) computation — forward and ``backward`` alike — runs as usual;
    every op that is linear or multilinear in its tensor operands (views, sums, ``mul``, ``mm``/``bmm``/
    ``addmm``, ``add``/``sub``, convolutions, LayerNorm's weight/bias gradients, ...) is evaluated a second
    time on the operands' magnitudes, so ``m.of(t)`` is ``Σ|terms|`` of ``t`` (``|a@b|`` → ``|a|@|b|``, a
    gradient summed over B·L rows → the sum of the rows' absolute contributions). Any other op (exp, softmax,
    GELU, ...) starts afresh: its magnitude is ``|t|``. ``m.of(t)`` for a tensor not computed inside is
    ``|t|``. Run it on the float64 reference; pass the magnitudes as ``terms=`` to :func:`assert_fused_close`.
    """

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils.weak import WeakTensorKeyDictionary

        self._mag = WeakTensorKeyDictionary()
        owner = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                try:
                    owner._record(func, args, kwargs, out)
                except Exception:  # an op whose magnitude rule does not apply: magnitude = |value| (stricter)
                    pass
                return out

        self._mode = _Mode()

    def __enter__(self) -> "AbsTerms":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)

    def of(self, t: Any) -> Any:
        """``Σ|terms|`` of ``t`` (a tensor, None, or a (nested) list / tuple / dict of them)."""
        if t is None:
            return None
        if isinstance(t, torch.Tensor):
            m = self._mag.get(t)
            return (m if m is not None else t.detach().abs()).detach()
        if isinstance(t, Mapping):
            return {k: self.of(v) for k, v in t.items()}
        return type(t)(self.of(v) for v in t)

    # -- the rules
    def _m(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            m = self._mag.get(x)
            return m if m is not None else x.detach().abs()
        if isinstance(x, (list, tuple)):
            return type(x)(self._m(v) for v in x)
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            return abs(x)
        return x

    def _store(self, out: Any, mag: Any) -> None:
        if isinstance(out, torch.Tensor):
            if out.is_floating_point() and isinstance(mag, torch.Tensor) and mag.shape == out.shape:
                self._mag[out] = mag.detach()
        elif isinstance(out, (list, tuple)) and isinstance(mag, (list, tuple)):
            for o, m in zip(out, mag):
                self._store(o, m)

    def _record(self, func, args, kwargs, out) -> None:
        name = func._schema.name.split("::")[-1]
        inplace = name.endswith("_") and not name.startswith("_")
        base = name[:-1] if inplace else name
        if base == "native_layer_norm_backward":
            self._store(out, self._layer_norm_backward(*args))
            return
        if base in _GRAD_LINEAR:
            self._store(out, func(self._m(args[0]), *args[1:], **kwargs).abs())
            return
        if base == "_softmax_backward_data":  # out * (g - Σ g·out) over dim: magnitude out * (M + Σ M·out)
            g, y, dim = self._m(args[0]), args[1].detach(), args[2]
            self._store(out, (y * (g + (g * y).sum(dim, keepdim=True))).to(out.dtype))
            return
        if base not in _LINEAR and base not in _MULTILINEAR:
            return
        if base == "div":  # linear in the numerator only: |a| / |b|
            num, den = args[0], args[1]
            den = den.detach().abs() if isinstance(den, torch.Tensor) else abs(den)
            mag = torch.div(self._m(num), den)
        elif base == "where":  # where(cond, a, b): the condition is not a magnitude
            mag = torch.where(args[0], self._m(args[1]), self._m(args[2]))
        elif base in ("masked_select", "gather", "index_select", "index_add", "scatter_add", "embedding_dense_backward"):
            mag = func(*[self._m(a) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args],
                       **{k: self._m(v) for k, v in kwargs.items()})
        else:
            margs = [self._m(a) for a in args]
            mkw = {k: self._m(v) for k, v in kwargs.items()}
            if base == "sub":
                margs = list(margs)
                f2 = _aten.add.Tensor if isinstance(args[1], torch.Tensor) else _aten.add.Scalar
                mag = f2(*margs, **mkw)
            elif inplace:  # the in-place op applied to a copy of self's magnitude
                margs[0] = margs[0].clone()
                mag = func(*margs, **mkw)
            else:
                mag = func(*margs, **mkw)
        self._store(out, mag)

    def _layer_norm_backward(self, grad_out, x, normalized_shape, mean, rstd, weight, bias, mask):
        n = len(normalized_shape)
        xhat = ((x - mean) * rstd).abs()
        g = self._m(grad_out)
        rows = tuple(range(x.dim() - n))
        gw = (g * xhat).sum(rows) if mask[1] else None
        gb = g.sum(rows) if mask[2] else None
        return (None, gw, gb)


# ------------------------------------------------------------------------------- forward/backward
def _random_like(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(t.shape, generator=gen, dtype=torch.float32).to(device=t.device, dtype=t.dtype)


def run_fwd_bwd(fn: Callable, *inputs: Any, grad_out: Any = None, seed: int = 0,
                module: torch.nn.Module | None = None,
                terms: AbsTerms | None = None) -> tuple[Any, list[torch.Tensor | None]]:
    """Run ``fn(*inputs)`` forward and backward on fresh leaves; return ``(out, grads)``.

    Every floating tensor in ``inputs`` is replaced by a detached clone that requires grad (its strides
    are kept where ``clone`` keeps them); other inputs (ints, None, integer ids) pass unchanged. The output
    (a tensor, or a tuple/list of tensors) is back-propagated with ``grad_out`` or, when None, a random
    normal gradient of its shape and dtype drawn from ``torch.Generator().manual_seed(seed)`` (the same for
    every implementation given the same seed). ``grads`` lists the gradient of every floating input, in
    order, then of every trainable parameter of ``module`` (``fn`` itself when it is an ``nn.Module``);
    None where no gradient arrived. The module's existing ``.grad`` fields are restored afterwards.
    Returned tensors are detached. ``terms``: an :class:`AbsTerms` to run forward and backward in (the
    reference run), so that ``terms.of(out)`` / ``terms.of(grads)`` give the magnitudes of the summed terms.
    """
    if module is None and isinstance(fn, torch.nn.Module):
        module = fn
    leaves, args = [], []
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            x = x.detach().clone().requires_grad_(True)
            leaves.append(x)
        args.append(x)
    params = [p for p in module.parameters() if p.requires_grad] if module is not None else []
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        with terms if terms is not None else contextlib.nullcontext():
            out = fn(*args)
            outs = [out] if isinstance(out, torch.Tensor) else list(out)
            if grad_out is None:
                gen = torch.Generator().manual_seed(seed)
                grads_out = [_random_like(o, gen) for o in outs]
            else:
                grads_out = [grad_out] if isinstance(grad_out, torch.Tensor) else list(grad_out)
            pairs = [(o, g) for o, g in zip(outs, grads_out) if o.requires_grad]
            if pairs:
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        grads = [t.grad for t in leaves] + [p.grad for p in params]
    finally:
        for p, g in zip(params, saved):
            p.grad = g
    detached = out.detach() if isinstance(out, torch.Tensor) else type(out)(o.detach() for o in outs)
    return detached, grads


# ------------------------------------------------------------------------------ exact comparisons
def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float | None = None, rtol: float | None = None, name: str = "") -> None:
    """``|actual - expected| <= atol + rtol * |expected|`` elementwise, with a report of where and how much.

    Shapes must match exactly; NaN must appear in the same places in both. For exact-algorithm checks
    (float64 kernels, pack/unpack round trips); fused-vs-eager accuracy uses :func:`assert_fused_close`.
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    d_atol, d_rtol = TOLERANCES.get(actual.dtype, TOLERANCES[torch.float32])
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    if not torch.equal(nan_a, nan_e):
        raise AssertionError(f"{name}: NaN pattern differs ({int(nan_a.sum())} NaN in actual, {int(nan_e.sum())} expected)")
    a = a.masked_fill(nan_a, 0)
    e = e.masked_fill(nan_e, 0)
    err = (a - e).abs()
    bound = atol + rtol * e.abs()
    bad = err > bound
    if bad.any():
        idx = int(torch.argmax((err - bound).flatten()))
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), a.shape)) if a.dim() else ()
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{a.numel()} elements off (atol={atol:g}, rtol={rtol:g}); "
            f"max abs err {float(err.max()):.3e}, max rel err {float((err / e.abs().clamp_min(1e-12)).max()):.3e}; "
            f"worst at {where}: actual {float(a.flatten()[idx]):.6g} vs expected {float(e.flatten()[idx]):.6g}"
        )


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64."""
    a, e = actual.detach().double(), expected.detach().double()
    return float((a - e).norm() / e.norm().clamp_min(1e-30))
