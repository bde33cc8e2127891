"""The one launch and numerics policy of every Triton kernel file (``kernels/{mufa,qlinear,mga}.py``).

Each kernel file takes from here, and nowhere else:

Device properties
    :class:`DeviceProps` ``(arch, smem_per_block, sm_count)`` — ``arch`` the compute capability as an int
    (``86`` for 8.6), ``smem_per_block`` the max opt-in shared memory one block may use (bytes),
    ``sm_count`` the number of SMs. :data:`ARCH_PROPS` holds them for the targets the package compiles
    and checks (SPEC §4; CUDA programming guide, "Features and Technical Specifications"):

    ====  =================  ========================  ======================================
    arch  shared / block     SMs (nominal card)        cards
    ====  =================  ========================  ======================================
    75    65536 (64 KB)      40 (T4)                   T4, RTX 2080 Ti, Quadro RTX
    80    166912 (163 KB)    108 (A100)                A100, A30
    86    101376 (99 KB)     84 (A6000)                RTX 3090, A6000, A10, A40
    89    101376 (99 KB)     128 (RTX 4090)            RTX 4090, L4, L40S
    90    232448 (227 KB)    132 (H100 SXM)            H100, H200
    100   232448 (227 KB)    148 (B200)                B200
    120   101376 (99 KB)     170 (RTX 5090)            RTX 5090, RTX PRO 6000
    ====  =================  ========================  ======================================

    :func:`device_props` reads a CUDA device once (``torch.cuda.get_device_properties``: major/minor,
    ``shared_memory_per_block_optin``, ``multi_processor_count``) and caches it; a CPU device (Triton's
    interpreter) gets :data:`INTERPRETER_PROPS`: sm_90's arch and shared memory (plans are the sm_90
    ones) with 2 SMs, so split-K reductions still split a few ways while the interpreter stays fast.

Shared memory and autotune lists
    :func:`smem_bytes` (the estimate every plan uses: pipelined operand tiles × stages + scratch),
    :func:`prune_configs` (the configs whose estimate fits; never empty: the smallest is kept) and
    :func:`autotune_pruner` (the same, as ``triton.autotune(prune_configs_by={"early_config_prune": ...})``).
    The estimate is checked against real compiles by ``tools/aot_compile.py`` for every arch above.

Numerics (one policy, decided the same way for every op)
    :data:`SUPPORTED_DTYPES`; :func:`precision` → the ``PREC`` constexpr every kernel takes:

    * ``"ieee"``: float32 operands, full-precision dots (torch's default fp32 matmul precision "highest");
    * ``"tf32"``: float32 operands with TF32 allowed (``torch.set_float32_matmul_precision("high")``), as
      eager ``F.linear`` would; also the value for 16-bit operands on a GPU (tensor cores either way);
    * ``"emulate"``: 16-bit operands under Triton's CPU interpreter. Its bfloat16 ``tl.dot`` returns garbage
      and its float32 → bfloat16 cast truncates (Triton 3.8); so the operands (already 16-bit values) are
      widened to float32 for the dot (exact: products of 16-bit floats fit in fp32) and every float32 →
      16-bit conversion rounds to nearest even by hand (:func:`cast`): CPU tests then see the rounding a GPU does.

    Jit helpers: :func:`dot` ``(a, b, acc, PREC)`` and :func:`cast` ``(x, DTYPE, PREC)``, and their pointer-typed
    forms :func:`round_to` ``(x, P, PREC)`` / :func:`dot_as` ``(a, b, P, PREC)`` (the dtype of what ``P`` points
    to). Rule for kernel code: every float32 → 16-bit conversion of a value that is stored or fed to a dot goes
    through ``cast``. :func:`static_assert_tile` states a tile width's precondition at compile time.

Sizes
    :func:`pad_pow2` (power-of-two padding with a floor — 16 is ``tl.dot``'s minimum — and a cap),
    :func:`cdiv`, :func:`split_rows` (how many row slices a deterministic split-K reduction uses).

Arch limits
    :func:`arch_unsupported` (the limits every kernel shares: Triton's / this package's oldest target, bf16
    before sm_80) for each kernel file's ``why_unsupported``.

AOT
    :class:`AotLaunch` (one launch of a kernel at a case: its arguments, with meta tensors for the tensors,
    the configs its plan allows on an arch and those that must compile spill-free), :func:`aot_dtype` (the AOT
    matrix's dtype names) and :func:`aot_profile` (what the profile names mean, one meaning for every kernel
    file). Each kernel file's ``aot_launches(props, dtype, profile)`` returns its launches, built by the same argument
    helpers and plan functions as its launchers; ``tools/aot_compile.py`` compiles them.

Names here are stable (other kernel files import them); add, do not rename.
"""
from __future__ import annotations

import os
from typing import Callable, Iterable, NamedTuple, Sequence

import torch
import triton
import triton.language as tl

__all__ = [
    "LAUNCH_OPTIONS", "DeviceProps", "ARCH_PROPS", "INTERPRETER_PROPS", "MIN_ARCH", "INTERPRET", "SUPPORTED_DTYPES", "DTYPE_BYTES",
    "device_props", "props_for_arch", "smem_bytes", "prune_configs", "autotune_pruner", "precision",
    "dot", "cast", "round_to", "dot_as", "static_assert_tile", "static_assert_tiles", "pad_pow2", "cdiv", "split_rows",
    "arch_unsupported", "dtype_bytes", "operand_bytes", "AotLaunch", "aot_dtype", "AOT_DTYPES", "AotProfile", "AOT_PROFILES",
    "aot_profile", "plan_cache", "PLAN_CACHES", "cached_plan", "PlannedLaunch",
]

# Triton's interpreter is chosen when ``@triton.jit`` runs (import time of the kernel files): read it then too.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0").strip() == "1"

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}

# Options every launch passes (and tools/aot_compile.py compiles with). FP fusion (a*b + c contracted to
# one FMA) ON: Triton 3.9 warns that its default flips to OFF in 3.10. The kernels want it on: eager PyTorch's
# CUDA kernels are built with nvcc's default --fmad=true (so fused results track eager's the same way), the
# GELU / softmax / epilogue arithmetic is faster with FMAs, and no result depends on an uncontracted a*b + c
# (Q-Linear's scales and codes use div_rn / floor / exact products: bit-exact either way). Setting it on every
# launch also keeps 3.6 / 3.8 / 3.9 / 3.10 compiling the same code. The interpreter ignores it.
LAUNCH_OPTIONS = dict(enable_fp_fusion=True)

# The oldest compute capability the kernels are compiled and checked for (tools/aot_compile.py --arch 75).
MIN_ARCH = 75


class DeviceProps(NamedTuple):
    """What a launch plan needs to know of a GPU: compute capability as an int (``86``), max opt-in shared
    memory per block in bytes, SM count."""

    arch: int
    smem_per_block: int
    sm_count: int


ARCH_PROPS: dict[int, DeviceProps] = {
    75: DeviceProps(75, 65536, 40),
    80: DeviceProps(80, 166912, 108),
    86: DeviceProps(86, 101376, 84),
    89: DeviceProps(89, 101376, 128),
    90: DeviceProps(90, 232448, 132),
    100: DeviceProps(100, 232448, 148),
    120: DeviceProps(120, 101376, 170),
}

INTERPRETER_PROPS = DeviceProps(90, 232448, 2)

# The launchers' caches of launch plans (one entry per shapes / dtypes / strides / flags; cleared together by
# ``rspeft_fast._impl.clear_plans``).
PLAN_CACHES: list[dict] = []
_MAX_PLANS = 1024


def plan_cache() -> dict:
    """A new launch-plan cache, registered in :data:`PLAN_CACHES`."""
    c: dict = {}
    PLAN_CACHES.append(c)
    return c


def cached_plan(cache: dict, key, make):
    """``cache[key]``, made by ``make()`` on a miss (the cache is emptied when it reaches 1024 entries)."""
    p = cache.get(key)
    if p is None:
        if len(cache) >= _MAX_PLANS:
            cache.clear()
        p = cache[key] = make()
    return p

_PROPS_CACHE: dict = {}


def props_for_arch(arch: int) -> DeviceProps:
    """The nominal :class:`DeviceProps` of a compute capability in :data:`ARCH_PROPS` (ValueError otherwise)."""
    try:
        return ARCH_PROPS[int(arch)]
    except KeyError:
        raise ValueError(f"unknown arch sm_{arch}; known: {sorted(ARCH_PROPS)}") from None


def device_props(device=None) -> DeviceProps:
    """:class:`DeviceProps` of ``device`` (a ``torch.device``, a string, an index or None = the current CUDA
    device), read once per device and cached. CPU (Triton's interpreter) → :data:`INTERPRETER_PROPS`."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    elif isinstance(device, int):
        device = torch.device("cuda", device)
    else:
        device = torch.device(device)
    if device.type != "cuda":
        return INTERPRETER_PROPS
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = _PROPS_CACHE.get(index)
    if props is None:
        p = torch.cuda.get_device_properties(index)
        smem = getattr(p, "shared_memory_per_block_optin", None)
        arch = p.major * 10 + p.minor
        if not smem:  # older torch builds: the nominal value of the arch (or the closest older one)
            known = [a for a in ARCH_PROPS if a <= arch]
            smem = ARCH_PROPS[max(known)].smem_per_block if known else ARCH_PROPS[MIN_ARCH].smem_per_block
        props = DeviceProps(arch, int(smem), int(p.multi_processor_count))
        _PROPS_CACHE[index] = props
    return props


def dtype_bytes(dtype) -> int:
    """Bytes per element of a torch dtype (or its name: ``"bfloat16"``)."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype.itemsize if hasattr(dtype, "itemsize") else torch.empty((), dtype=dtype).element_size()


def operand_bytes(dtype, props: DeviceProps) -> int:
    """Bytes per element of a dot operand as the compiled kernel stages it: the dtype's from sm_80 on; 4 before
    (Triton 3.6-3.9 emit no tensor-core code there: the dots run as FMAs on operands staged in float32, whatever
    the dtype; sm_75 compiles of bf16/fp16 tiles need what fp32 ones do). For shared-memory estimates and the
    register-driven tile limits of the plans."""
    return dtype_bytes(dtype) if props.arch >= 80 else 4


# ----------------------------------------------------------------------------------------------------------
# shared memory
# ----------------------------------------------------------------------------------------------------------
def smem_bytes(stages: int, tiles: Iterable[int], scratch: int = 0) -> int:
    """Shared-memory estimate of a pipelined loop: ``stages`` buffers of the operand tiles loaded per
    iteration (``tiles``: bytes of each, e.g. ``BM * BK * 2``) plus ``scratch`` (layout conversions of the
    accumulator/epilogue, operands staged for a second dot...). A single-stage loop still stages its dot
    operands once on sm_90 (wgmma reads shared memory). Plans call this with their own tile list; the AOT
    compile checks the estimate against ``metadata.shared`` of the real compile."""
    return max(1, int(stages)) * sum(int(t) for t in tiles) + int(scratch)


def prune_configs(configs: Sequence, estimate: Callable[[object], int], props: DeviceProps) -> list:
    """The configs whose ``estimate(config)`` fits ``props.smem_per_block``, in their order; never empty
    (when none fits, the one with the smallest estimate is kept: plans size that one to fit)."""
    configs = list(configs)
    if not configs:
        raise ValueError("prune_configs: no configs")
    fits = [c for c in configs if estimate(c) <= props.smem_per_block]
    return fits or [min(configs, key=estimate)]


def _tensor_device(named_args) -> torch.device | None:
    for v in named_args.values():
        if isinstance(v, torch.Tensor):
            return v.device
    return None


def autotune_pruner(estimate: Callable[[object, dict], int]):
    """``early_config_prune`` for ``triton.autotune(prune_configs_by=...)``: drops the configs whose
    ``estimate(config, named_args)`` is over the launch device's shared memory (never all of them)."""

    def prune(configs, named_args, **kwargs):
        dev = _tensor_device(named_args)
        props = device_props(dev) if dev is not None else INTERPRETER_PROPS
        return prune_configs(configs, lambda c: estimate(c, {**named_args, **kwargs}), props)

    return prune


class PlannedLaunch:
    """One planned launch: the kernel's name in a kernel module (``kernels``: that module's globals), its non-tensor
    arguments and grid. The first call
    goes through ``kernel[grid](...)`` (the autotuner picks a config on a GPU); once an autotuned kernel has chosen
    its config for these arguments, later calls go straight to the jitted function with that config's arguments
    and the grid it gives (what the autotuner would pass: no key, prune or dict building per call). The kernel is
    looked up by name at the first call, so a replaced module attribute is what runs."""

    __slots__ = ("kernels", "name", "static", "grid", "direct")

    def __init__(self, kernels: dict, name: str, static: dict, grid, **options):
        self.kernels = kernels
        self.name = name
        self.static = {**static, **options, **LAUNCH_OPTIONS}
        self.grid = grid
        self.direct = None

    def __call__(self, *tensors) -> None:
        d = self.direct
        if d is not None:
            d[0].run(*tensors, grid=d[1], warmup=False, **d[2])
            return
        kern = self.kernels[self.name]
        kern[self.grid](*tensors, **self.static)
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        if isinstance(kern, Autotuner):
            cfg = kern.best_config
            grid = self.grid(dict(self.static, **cfg.kwargs)) if callable(self.grid) else self.grid
            self.direct = (kern.fn, grid, {**self.static, **cfg.all_kwargs()})
        elif isinstance(kern, (JITFunction, InterpretedFunction)):
            grid = self.grid(self.static) if callable(self.grid) else self.grid
            self.direct = (kern, grid, self.static)


# ----------------------------------------------------------------------------------------------------------
# numerics
# ----------------------------------------------------------------------------------------------------------
def precision(dtype: torch.dtype, *, interpret: bool | None = None, tf32: bool | None = None) -> str:
    """The ``PREC`` constexpr for operands of ``dtype`` (see the module docstring).

    ``interpret`` defaults to ``TRITON_INTERPRET=1`` (as the kernels were decorated); ``tf32`` to
    ``torch.get_float32_matmul_precision() != "highest"`` (what eager fp32 matmuls do). The AOT compile passes
    both explicitly (``interpret=False``)."""
    interpret = INTERPRET if interpret is None else interpret
    if dtype == torch.float32:
        if tf32 is None:
            tf32 = torch.get_float32_matmul_precision() != "highest"
        return "tf32" if tf32 else "ieee"
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the Triton kernels support {[str(d) for d in SUPPORTED_DTYPES]}, got {dtype}")
    return "emulate" if interpret else "tf32"


@triton.jit
def cast(x, DTYPE: tl.constexpr, PREC: tl.constexpr):
    """``x.to(DTYPE)`` rounding to nearest even; under ``PREC == "emulate"`` a float32 → bfloat16 cast is
    rounded by hand on the bits (the interpreter truncates), NaN kept NaN."""
    if PREC == "emulate":
        if DTYPE == tl.bfloat16:
            xf = x.to(tl.float32)
            bits = xf.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            raw = xf.to(tl.uint32, bitcast=True)
            bits = tl.where(xf != xf, (raw & 0x80000000) | 0x7FC00000, bits)  # NaN → a quiet NaN (never inf)
            # the high half as the bf16 bits (a value cast would flush bf16 subnormals in the interpreter)
            return (bits >> 16).to(tl.uint16).to(DTYPE, bitcast=True)
        else:
            return x.to(DTYPE)
    else:
        return x.to(DTYPE)


@triton.jit
def dot(a, b, acc, PREC: tl.constexpr):
    """``acc + a @ b`` with float32 accumulation under the precision policy ``PREC`` (:func:`precision`).
    ``a`` and ``b`` must already hold the operand dtype's values (made with :func:`cast`)."""
    if PREC == "emulate":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def round_to(x, P, PREC: tl.constexpr):
    """``x`` cast to the element type of pointer ``P`` (:func:`cast`: round to nearest even)."""
    return cast(x, P.dtype.element_ty, PREC)


@triton.jit
def dot_as(a, b, P, PREC: tl.constexpr):
    """fp32-accumulated ``a @ b`` with both operands cast to the element type of pointer ``P`` (the compute
    dtype) under the one precision policy (:func:`dot`, :func:`cast`)."""
    T = P.dtype.element_ty
    return dot(cast(a, T, PREC), cast(b, T, PREC), None, PREC)


@triton.jit
def static_assert_tile(N: tl.constexpr):
    """Compile-time precondition of a tile width (a ``tl.arange`` length that feeds ``tl.dot``): a power of
    two, at least 16. The plans pad every width with :func:`pad_pow2`; a launch that does not fails to compile."""
    tl.static_assert((N >= 16) & ((N & (N - 1)) == 0), "tile widths must be powers of two >= 16")


@triton.jit
def static_assert_tiles(A: tl.constexpr, B: tl.constexpr, C: tl.constexpr):
    """:func:`static_assert_tile` of the three tile widths of a matmul kernel."""
    static_assert_tile(A)
    static_assert_tile(B)
    static_assert_tile(C)


# ----------------------------------------------------------------------------------------------------------
# sizes
# ----------------------------------------------------------------------------------------------------------
def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def pad_pow2(n: int, lo: int = 16, hi: int | None = None) -> int:
    """The power of two ≥ ``n``, at least ``lo`` (16: ``tl.dot``'s minimum) and at most ``hi`` (if given)."""
    p = max(int(lo), triton.next_power_of_2(max(int(n), 1)))
    return min(p, int(hi)) if hi is not None else p


def split_rows(n_rows: int, tiles: int, props: DeviceProps, granule: int, waves: int = 2) -> tuple[int, int]:
    """``(rows_per_split, splits)`` of a deterministic split-K reduction over ``n_rows`` rows whose output
    has ``tiles`` tiles: enough programs for about ``waves`` waves over the SMs, each split a multiple of
    ``granule`` rows (never more splits than ``cdiv(n_rows, granule)``). Partials are summed in a fixed order."""
    n_rows = max(int(n_rows), 1)
    want = max(1, (waves * props.sm_count) // max(int(tiles), 1))
    s = max(1, min(want, cdiv(n_rows, granule)))
    rows = cdiv(cdiv(n_rows, s), granule) * granule
    return rows, cdiv(n_rows, rows)


# ----------------------------------------------------------------------------------------------------------
# arch limits shared by every kernel
# ----------------------------------------------------------------------------------------------------------
def arch_unsupported(dtype: torch.dtype, props: DeviceProps, bf16_min_arch: int = 80) -> str | None:
    """The reason a Triton kernel cannot run ``dtype`` on ``props`` (None: it can): compute capability below
    :data:`MIN_ARCH`, an unsupported dtype, bfloat16 below ``bf16_min_arch`` (pass 0 for a kernel whose
    bf16 compile is verified there)."""
    if dtype not in SUPPORTED_DTYPES:
        return f"dtype {dtype} (the Triton kernels take float32/float16/bfloat16)"
    if props.arch < MIN_ARCH:
        return (f"compute capability sm_{props.arch} below sm_{MIN_ARCH}, the oldest the Triton kernels are "
                f"compiled and checked for")
    if dtype == torch.bfloat16 and props.arch < bf16_min_arch:
        return f"bfloat16 on sm_{props.arch} (needs sm_{bf16_min_arch}+ bf16 tensor cores)"
    return None


# ----------------------------------------------------------------------------------------------------------
# AOT matrix records
# ----------------------------------------------------------------------------------------------------------
class AotLaunch(NamedTuple):
    """One launch for ``tools/aot_compile.py``: ``kernel`` ("module.name" under ``rspeft_fast.kernels``),
    ``case`` (label, starting with the AOT dtype name), ``args`` (every non-config kernel parameter: tensors as
    meta tensors of the launch's dtype/strides, ints, floats, constexprs), ``configs`` (the ``triton.Config`` s
    the plan allows on the arch: one for a planned launch, the pruned list for an autotuned one),
    ``autotuned``, ``edge`` (not a SPEC §2 shape), ``spill_free`` (the configs of ``configs`` the kernel's
    owner tuned spill-free at this case on this arch: a spill in one of them fails the AOT run; other spills
    are warnings)."""

    kernel: str
    case: str
    args: dict
    configs: tuple
    autotuned: bool = False
    edge: bool = False
    spill_free: tuple = ()


class AotProfile(NamedTuple):
    """What an AOT profile name means to every kernel file's ``aot_launches`` (:func:`aot_profile`).

    ``lean``: the SPEC §2 cases only (no edge shapes), and outside bf16 only the training launches (the other
    variants of a launch — inference, recompute, packed weights, other bit widths — are compiled in bf16 only);
    ``thin``: also leave out the repeats that only exercise a constexpr's value (a launch listed once per bit
    width whose width is only a ``QMAX`` constant) or code another listed launch compiles (the packed-weight
    modes of Q-Linear's dequantisation kernel: the same ``_weight_tile`` as its packed forwards)."""

    lean: bool
    thin: bool


# the AOT profile names: "quick" (the done-when matrix), "ci" (the test suite's slice), "full" (everything)
AOT_PROFILES = {
    "quick": AotProfile(lean=True, thin=False),
    "ci": AotProfile(lean=True, thin=True),
    "full": AotProfile(lean=False, thin=False),
}


def aot_profile(name: str) -> AotProfile:
    """The :class:`AotProfile` of an AOT profile name (``quick``, ``ci``, ``full``; ValueError otherwise)."""
    try:
        return AOT_PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown AOT profile {name!r}; known: {sorted(AOT_PROFILES)}") from None


# AOT dtype name -> (torch compute dtype, PREC on a GPU)
AOT_DTYPES = {
    "fp32": (torch.float32, "ieee"),
    "tf32": (torch.float32, "tf32"),
    "bf16": (torch.bfloat16, "tf32"),
    "fp16": (torch.float16, "tf32"),
}


def aot_dtype(name: str) -> tuple:
    """``(torch dtype, PREC)`` of an AOT dtype name (``fp32``, ``tf32``, ``bf16``, ``fp16``)."""
    try:
        return AOT_DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown AOT dtype {name!r}; known: {sorted(AOT_DTYPES)}") from None
