"""Parity: fine-tuning with fused adapters follows the eager loss curve within the working precision's noise.

Three runs from the same seed, initial weights and batches of the embedded texture scene set
(:mod:`rspeft_fast.data`), training a frozen timm ViT + MuFA (adapters and head trained, AdamW):

* ``eager``    — ``impl="reference"`` at the working precision (GPU: bf16 autocast; CPU: fp32);
* ``fused``    — ``impl="triton"`` at the working precision (CPU: Triton's interpreter);
* ``eager_hi`` — ``impl="reference"`` at a higher precision (GPU: fp32 with TF32 off; CPU: float64).

``noise = max_t |eager - eager_hi|`` is how far the working precision alone moves the curve;
the check passes when ``max_t |fused - eager| <= 2 * noise`` (at least 8 float32 ulps of the loss). Both the
difference and the noise are reported, so a reader can judge the margin.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["ParityConfig", "PARITY_CONFIGS", "run_parity"]


@dataclass
class ParityConfig:
    name: str
    model: str
    model_kwargs: dict
    img: int
    batch: int
    steps: int
    lr: float = 1e-3
    per_class: int = 40


PARITY_CONFIGS = {
    # GPU: the real ViT-B/16 with MuFA in all 12 blocks, 200 steps.
    "vit_b16": ParityConfig("vit_b16", "vit_base_patch16_224", {}, 224, 32, 200),
    # CPU: a miniature ViT (d=96, depth 2) whose fused path runs in Triton's interpreter.
    "tiny": ParityConfig("tiny", "vit_base_patch16_224", dict(img_size=32, patch_size=8, embed_dim=96, depth=2, num_heads=2), 32, 8, 6, per_class=8),
}


def _batches(n_items: int, batch: int, steps: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    while len(out) < steps:
        perm = torch.randperm(n_items, generator=g)
        out.extend(perm[i : i + batch] for i in range(0, n_items - batch + 1, batch))
    return out[:steps]


@contextlib.contextmanager
def _no_tf32():
    m, c = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = m, c


def _curve(cfg: ParityConfig, impl: str, device: torch.device, precision: str, data, seed: int) -> tuple[list[float], float]:
    import timm

    import rspeft_fast
    from rspeft_fast.data import CLASSES

    images, labels = data
    torch.manual_seed(seed)
    model = timm.create_model(cfg.model, pretrained=False, num_classes=len(CLASSES), **cfg.model_kwargs)
    rspeft_fast.inject(model, "mufa", impl=impl)
    dtype = torch.float64 if precision == "fp64" else torch.float32
    model.to(device=device, dtype=dtype).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    amp = precision == "bf16-autocast"
    losses = []
    t0 = time.perf_counter()
    ctx = _no_tf32() if precision == "fp32" and device.type == "cuda" else contextlib.nullcontext()
    with ctx:
        for idx in _batches(len(labels), cfg.batch, cfg.steps, seed + 1):
            x = images[idx].to(device=device, dtype=dtype)
            y = labels[idx].to(device)
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = F.cross_entropy(model(x).float(), y)
            loss.backward()
            opt.step()
            losses.append(loss.detach().item())
    return losses, time.perf_counter() - t0


def run_parity(device: torch.device | str | None = None, config: str | None = None, steps: int | None = None, seed: int = 0, log=print) -> dict:
    """Run the three curves and compare them. Returns a JSON-ready dict (``passed`` is the verdict;
    ``status`` is ``"unavailable"``/``"error"`` with a reason when the fused run could not be made)."""
    from rspeft_fast.data import TextureScenes

    from .cases import classify_error

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = PARITY_CONFIGS[config or ("vit_b16" if device.type == "cuda" else "tiny")]
    if steps is not None:
        cfg = ParityConfig(**{**cfg.__dict__, "steps": int(steps)})
    work, hi = ("bf16-autocast", "fp32") if device.type == "cuda" else ("fp32", "fp64")
    ds = TextureScenes("train", per_class=cfg.per_class, size=cfg.img, seed=seed)
    data = (ds.images, ds.labels)
    out = {"config": cfg.__dict__ | {"model_kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.model_kwargs.items()}},
           "device": str(device), "working_precision": work, "high_precision": hi, "method": "mufa",
           "data": f"rspeft_fast.data.TextureScenes(train, per_class={cfg.per_class}, size={cfg.img}, seed={seed})"}
    curves = {}
    for name, impl, prec in (("eager", "reference", work), ("fused", "triton", work), ("eager_hi", "reference", hi)):
        try:
            curves[name], secs = _curve(cfg, impl, device, prec, data, seed)
            log(f"  parity [{name}] impl={impl} {prec}: {cfg.steps} steps in {secs:.1f} s, loss {curves[name][0]:.4f} -> {curves[name][-1]:.4f}")
        except Exception as e:
            status, reason = classify_error(e)
            log(f"  parity [{name}] {status}: {reason}")
            out.update(status=status, reason=f"{name} run (impl={impl!r}): {reason}", passed=None)
            return out
    diff = [abs(a - b) for a, b in zip(curves["fused"], curves["eager"])]
    noise = [abs(a - b) for a, b in zip(curves["eager_hi"], curves["eager"])]
    max_diff, max_noise = max(diff), max(noise)
    # floor: a few float32 ulps of the loss (the loss itself is computed in float32 in every run)
    floor = 8 * torch.finfo(torch.float32).eps * max(abs(v) for v in curves["eager"])
    bound = max(2.0 * max_noise, floor)
    out.update(
        status="ok",
        curves=curves,
        max_abs_diff_fused_vs_eager=max_diff,
        max_abs_diff_eager_vs_high_precision=max_noise,
        step_of_max_diff=diff.index(max_diff),
        final_loss={k: v[-1] for k, v in curves.items()},
        bound=bound,
        passed=bool(max_diff <= bound),
        rule="max_t |fused - eager| <= max(2 * max_t |eager - eager_hi|, 8 float32 ulps of the loss)",
    )
    log(f"  parity: max |fused - eager| = {max_diff:.3e}; working-precision noise max |eager - eager_hi| = {max_noise:.3e}; "
        f"{'PASS' if out['passed'] else 'FAIL'} (bound {bound:.3e})")
    return out
