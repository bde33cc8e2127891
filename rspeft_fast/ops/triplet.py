"""HarMA's weighted triplet loss with hard-negative mining: autograd op over the C++/CUDA extension.

Maths (SPEC §1), for ``img (B, D)``, ``txt (B, D)`` (L2-normalised by the caller), ``S = img txtᵀ``,
``d = diag(S)``::

    Cs[i,j] = max(0, margin + S[i,j] - d[i])     Ci[i,j] = max(0, margin + S[i,j] - d[j])
    zero where i == j (with ids: where ids[i] == ids[j]);  f(c) = (1 - e^-c)^gamma · c
    sum mode:  loss = (Σ f(Cs) + Σ f(Ci)) / 2
    max_violation: loss = (Σ_i max_j f(Cs[i,j]) + Σ_j max_i f(Ci[i,j])) / 2

Implementations (``impl``): ``"cuda"`` / ``"cpu"`` (the extension ``rspeft_fast._C``, csrc/triplet/),
``"reference"`` (:func:`rspeft_fast.reference.triplet.weighted_triplet_ref`, which materialises B×B
matrices), ``"auto"`` (the extension for the tensors' device when built, else the reference).

How the extension computes it (memory O(B·D + B), never a B×B matrix): it walks the rows of ``S`` in
chunks of ``max(1, chunk_elems // B)`` rows (default: 2^20 elements on CPU, 2^24 on CUDA, but at least
256 rows, so the buffers are O(B), at most max(4 MiB, 256·B·4 bytes) on CPU), computing each
chunk with one GEMM (MKL / cuBLAS, fp32 accumulation; bf16/fp16 inputs are upcast, as the reference
does), then fused passes reduce it: per-row sums (or max + arg-max) of ``f(Cs)`` and running per-column
sums (or max + arg-max) of ``f(Ci)``, so every tile of ``S`` is computed once for both terms.
Peak extra memory: two ``(rows, B)`` chunk buffers (S and its gradient), fp32 copies of the features,
the gradients ``(B, D)`` and a few ``(B,)`` vectors.

Gradients are formed in the same pass (as Liger's fused linear cross-entropy does), only when a
gradient is needed (grad mode on and an input requiring grad):

* sum mode: the chunk's ``dS = (f'(Cs) + f'(Ci)) / 2`` (masked) is applied right away,
  ``grad_img[I] = dS·txt`` and ``grad_txt += dSᵀ·img[I]`` (one GEMM each, chunks in a fixed order),
  plus the diagonal term ``-Σ f'`` through ``d``; with ``f'(c) = W(c) + c·γ·(1-e^-c)^(γ-1)·e^-c``.
* max_violation: only the arg-max entries carry gradient: per row ``(arg-max column, f'(c))``, per
  column ``(arg-max row, f'(c))``; the gradients are scattered from these 4·B numbers with a stable
  sort and fixed-order segment sums (no atomics).

**Stored between forward and backward**: the two fp32 gradient tensors ``(B, D)`` (already summed over
all chunks), nothing else — the backward only scales them by the incoming gradient and casts to the
inputs' dtypes. (So ``loss.backward()`` costs O(B·D); a forward run without grad does one GEMM pass.)

Conventions that pin the result down where the reference leaves freedom:

* hard-mining ties: the **lowest index** wins (lowest column of a row max, lowest row of a column max),
  also among the zeros of masked/clamped entries, which is what
  :func:`~rspeft_fast.reference.triplet.weighted_triplet_ref` does (it selects the arg-max explicitly);
* ``f'`` at ``c == 0`` (an unmasked entry exactly at the hinge): its limit from above, 0 for ``gamma > 0``
  and 1 for ``gamma == 0`` (eager autograd agrees, except for ``0 < gamma < 1``, where it gives NaN
  (0·inf); likewise the ``(1 - e^-c)^(gamma-1)`` factor is taken as its limit when ``1 - e^-c`` rounds to 0);
* determinism: no atomics; every sum has a fixed order, so the same inputs give bitwise the same loss
  and gradients (for a given device, thread count and chunk size).

Non-finite inputs (NaN / ±Inf features) propagate as in the eager reference, never silently zeroed:

* forward: a NaN cost gives ``f = NaN`` (clamp and the focal weight propagate it), ``-inf`` is clamped to
  0, ``+inf`` gives ``inf``; in the hard-mining max NaN wins and the **first** NaN is the arg-max (as
  ``torch.max`` and the reference's ``_max_first``), so the loss is NaN wherever eager's is;
* gradients follow eager autograd: ``f'`` of a NaN cost is 0 (clamp's backward ``where(c >= 0, g, 0)``
  gates it), ``f'(+inf)`` is NaN for ``gamma > 0`` (exp's backward ``inf·0``; 1 for ``gamma == 0``) and,
  as in eager, that NaN reaches the gradients even off the hard-mining arg-max; eager's dense
  ``dS·txt`` / ``dSᵀ·img`` makes a NaN/inf feature's whole column of the other input's gradient NaN, which
  the sparse hard-mining path reproduces explicitly. Result: NaN plants give exactly eager's NaN
  positions (and its finite values elsewhere), in both modes, with or without ids, and for the local
  bands of ``gather=True``; inf plants too for ``gamma > 0``. For ``gamma == 0`` with an inf feature
  the finite/non-finite pattern is eager's but a few entries can be NaN where eager has ±inf (eager
  multiplies the inf by the exact dense coefficient in one GEMM; the kernel adds the masked diagonal's
  ``0·inf`` and, under hard mining, a ``0·inf`` column term). The extra work for all this is O(B·D) and
  happens without a device sync; finite inputs give the same values as before.

Distributed (``gather=True``): the features (and ids) of every rank are all-gathered with
``torch.distributed.nn.functional.all_gather`` (gradients flow back to each rank's shard, as open_clip's
gather-with-grad), and each rank computes only the terms of its own rows (its images against every
text) and its own columns (its texts against every image). The per-rank losses sum to the loss of the
whole gathered batch and their gradients, summed over ranks by the all-gather's backward, equal its
gradient; no rank repeats another's work (with hard mining each rank finds its rows' and columns'
maxima over the whole gathered batch). Every rank must pass the same batch size.

The InfoNCE term HarMA adds beside this loss is plain cross-entropy over ``S / temp`` (use
``torch.nn.functional.cross_entropy``); nothing here is specific to it.
"""
from __future__ import annotations

import torch

from .._impl import resolve_impl
from .._validate import check_float, check_same_device, compute_dtype
from ..reference.triplet import weighted_triplet_local_ref, weighted_triplet_ref

__all__ = ["weighted_triplet_loss", "check_triplet_inputs"]

_IMPLS = ("cuda", "cpu")


def check_triplet_inputs(img, txt, ids):
    check_float(img, "img")
    check_float(txt, "txt")
    if img.dim() != 2 or txt.dim() != 2:
        raise ValueError(f"img and txt must be 2-D (B, D); got {tuple(img.shape)} and {tuple(txt.shape)}")
    if img.shape != txt.shape:
        raise ValueError(f"img and txt must have the same shape (B, D); got {tuple(img.shape)} and {tuple(txt.shape)}")
    if img.shape[0] == 0:
        raise ValueError("img and txt must hold at least one pair (B >= 1)")
    if ids is not None:
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"ids must be a torch.Tensor or None, got {type(ids).__name__}")
        if ids.dim() != 1 or ids.shape[0] != img.shape[0]:
            raise ValueError(f"ids must have shape (B,) = ({img.shape[0]},), got {tuple(ids.shape)}")
        if ids.is_floating_point() or ids.is_complex():
            raise TypeError(f"ids must be an integer tensor, got {ids.dtype}")
    check_same_device(("img", img), ("txt", txt), ("ids", ids))


# ----------------------------------------------------------------------------- torch.library op
def _ext_forward(img, txt, ids, row_start, row_count, margin, gamma, max_violation, need_grad, chunk_elems):
    from .. import _native

    ext = _native.extension()
    name = "weighted_triplet_forward_cuda" if img.is_cuda else "weighted_triplet_forward_cpu"
    fn = getattr(ext, name, None)
    if fn is None:
        raise RuntimeError(f"rspeft_fast._C has no {name} (kernels in this build: {ext.kernels()}); {_native.REBUILD}")
    with torch.autocast(img.device.type, enabled=False):  # the GEMMs inside must stay in fp32
        return fn(img, txt, ids, row_start, row_count, margin, gamma, max_violation, need_grad, chunk_elems)


@torch.library.custom_op("rspeft_fast::weighted_triplet_fwd", mutates_args=())
def _triplet_fwd(
    img: torch.Tensor,
    txt: torch.Tensor,
    ids: torch.Tensor | None,
    row_start: int,
    row_count: int,
    margin: float,
    gamma: float,
    max_violation: bool,
    need_grad: bool,
    chunk_elems: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, grad_img, grad_txt): the loss of rows/columns [row_start, row_start+row_count) and, with
    need_grad, its gradients wrt the full ``img``/``txt`` in the accumulation dtype (else empty)."""
    loss, g_img, g_txt = _ext_forward(img, txt, ids, row_start, row_count, margin, gamma, max_violation, need_grad, chunk_elems)
    return loss, g_img, g_txt


def _acc_dtype(img, txt):
    return torch.float64 if torch.float64 in (img.dtype, txt.dtype) else torch.float32


@_triplet_fwd.register_fake
def _(img, txt, ids, row_start, row_count, margin, gamma, max_violation, need_grad, chunk_elems):
    acc = _acc_dtype(img, txt)
    loss = img.new_empty((), dtype=acc)
    if need_grad:
        return loss, img.new_empty(img.shape, dtype=acc), img.new_empty(txt.shape, dtype=acc)
    return loss, img.new_empty((0,), dtype=acc), img.new_empty((0,), dtype=acc)


def _setup_context(ctx, inputs, output):
    img, txt = inputs[0], inputs[1]
    need_grad = inputs[8]
    _, g_img, g_txt = output
    ctx.need_grad = need_grad
    ctx.dtypes = (img.dtype, txt.dtype)
    if need_grad:
        ctx.save_for_backward(g_img, g_txt)


def _backward(ctx, grad_loss, _g1, _g2):
    if not ctx.need_grad:
        raise RuntimeError(
            "weighted_triplet_fwd was run with need_grad=False (no input required grad when it ran); "
            "its gradients were not computed"
        )
    g_img, g_txt = ctx.saved_tensors
    gi = (g_img * grad_loss).to(ctx.dtypes[0])
    gt = (g_txt * grad_loss).to(ctx.dtypes[1])
    return gi, gt, None, None, None, None, None, None, None, None


_triplet_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- distributed helpers
def _gather(img, txt, ids):
    """All-gather features (with grad) and ids from every rank; returns (img_all, txt_all, ids_all, start)."""
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_gather

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("gather=True needs an initialised torch.distributed process group")
    world, rank = dist.get_world_size(), dist.get_rank()
    img_all = torch.cat(all_gather(img), 0)
    txt_all = torch.cat(all_gather(txt), 0)
    ids_all = None
    if ids is not None:
        parts = [torch.empty_like(ids) for _ in range(world)]
        dist.all_gather(parts, ids.contiguous())
        ids_all = torch.cat(parts, 0)
    return img_all, txt_all, ids_all, rank * img.shape[0]


# ----------------------------------------------------------------------------- entry point
def weighted_triplet_loss(
    img,
    txt,
    margin=0.2,
    gamma=2.0,
    max_violation=False,
    ids=None,
    impl="auto",
    gather=False,
    chunk_elems=None,
):
    """HarMA's adaptive triplet loss (SPEC §1): ``img (B, D)``, ``txt (B, D)``, ``ids (B,)`` → scalar.

    ``img`` and ``txt`` must be L2-normalised by the caller (rows of unit norm, e.g.
    ``F.normalize(emb, dim=-1)``): the margin and the focal weight are defined on cosine similarities,
    and nothing here normalises (any input is computed as given, so unnormalised features silently give
    a different loss).

    ``impl``: ``"auto" | "reference" | "cuda" | "cpu"`` (see the module docstring for what the extension
    computes and stores). ``gather=True``: all-gather across ``torch.distributed`` ranks (gradients flow
    back to the local shard); this rank's loss covers its own rows and columns of the global matrix, so
    the losses of all ranks sum to the global loss. ``chunk_elems``: elements per chunk of ``S`` the
    extension holds at once (rows = ``max(1, chunk_elems // B_total)``); None = the device default.

    The result is float32 (float64 for float64 inputs), like the reference, which upcasts.
    Under autocast the features are first cast to the autocast dtype (as eager matmul would), then the
    loss is computed with fp32 accumulation.
    """
    check_triplet_inputs(img, txt, ids)
    margin, gamma, max_violation = float(margin), float(gamma), bool(max_violation)
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    impl = resolve_impl("weighted_triplet_loss", impl, img.device, _IMPLS)
    if impl != "reference":
        dt = compute_dtype(img)
        if dt != img.dtype and dt in (torch.float16, torch.bfloat16):
            img, txt = img.to(dt), txt.to(dt)
    if ids is not None:
        ids = ids.to(torch.int64)
    b = img.shape[0]
    if gather:
        img, txt, ids, start = _gather(img, txt, ids)
    else:
        start = 0
    if impl == "reference":
        if not gather:
            return weighted_triplet_ref(img, txt, margin, gamma, max_violation, ids)
        return weighted_triplet_local_ref(img, txt, start, b, margin, gamma, max_violation, ids)
    need_grad = torch.is_grad_enabled() and (img.requires_grad or txt.requires_grad)
    chunk = 0 if chunk_elems is None else int(chunk_elems)
    if chunk < 0:
        raise ValueError(f"chunk_elems must be positive, got {chunk_elems}")
    loss, _, _ = _triplet_fwd(img, txt, ids, start, b, margin, gamma, max_violation, need_grad, chunk)
    return loss
