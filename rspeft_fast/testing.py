"""Test helpers shipped with the package: the one tolerance rule, a forward/backward runner, a verbose allclose.

The rule (after flash-attention), :func:`assert_fused_close`: a fused result in a low dtype (fp16 / bf16 /
fp32) is compared with a float32/float64 reference ``ref`` computed on the same (rounded) inputs, and may
be off by at most ``factor`` times what the eager implementation in the *same* dtype gets wrong, plus a
floor of a few units in the last place of that dtype, relative to the reference's magnitude::

    max|fused - ref| <= factor * max|eager - ref| + floor_ulps * ulp(dtype) * max|ref|

Every kernel test states its accuracy this way; nothing else in the test suite re-implements it.
:func:`run_fwd_bwd` runs a function forward and backward on fresh leaves with a seeded random output
gradient, so the fused, the eager and the reference runs see the very same values.

``assert_close`` (elementwise ``atol + rtol*|expected|`` with a report), ``rel_err`` and the per-dtype
``TOLERANCES`` map stay for exact-algorithm comparisons (float64 kernels, packing round trips).
"""
from __future__ import annotations

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


def fused_error_report(fused: torch.Tensor, eager: torch.Tensor, ref: torch.Tensor, *, factor: float = 2.0,
                       floor_ulps: float = 4, name: str = "", dtype: torch.dtype | None = None) -> tuple[bool, str]:
    """``(passes, one-line report)`` of the rule of :func:`assert_fused_close` for single tensors."""
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
    keep = ~nf_f & torch.isfinite(r)
    if f.numel() == 0 or not keep.any():
        return True, f"{label}: {f.numel()} elements, nothing finite to compare"
    f, e, r = f[keep], e[keep], r[keep]
    err_f = (f - r).abs()
    err_e_max = float((e - r).abs().max())
    mag = float(r.abs().max())
    floor = floor_ulps * ulp(dtype or fused.dtype) * mag
    bound = factor * err_e_max + floor
    worst = int(torch.argmax(err_f))
    ok = float(err_f[worst]) <= bound
    n_over = int((err_f > bound).sum())
    msg = (f"{label} ({fused.dtype}, {tuple(fused.shape)}): max|fused-ref| {float(err_f[worst]):.3e} "
           f"{'<=' if ok else '>'} {factor:g} x max|eager-ref| {err_e_max:.3e} + {floor_ulps:g} ulp x max|ref| "
           f"{mag:.3e} = {bound:.3e}; {n_over}/{f.numel()} elements over; worst: fused {float(f[worst]):.6g}, "
           f"eager {float(e[worst]):.6g}, ref {float(r[worst]):.6g}")
    return ok, msg


def assert_fused_close(fused: Any, eager: Any, ref: Any, *, factor: float = 2.0, floor_ulps: float = 4,
                       name: str = "", dtype: torch.dtype | None = None) -> None:
    """Assert the flash-attention rule for a fused result.

    ``fused`` and ``eager`` are results in the same low dtype (fp16 / bf16 / fp32) of the fused kernel and of
    the eager implementation, ``ref`` the float32/float64 reference on the same (rounded) inputs: single
    tensors or matching (nested) lists / tuples / dicts of tensors (e.g. an output and its gradients). Each
    pair passes iff ``max|fused-ref| <= factor*max|eager-ref| + floor_ulps*ulp(dtype)*max|ref|``; a missing
    tensor (None) must be missing in all three. Non-finite values must sit where eager's are, and are
    excluded from the error. ``dtype``: the dtype whose ulp makes the floor when the computation ran in a
    lower precision than the results are stored in (e.g. float32 gradients of a bf16 autocast region);
    default: the fused result's. Raises AssertionError listing every failing tensor with where and how much.
    """
    if _structure(fused) != _structure(eager) or _structure(fused) != _structure(ref):
        raise AssertionError(f"{name}: structures differ: fused {_structure(fused)}, eager {_structure(eager)}, "
                             f"ref {_structure(ref)}")
    failures = []
    for (label, f), (_, e), (_, r) in zip(_leaves(fused, name), _leaves(eager, name), _leaves(ref, name)):
        if f is None or e is None or r is None:
            if not (f is None and e is None and r is None):
                failures.append(f"{label}: missing in {[n for n, t in (('fused', f), ('eager', e), ('ref', r)) if t is None]}")
            continue
        ok, msg = fused_error_report(f, e, r, factor=factor, floor_ulps=floor_ulps, name=label, dtype=dtype)
        if not ok:
            failures.append(msg)
    if failures:
        raise AssertionError("fused result outside the tolerance rule:\n  " + "\n  ".join(failures))


# ------------------------------------------------------------------------------- forward/backward
def _random_like(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(t.shape, generator=gen, dtype=torch.float32).to(device=t.device, dtype=t.dtype)


def run_fwd_bwd(fn: Callable, *inputs: Any, grad_out: Any = None, seed: int = 0,
                module: torch.nn.Module | None = None) -> tuple[Any, list[torch.Tensor | None]]:
    """Run ``fn(*inputs)`` forward and backward on fresh leaves; return ``(out, grads)``.

    Every floating tensor in ``inputs`` is replaced by a detached clone that requires grad (its strides
    are kept where ``clone`` keeps them); other inputs (ints, None, integer ids) pass unchanged. The output
    (a tensor, or a tuple/list of tensors) is back-propagated with ``grad_out`` or, when None, a random
    normal gradient of its shape and dtype drawn from ``torch.Generator().manual_seed(seed)`` (the same for
    every implementation given the same seed). ``grads`` lists the gradient of every floating input, in
    order, then of every trainable parameter of ``module`` (``fn`` itself when it is an ``nn.Module``);
    None where no gradient arrived. The module's existing ``.grad`` fields are restored afterwards.
    Returned tensors are detached.
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
