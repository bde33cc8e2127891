"""What is benchmarked: every op's cases (shapes), implementations, FLOP and byte counts.

Shared by the pytest-benchmark suites in ``benchmarks/`` and the CLI, so both time the same thing.

Implementations ("variants") of each op:

* ``eager``   — the module/function with ``impl="reference"`` (the eager PyTorch reference);
* ``compile`` — ``torch.compile`` (inductor, default mode) of that same reference;
* ``fused``   — ``impl="triton"`` for the adapters, ``impl="cuda"`` (GPU) / ``impl="cpu"`` (CPU, the C++
  extension) for the weighted triplet loss. On CPU the Triton kernels run in Triton's interpreter:
  that run checks they work, its time is no performance number.

Modes: ``fwd`` — forward under ``torch.no_grad()`` (inference); ``fwd+bwd`` — forward with autograd then
``backward`` of a fixed random output gradient (input and parameters require grad; their ``.grad`` is
reset to ``None`` outside the timed region).

Sizes: ``spec`` — SPEC §2 (GPU, bf16 except the triplet loss in fp32); ``small`` — batch-2 versions of
the same layers (CPU); ``tiny`` — a few dozen rows (CI, interpreter).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

__all__ = [
    "OPS",
    "MODES",
    "VARIANTS",
    "Case",
    "Runner",
    "Unavailable",
    "cases",
    "build_runner",
    "classify_error",
    "default_size",
    "fused_impl",
]

OPS = ("mufa", "qlinear", "mga", "triplet")
MODES = ("fwd", "fwd+bwd")
VARIANTS = ("eager", "compile", "fused")


class Unavailable(Exception):
    """This implementation cannot run here (reason in the message); recorded, never substituted."""


def classify_error(e: BaseException) -> tuple[str, str]:
    """("unavailable" | "error", reason) for an exception raised while building/running a variant.

    Unavailable: an explicitly requested implementation that this machine/build cannot run
    (``ImplUnavailableError``, e.g. the CUDA triplet kernel on a CPU machine, or :class:`Unavailable`).
    Anything else — an ``ImportError`` of a fused op, a rejected ``impl=`` value — is an error of the
    build or of the op itself, and is reported as one.
    """
    from .._impl import ImplUnavailableError

    msg = f"{type(e).__name__}: {e}".strip()
    if isinstance(e, Unavailable):
        return "unavailable", str(e)
    if isinstance(e, ImplUnavailableError):
        return "unavailable", msg
    return "error", msg


def default_size(device: torch.device | str, quick: bool = False) -> str:
    if torch.device(device).type == "cuda":
        return "spec"
    return "tiny" if quick else "small"


def fused_impl(op: str, device: torch.device | str) -> str:
    """The ``impl=`` argument of the fused variant of ``op`` on ``device``."""
    if op == "triplet":
        return "cuda" if torch.device(device).type == "cuda" else "cpu"
    return "triton"


def fused_label(op: str, device: torch.device | str) -> str:
    dev = torch.device(device).type
    if op == "triplet":
        return "C++/CUDA extension (impl='cuda')" if dev == "cuda" else "C++ extension (impl='cpu')"
    return "Triton kernels (impl='triton')" if dev == "cuda" else "Triton kernels in TRITON_INTERPRET=1 (impl='triton'): functional run, not a performance number"


@dataclass
class Case:
    op: str
    name: str
    desc: str
    shapes: dict
    dtype: torch.dtype
    # factory(impl, device, dtype) -> (module or function, inputs, indices of inputs that get gradients)
    factory: Callable
    flops: dict  # {"fwd": float, "fwd+bwd": float}
    bytes: dict  # {"fwd": float | None, "fwd+bwd": float | None}: the memory floor's traffic
    anchor_h100_us: dict | None = None  # SPEC §3 (eager/compile, fwd/fwd+bwd; HBM floor)
    anchor_note: str = ""
    params: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.op}/{self.name}"


@dataclass
class Runner:
    fn: Callable[[], object]
    grad_to_none: list
    impl_arg: str
    module: object
    inputs: tuple
    interpreted: bool = False


# --------------------------------------------------------------------------------------------- cases

def _es(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _adapter_bytes(n: int, d: int, dtype: torch.dtype) -> dict:
    es = _es(dtype)
    # fwd: read x, write y. fwd+bwd: that, then read x and dy, write dx (parameters are negligible).
    return {"fwd": 2.0 * n * d * es, "fwd+bwd": 5.0 * n * d * es}


def _seeded_module(make: Callable[[], nn.Module], device, dtype, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = make()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.split(".")[-2:-1] == ["up"]:
                p.normal_(0.0, 0.02)  # zero-initialised in the modules: randomise so every product is real
    return m.to(device=device, dtype=dtype)


def _mufa_case(name, lead, d, rates, dtype, anchor=None):
    from ..reference.mufa import branch_sizes

    sizes = branch_sizes(d, rates)
    R = sum(sizes)
    n = math.prod(lead)

    def factory(impl, device, dt):
        from ..modules.mufa import MuFAAdapter

        m = _seeded_module(lambda: MuFAAdapter(d, rates, impl=impl), device, dt)
        torch.manual_seed(1)
        x = torch.randn(*lead, d, device=device, dtype=dt)
        return m, (x,), (0,)

    return Case(
        "mufa", name, f"MuFAAdapter(d={d}, rates={tuple(rates)}, R={R}) on x {(*lead, d)}",
        {"x": [*lead, d], "R": R, "rates": list(rates)}, dtype, factory,
        flops={"fwd": 4.0 * n * d * R, "fwd+bwd": 12.0 * n * d * R},
        bytes=_adapter_bytes(n, d, dtype), anchor_h100_us=anchor,
    )


def _eqam_case(name, lead, d, reduction, bits, dtype, anchor=None, note=""):
    h = d // reduction
    n = math.prod(lead)

    def factory(impl, device, dt):
        from ..modules.qlinear import EQAM

        m = _seeded_module(lambda: EQAM(d, reduction=reduction, bits=bits, impl=impl), device, dt)
        torch.manual_seed(1)
        x = torch.randn(*lead, d, device=device, dtype=dt)
        return m, (x,), (0,)

    return Case(
        "qlinear", name, f"EQAM(d={d}, reduction={reduction}, bits={bits}) (two Q-Linear + GELU) on x {(*lead, d)}",
        {"x": [*lead, d], "hidden": h, "bits": bits}, dtype, factory,
        flops={"fwd": 4.0 * n * d * h, "fwd+bwd": 12.0 * n * d * h},
        bytes=_adapter_bytes(n, d, dtype), anchor_h100_us=anchor, anchor_note=note,
    )


def _msa_flops(tokens: int, L: int, h: int) -> float:
    return tokens * (2.0 * h * 3 * h + 2.0 * h * h + 4.0 * L * h)  # in_proj, out_proj, QKᵀ and PV


def _mga_case(name, B, L, d, hidden, heads, share, dtype, anchor=None):
    n = B * L
    fl = n * (4.0 * d * hidden) + 2 * _msa_flops(n, L, hidden)
    if share:
        h2 = hidden // 2
        fl += n * (4.0 * hidden * h2) + _msa_flops(n, L, h2)

    def factory(impl, device, dt):
        from ..modules.mga import BiShareAdapter, MGAdapter

        def make():
            s = BiShareAdapter(hidden, heads) if share else None
            return MGAdapter(d, hidden=hidden, heads=heads, share=s, impl=impl)

        m = _seeded_module(make, device, dt)
        torch.manual_seed(1)
        x = torch.randn(B, L, d, device=device, dtype=dt)
        return m, (x,), (0,)

    desc = f"MGAdapter(d={d}, hidden={hidden}, heads={heads}{', share=BiShareAdapter(' + str(hidden) + ', ' + str(heads) + ')' if share else ''}) on x {(B, L, d)}"
    return Case(
        "mga", name, desc, {"x": [B, L, d], "hidden": hidden, "heads": heads, "bishare": bool(share)}, dtype, factory,
        flops={"fwd": fl, "fwd+bwd": 3.0 * fl}, bytes=_adapter_bytes(n, d, dtype), anchor_h100_us=anchor,
    )


def _triplet_case(B, D, max_violation, anchor=None, note=""):
    name = f"B{B}_{'max' if max_violation else 'sum'}"

    def factory(impl, device, dt):
        from ..ops.triplet import weighted_triplet_loss

        torch.manual_seed(1)
        img = nn.functional.normalize(torch.randn(B, D, device=device, dtype=dt), dim=-1)
        txt = nn.functional.normalize(img + 0.5 * torch.randn(B, D, device=device, dtype=dt), dim=-1)

        def loss(a, b):
            return weighted_triplet_loss(a, b, 0.2, 2.0, max_violation, None, impl)

        return loss, (img, txt), (0, 1)

    return Case(
        "triplet", name, f"weighted triplet loss B={B}, D={D}, {'max_violation' if max_violation else 'sum'} (fp32)",
        {"img": [B, D], "txt": [B, D], "max_violation": max_violation}, torch.float32, factory,
        flops={"fwd": 2.0 * B * B * D, "fwd+bwd": 6.0 * B * B * D},
        bytes={"fwd": None, "fwd+bwd": None}, anchor_h100_us=anchor, anchor_note=note,
    )


def _anchor(ef, eb, cf, cb, floor):
    return {"eager fwd": ef, "eager fwd+bwd": eb, "compile fwd": cf, "compile fwd+bwd": cb, "HBM floor fwd": floor}


def cases(op: str, size: str) -> list[Case]:
    """The cases of ``op`` (one of :data:`OPS`) at ``size`` ("spec" | "small" | "tiny")."""
    if size not in ("spec", "small", "tiny"):
        raise ValueError(f"size must be 'spec', 'small' or 'tiny', got {size!r}")
    lo = torch.bfloat16 if size == "spec" else torch.float32
    b = {"spec": 64, "small": 2}.get(size)
    if op == "mufa":
        if size == "tiny":
            return [_mufa_case("tiny_d96", (4, 17), 96, (8, 16, 32), lo), _mufa_case("tiny_d192", (2, 13), 192, (8, 16, 32), lo)]
        return [
            _mufa_case("vit_b16", (b * 197,), 768, (8, 16, 32), lo, _anchor(260, 2053, 619, 1817, 13) if size == "spec" else None),
            _mufa_case("swin_t_s1", (b * 3136,), 96, (8, 16, 32), lo, _anchor(583, 2475, 331, 1648, 26) if size == "spec" else None),
        ]
    if op == "qlinear":
        if size == "tiny":
            return [_eqam_case("tiny_d128_b8", (2, 5, 7), 128, 4, 8, lo), _eqam_case("tiny_d256_b4", (3, 11), 256, 4, 4, lo)]
        note = "SPEC §3 does not say which bit width its Q-Linear anchors used"
        a1 = _anchor(612, 1291, 400, 1213, 34) if size == "spec" else None
        a4 = _anchor(471, 1119, 368, 1339, 4) if size == "spec" else None
        out = []
        for bits in (8, 4):
            out.append(_eqam_case(f"convnext_s1_b{bits}", (b, 56, 56), 128, 4, bits, lo, a1, note if a1 else ""))
            out.append(_eqam_case(f"convnext_s4_b{bits}", (b, 7, 7), 1024, 4, bits, lo, a4, note if a4 else ""))
            # EQAM's default width, hidden = 16 (UPetu's budget, SPEC §1): reduction d // 16
            out.append(_eqam_case(f"convnext_s1_h16_b{bits}", (b, 56, 56), 128, 128 // 16, bits, lo))
            out.append(_eqam_case(f"convnext_s4_h16_b{bits}", (b, 7, 7), 1024, 1024 // 16, bits, lo))
        return out
    if op == "mga":
        if size == "tiny":
            return [_mga_case("tiny_image", 2, 7, 96, 128, 8, False, lo), _mga_case("tiny_text_bishare", 2, 5, 64, 128, 8, True, lo)]
        bb = 214 if size == "spec" else 2
        return [
            _mga_case("clip_image", bb, 50, 768, 128, 8, False, lo, _anchor(593, 3426, 520, 2459, 11) if size == "spec" else None),
            _mga_case("clip_text_bishare", bb, 77, 512, 128, 8, True, lo, _anchor(1223, 5317, 1452, 4530, 11) if size == "spec" else None),
            # long towers (SPEC §2, issue #13): ViT-B/16 @224, ViT-L/14 @224 and @336 (RemoteCLIP / GeoRSCLIP)
            _mga_case("vit_b16_L197", 64 if size == "spec" else 1, 197, 768, 128, 8, False, lo),
            _mga_case("vit_l14_L257", 32 if size == "spec" else 1, 257, 1024, 128, 8, False, lo),
            _mga_case("vit_l14_336_L577", 8 if size == "spec" else 1, 577, 1024, 128, 8, False, lo),
        ]
    if op == "triplet":
        if size == "tiny":
            return [_triplet_case(48, 32, False), _triplet_case(48, 32, True)]
        Bs = (214, 4096, 16384) if size == "spec" else (214, 1024)
        note = "SPEC §3 does not say whether its triplet anchors are sum or max_violation"
        anchors = {4096: _anchor(1181, 3114, 430, 1403, None), 16384: _anchor(17060, 45269, 4306, 10552, None)} if size == "spec" else {}
        return [_triplet_case(B, 512, mv, anchors.get(B), note if B in anchors else "") for B in Bs for mv in (False, True)]
    raise ValueError(f"unknown op {op!r}; expected one of {OPS}")


# ------------------------------------------------------------------------------------------- runners

def build_runner(case: Case, variant: str, mode: str, device: torch.device | str) -> Runner:
    """A zero-argument callable that runs ``case`` with ``variant`` in ``mode`` on ``device``.

    Raises :class:`Unavailable` (or the op's own ``ImplUnavailableError``/``ImportError``, see
    :func:`classify_error`) when the variant cannot run here. The returned runner has NOT been called.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Unavailable("CUDA requested but torch.cuda.is_available() is False")
    impl = "reference" if variant in ("eager", "compile") else fused_impl(case.op, device)
    if variant == "fused":
        _check_fused_available(case.op, impl, device)
    target, inputs, diff = case.factory(impl, device, case.dtype)
    module = target
    if variant == "compile":
        target = torch.compile(target)
    params = list(module.parameters()) if isinstance(module, nn.Module) else []
    interpreted = variant == "fused" and impl == "triton" and device.type == "cpu"
    if mode == "fwd":
        for p in params:
            p.requires_grad_(False)

        def fn():
            with torch.no_grad():
                return target(*inputs)

        return Runner(fn, [], impl, module, inputs, interpreted)

    inputs = tuple(t.detach().requires_grad_(i in diff) for i, t in enumerate(inputs))
    grad_box: list = []

    def fn():
        out = target(*inputs)
        if not grad_box:
            gen = torch.Generator(device="cpu").manual_seed(2)
            grad_box.append(None if out.dim() == 0 else torch.randn(out.shape, generator=gen).to(out.device, out.dtype))
        out.backward(grad_box[0])
        return out

    grads = [t for t in inputs if t.requires_grad] + [p for p in params if p.requires_grad]
    return Runner(fn, grads, impl, module, inputs, interpreted)


def _check_fused_available(op: str, impl: str, device: torch.device) -> None:
    from .._impl import available

    ok, why = available(impl, device)
    if not ok:
        raise Unavailable(f"impl={impl!r} cannot run here: {why}")
