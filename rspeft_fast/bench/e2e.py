"""End-to-end benchmark: one real training step of a frozen backbone with adapters.

A step is ``zero_grad`` → forward (bf16 autocast on GPU, fp32 on CPU) → loss → backward → AdamW step
over the trainable parameters, on a fixed batch already on the device (no data loading).

Variants of each case:

* ``none``  — the floor: the same frozen backbone with no adapter. Adapters in every block make the
  backward run through the whole backbone (activation gradients, no weight gradients), so the floor
  does too: the output of the first layer (patch embedding / stem / token embedding) is made a leaf
  that requires grad. Trainable: the classifier head (timm) or the retrieval temperature (CLIP).
* ``eager`` — ``rspeft_fast.inject(model, method, impl="reference")``;
* ``fused`` — ``rspeft_fast.inject(model, method, impl="triton")`` (and the weighted triplet loss on the
  C++/CUDA extension for CLIP). If any part cannot run here the variant is recorded unavailable.

The CLIP cases are the retrieval job's training step (``python -m rspeft_fast retrieval``): its model
(:class:`~rspeft_fast.retrieval.model.RetrievalModel`, the injected CLIP with the learnable temperature) and its
objective (:func:`~rspeft_fast.retrieval.job.retrieval_loss`: contrastive + weighted triplet with image ids).

The dense cases are the ``segment`` / ``change`` jobs' training step (issue #24, SPEC §2 and §6): the injected
ConvNeXt read at 4 levels (:class:`~rspeft_fast.dense.model.MultiScaleEncoder`, stage CAPMs of ``eqam+capm``),
smp's UperNet + 1×1 head upsampled to the input, cross-entropy with ignore index 255
(:class:`~rspeft_fast.dense.losses.DenseLoss`); change detection runs both dates through the one encoder and fuses
``|f_A − f_B|``. Their ``none`` floor is the frozen backbone (no adapter, no prompts, backward forced through it as
above) + the trainable decoder.

Backbones are randomly initialised (no weights are downloaded): time does not depend on the values.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .cases import classify_error
from .timing import Timing, _stats

__all__ = ["E2E_CASES", "E2ECase", "e2e_cases", "build_step", "time_step", "run_case", "E2E_VARIANTS"]

E2E_VARIANTS = ("none", "eager", "fused")
NUM_CLASSES = 45  # NWPU-RESISC45-sized head


@dataclass
class E2ECase:
    name: str
    desc: str
    kind: str  # "timm" | "clip" | "segment" | "change"
    model: str
    method: str | None
    batch: int
    img: int
    model_kwargs: dict = field(default_factory=dict)
    inject_kwargs: dict = field(default_factory=dict)
    text_len: int = 77
    targets: dict = field(default_factory=dict)
    decoder_channels: int = 256  # dense cases: UperNet width
    num_classes: int = NUM_CLASSES  # dense cases: segmentation classes (change: 2)


def e2e_cases(size: str) -> list[E2ECase]:
    """``size``: "spec" (GPU: the real models and batches) or "tiny" (CPU: miniature models)."""
    if size == "spec":
        return [
            E2ECase("vit_b16_mufa", "timm ViT-B/16 + MuFA (12 blocks), batch 64, 224²", "timm", "vit_base_patch16_224", "mufa", 64, 224,
                    targets={"fused/none <=": 1.25, "eager/fused >=": 2.5}),
            E2ECase("swin_t_mufa", "timm Swin-T + MuFA (12 blocks), batch 64, 224²", "timm", "swin_tiny_patch4_window7_224", "mufa", 64, 224),
            E2ECase("convnext_b_eqam_capm", "timm ConvNeXt-B + EQAM (8-bit) + CAPM, batch 64, 224²", "timm", "convnext_base", "eqam+capm", 64, 224),
            E2ECase("clip_b32_mga", "retrieval job step: open_clip ViT-B/32 dual encoder + MGA (both towers, BiShare) + contrastive + weighted triplet, batch 214 (HarMA)",
                    "clip", "ViT-B-32", "mga", 214, 224),
            E2ECase("seg_convnext_b_eqam_capm_upernet", "segment job step: timm ConvNeXt-B + EQAM (8-bit, hidden 16) + CAPM, UperNet (256 ch) + head, 6 classes, batch 8, 512²",
                    "segment", "convnext_base", "eqam+capm", 8, 512, num_classes=6,
                    targets={"fused/none <=": 1.10}),
            E2ECase("cd_convnext_b_eqam_capm_upernet", "change job step: Siamese timm ConvNeXt-B + EQAM + CAPM (both dates, one encoder), |fA - fB|, UperNet (256 ch), batch 8 pairs, 256²",
                    "change", "convnext_base", "eqam+capm", 8, 256, num_classes=2,
                    targets={"fused/none <=": 1.10}),
        ]
    if size in ("tiny", "small"):
        return [
            E2ECase("vit_tiny_mufa", "miniature timm ViT (d=96, depth 2, 32², patch 8) + MuFA, batch 4", "timm", "vit_base_patch16_224", "mufa", 4, 32,
                    dict(img_size=32, patch_size=8, embed_dim=96, depth=2, num_heads=2)),
            E2ECase("swin_tiny_mufa", "miniature timm Swin (d=32, depths 1/1/1/1, 32², window 4) + MuFA, batch 2", "timm", "swin_tiny_patch4_window7_224", "mufa", 2, 32,
                    dict(img_size=32, window_size=4, embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8))),
            E2ECase("convnext_tiny_eqam_capm", "miniature timm ConvNeXt (dims 32..256, depths 1/1/1/1, 32²) + EQAM + CAPM, batch 2", "timm", "convnext_base", "eqam+capm", 2, 32,
                    dict(dims=(32, 64, 128, 256), depths=(1, 1, 1, 1))),
            E2ECase("clip_tiny_mga", "miniature open_clip CLIP (width 64, 2 layers per tower) + MGA (hidden 32, 2 heads) + weighted triplet + contrastive, batch 6",
                    "clip", "tiny", "mga", 6, 32, inject_kwargs=dict(hidden=32, heads=2), text_len=16),
            E2ECase("seg_tiny_eqam_capm_upernet", "miniature segment step: timm ConvNeXt (dims 16..128, depths 1/1/1/1) + EQAM + CAPM, UperNet (16 ch), 6 classes, batch 2, 64²",
                    "segment", "convnext_base", "eqam+capm", 2, 64, dict(dims=(16, 32, 64, 128), depths=(1, 1, 1, 1)),
                    decoder_channels=16, num_classes=6),
            E2ECase("cd_tiny_eqam_capm_upernet", "miniature change step: Siamese timm ConvNeXt (dims 16..128, depths 1/1/1/1) + EQAM + CAPM, |fA - fB|, UperNet (16 ch), batch 2 pairs, 32²",
                    "change", "convnext_base", "eqam+capm", 2, 32, dict(dims=(16, 32, 64, 128), depths=(1, 1, 1, 1)),
                    decoder_channels=16, num_classes=2),
        ]
    raise ValueError(f"size must be 'spec', 'tiny' or 'small', got {size!r}")


E2E_CASES = {c.name: c for s in ("spec", "tiny") for c in e2e_cases(s)}


def _create(case: E2ECase) -> nn.Module:
    if case.kind == "timm":
        import timm

        return timm.create_model(case.model, pretrained=False, num_classes=NUM_CLASSES, **case.model_kwargs)
    try:
        import open_clip
    except ImportError as e:
        raise ImportError("the CLIP end-to-end case needs open_clip, an optional dependency: "
                          "pip install 'rspeft_fast[open_clip]'") from e
    if case.model == "tiny":
        from open_clip.model import CLIPTextCfg, CLIPVisionCfg

        return open_clip.CLIP(
            embed_dim=32,
            vision_cfg=CLIPVisionCfg(layers=2, width=64, patch_size=8, image_size=case.img, head_width=32),
            text_cfg=CLIPTextCfg(context_length=case.text_len, vocab_size=100, width=64, heads=2, layers=2),
        )
    return open_clip.create_model(case.model, pretrained=None)


def _first_layers(model: nn.Module, kind: str) -> list[nn.Module]:
    if kind == "clip":
        return [model.visual.conv1, model.token_embedding]
    for attr in ("patch_embed", "stem"):
        if hasattr(model, attr):
            return [getattr(model, attr)]
    raise TypeError(f"no patch_embed/stem on {type(model).__name__}")


def _leaf_output(module, args, output):
    return output.detach().requires_grad_(True)


@dataclass
class Step:
    fn: Callable[[], torch.Tensor]
    model: nn.Module
    trainable: int
    notes: list


def _clip_tokens(batch: int, length: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    tok = torch.zeros(batch, length, dtype=torch.long)
    lens = torch.randint(4, length + 1, (batch,), generator=gen)
    for i, n in enumerate(lens.tolist()):
        tok[i, : n - 1] = torch.randint(1, vocab - 1, (n - 1,), generator=gen)
        tok[i, n - 1] = vocab - 1  # end-of-text token: the largest id (open_clip pools at argmax)
    return tok


def build_step(case: E2ECase, variant: str, device: torch.device | str, seed: int = 0, lr: float = 1e-3) -> Step:
    """The training step of ``case`` with ``variant`` (one of :data:`E2E_VARIANTS`), not yet run."""
    import rspeft_fast

    if variant not in E2E_VARIANTS:
        raise ValueError(f"variant must be one of {E2E_VARIANTS}, got {variant!r}")
    device = torch.device(device)
    if case.kind in ("segment", "change"):
        return _build_dense_step(case, variant, device, seed, lr)
    notes: list = []
    torch.manual_seed(seed)
    model = _create(case)
    loss_impl = "reference"
    if variant == "none":
        if case.kind == "timm":
            rspeft_fast.inject(model, "linear")
        else:
            model.requires_grad_(False)  # the RetrievalModel wrapper below adds the trainable temperature
        for m in _first_layers(model, case.kind):
            m.register_forward_hook(_leaf_output)
        notes.append("floor: no adapter, backward forced through the frozen backbone (first layer's output is a grad leaf)")
    else:
        impl = "reference" if variant == "eager" else "triton"
        rspeft_fast.inject(model, case.method, impl=impl, **case.inject_kwargs)
        if case.kind == "clip" and variant == "fused":
            loss_impl = "cuda" if device.type == "cuda" else "cpu"
    if case.kind == "clip":
        # the retrieval job's model: the CLIP plus HarMA's learnable temperature (init 0.07, clamped)
        from ..retrieval.model import RetrievalModel

        clip = model
        model = RetrievalModel(clip)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    gen = torch.Generator().manual_seed(seed + 1)
    images = torch.randn(case.batch, 3, case.img, case.img, generator=gen).to(device)
    amp = device.type == "cuda"

    if case.kind == "timm":
        labels = torch.randint(0, NUM_CLASSES, (case.batch,), generator=gen).to(device)

        def loss_fn():
            return F.cross_entropy(model(images).float(), labels)
    else:
        from ..retrieval.job import retrieval_loss

        vocab = clip.vocab_size if hasattr(clip, "vocab_size") else clip.token_embedding.num_embeddings
        tokens = _clip_tokens(case.batch, case.text_len, vocab, gen).to(device)
        # HarMA's batches hold several captions of some images: ids with repeats (about 2 captions per image)
        ids = torch.randint(0, max(case.batch // 2, 1), (case.batch,), generator=gen).to(device)
        notes.append(f"loss: the retrieval job's objective: contrastive_loss (soft multi-positive, learnable temperature) "
                     f"+ weighted_triplet_loss (margin 0.2, gamma 2, ids; impl={loss_impl!r}), 1:1")

        def loss_fn():
            img, txt, temp = model(images, tokens)
            return retrieval_loss(img, txt, temp, ids, triplet_impl=loss_impl)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn()
        loss.backward()
        opt.step()
        return loss.detach()

    return Step(step, model, sum(p.numel() for p in params), notes)


def _build_dense_step(case: E2ECase, variant: str, device: torch.device, seed: int, lr: float) -> Step:
    """The dense jobs' step (see the module docstring): ``model`` is the Segmentor / ChangeDetector."""
    import timm

    import rspeft_fast
    from ..dense.losses import DenseLoss
    from ..dense.model import ChangeDetector, MultiScaleEncoder, Segmentor, level_prompts

    notes: list = []
    torch.manual_seed(seed)
    backbone = timm.create_model(case.model, pretrained=False, num_classes=0, **case.model_kwargs)
    if variant == "none":
        backbone.requires_grad_(False)
        for m in _first_layers(backbone, "timm"):
            m.register_forward_hook(_leaf_output)
        notes.append("floor: frozen backbone without adapters or prompts + trainable decoder; backward forced through the "
                     "backbone (the stem's output is a grad leaf), as the adapters need")
    else:
        rspeft_fast.inject(backbone, case.method, impl="reference" if variant == "eager" else "triton", **case.inject_kwargs)
    enc = MultiScaleEncoder(backbone, level_prompts(backbone, None))
    change = case.kind == "change"
    model = (ChangeDetector(enc, case.decoder_channels) if change
             else Segmentor(enc, case.num_classes, case.decoder_channels))
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    gen = torch.Generator().manual_seed(seed + 1)
    shape = (case.batch, 3, case.img, case.img)
    images = [torch.randn(shape, generator=gen).to(device) for _ in range(2 if change else 1)]
    target = torch.randint(0, case.num_classes, (case.batch, case.img, case.img), generator=gen)
    target[:, : case.img // 16] = 255  # a band of ignored pixels, as crops padded at the border have
    target = target.to(device)
    crit = DenseLoss(case.num_classes)
    amp = device.type == "cuda"
    notes.append(f"loss: DenseLoss (cross-entropy, ignore index 255) over {case.num_classes} classes at {case.img}²"
                 + ("; both dates (2 x batch images) through the one encoder" if change else ""))

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = crit(model(*images), target)
        loss.backward()
        opt.step()
        return loss.detach()

    return Step(step, model, sum(p.numel() for p in params), notes)


def time_step(step: Callable[[], torch.Tensor], device: torch.device | str, warmup: int = 3, iters: int = 20) -> tuple[Timing, float | None, float]:
    """(timing of one step, peak memory in GiB on CUDA or None, last loss). Warm-up steps excluded."""
    device = torch.device(device)
    loss = None
    for _ in range(warmup):
        loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for s, e in zip(starts, ends):
            s.record()
            loss = step()
            e.record()
        torch.cuda.synchronize()
        samples = [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]
        peak = torch.cuda.max_memory_allocated() / 2**30
        t = _stats(samples, "CUDA events per step, warm-up steps excluded")
    else:
        samples = []
        for _ in range(iters):
            t0 = time.perf_counter()
            loss = step()
            samples.append(time.perf_counter() - t0)
        peak = None
        t = _stats(samples, "perf_counter per step (CPU), warm-up steps excluded")
    return t, peak, float(loss) if loss is not None else math.nan


def run_case(case: E2ECase, device: torch.device | str, warmup: int = 3, iters: int = 20, variants=E2E_VARIANTS, log=print,
             interp_iters: int | None = None) -> dict:
    """Every variant of ``case``: step time, images/s, peak memory, or unavailable/error with the reason.

    ``interp_iters``: timed steps of a CPU fused (interpreted) variant, after no warm-up (default ``iters``)."""
    device = torch.device(device)
    out = {"id": case.name, "desc": case.desc, "batch": case.batch, "image_size": case.img, "method": case.method,
           "precision": "bf16 autocast, fp32 master weights" if device.type == "cuda" else "fp32", "variants": {}}
    for v in variants:
        rec: dict
        try:
            st = build_step(case, v, device)
            interp = v == "fused" and device.type == "cpu"
            if interp and interp_iters:
                t, peak, loss = time_step(st.fn, device, 0, interp_iters)
            else:
                t, peak, loss = time_step(st.fn, device, warmup, iters)
            rec = {"status": "ok", "step_ms": round(t.median_us / 1e3, 3), "step_ms_q20": round(t.q20_us / 1e3, 3),
                   "step_ms_q80": round(t.q80_us / 1e3, 3), "images_per_s": round(case.batch / (t.median_us * 1e-6), 1),
                   "peak_mem_GiB": None if peak is None else round(peak, 3), "steps_timed": t.n, "trainable_params": st.trainable,
                   "last_loss": loss, "notes": st.notes}
            if interp:
                rec["notes"] = st.notes + ["Triton kernels in TRITON_INTERPRET=1: functional run, not a performance number"]
                rec["interpreted"] = True
            del st
        except Exception as e:  # recorded: unavailable (with reason) or error
            status, reason = classify_error(e)
            rec = {"status": status, "reason": reason}
        if device.type == "cuda":
            torch.cuda.empty_cache()
        out["variants"][v] = rec
        log(f"  e2e {case.name} [{v}] " + (f"{rec['step_ms']:.2f} ms/step, {rec['images_per_s']:.0f} img/s" if rec["status"] == "ok" else f"{rec['status']}: {rec['reason']}"))
    out["ratios"] = _ratios(out["variants"])
    if case.targets:
        out["targets"] = _targets(case.targets, out["ratios"], device)
    return out


def _ratios(vs: dict) -> dict:
    def ms(v):
        r = vs.get(v, {})
        return r.get("step_ms") if r.get("status") == "ok" and not r.get("interpreted") else None

    r = {}
    if ms("fused") and ms("none"):
        r["fused/none"] = round(ms("fused") / ms("none"), 3)
    if ms("eager") and ms("none"):
        r["eager/none"] = round(ms("eager") / ms("none"), 3)
    if ms("eager") and ms("fused"):
        r["eager/fused"] = round(ms("eager") / ms("fused"), 3)
    return r


def _targets(targets: dict, ratios: dict, device: torch.device) -> dict:
    out = {}
    for key, bound in targets.items():
        ratio, op = key.rsplit(" ", 1)
        val = ratios.get(ratio)
        met = None if val is None else (val <= bound if op == "<=" else val >= bound)
        out[key] = {"bound": bound, "measured": val, "met": met,
                    "note": "the target is stated for an H100" if device.type == "cuda" else "not evaluated on CPU"}
    return out
