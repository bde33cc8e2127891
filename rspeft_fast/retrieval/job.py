"""Image-text retrieval fine-tuning and evaluation (HarMA): ``python -m rspeft_fast retrieval [--data ...] ...``

The protocol (SPEC §5):

1. an open_clip model (``--model``; ``--checkpoint FILE`` for open_clip / OpenAI / GeoRSCLIP / RemoteCLIP weights,
   see :mod:`rspeft_fast.retrieval.model`), frozen, with ``inject(model, "mga", ...)`` in both towers (BiShare in
   the text tower; ``--share-image-tower`` shares it into the image tower as the HarMA paper describes);
2. zero-shot evaluation of the starting model on the test split (the injected model at initialisation is the
   backbone exactly: MGA's up-projections start at zero);
3. training with HarMA's objective ``contrastive_loss(ids, learnable τ) + w · weighted_triplet_loss(margin 0.2,
   γ 2, ids)`` (``--triplet-weight`` w = 1; ids = image ids, so other captions of the same image are never
   negatives; ``--triplet-diagonal-only`` for HarMA's own diagonal-only mask), AdamW (wd 0.04, betas 0.9/0.98),
   on the engine of :mod:`rspeft_fast.train.loop` (warm-up + cosine, autocast, checkpoints, ``--resume``, DDP with
   gather-with-grad under ``torchrun``, ``--fsdp``, ``--grad-checkpointing``);
4. after each epoch, evaluation on the validation split; the epoch with the best validation mR is selected
   (never the test split) and its adapters kept (``OUT/adapters.safetensors``, via ``save_adapters``);
5. the selected epoch's test metrics, once, at the end.

``OUT/metrics.json`` = ``{"model", "zero_shot", "val", "test", "selected_epoch", ...}``, each split with the recall
keys of :func:`rspeft_fast.retrieval.recall_at_k` plus ``n_images`` and ``n_captions``; ``--eval-only`` evaluates
the injected (optionally ``--adapters FILE``) model on the test split and writes ``test`` (and ``zero_shot``, the
same). Outputs are adapter files, never whole models.

Without ``--data``: the embedded captioned scene set (:mod:`rspeft_fast.data.scenes`) and the CPU-sized CLIP
:data:`~rspeft_fast.retrieval.model.TINY_CLIP`.

Distributed: each rank reads its slice of every global batch (:class:`~rspeft_fast.train.data.ResumableSampler`),
both loss terms all-gather the features with gradients; the contrastive term is a per-rank mean (DDP's gradient
averaging gives the global gradient) and the triplet term a per-rank share of a sum, so it is multiplied by the
world size before DDP averages it: N processes with batch B train exactly as one with batch N·B.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
from typing import Optional

import torch

from ..train.cli import add_engine_args, method_options, parse_option, progress_fn, resume_path
from ..train.loop import (StopRequest, Trainer, amp_dtype, autocast, build_optim, peak_memory, resolve_device,
                          save_adapters_from, setup_distributed, wrap_model)
from .model import TINY_CLIP, RetrievalModel, create_clip
from .readers import FORMATS, CaptionSplit, DataError, read_split

__all__ = ["main", "build_parser", "retrieval_loss", "objective", "evaluate_split", "build_retrieval_model"]

# MGA options per model when --option does not say (the tiny CLIP is 128 wide: a 128-d adapter would dwarf it)
_MGA_DEFAULTS = {TINY_CLIP: {"hidden": 64, "heads": 4}}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m rspeft_fast retrieval",
        description="Fine-tune an open_clip dual encoder with HarMA's MGA adapters for image-text retrieval, "
                    "select on the validation split, report Recall@1/5/10 and mR on the test split.",
    )
    p.add_argument("--model", default=TINY_CLIP, help="open_clip model name, e.g. ViT-B-32, ViT-B-32-quickgelu, ViT-L-14 (default %(default)s: a CPU-sized CLIP)")
    p.add_argument("--checkpoint", default=None, help="backbone weights (open_clip, OpenAI, GeoRSCLIP or RemoteCLIP state dict)")
    p.add_argument("--pretrained", default=None, help="an open_clip pretrained tag (downloads; needs the network)")
    p.add_argument("--option", action="append", type=parse_option, default=[], metavar="KEY=VALUE",
                   help="MGA option (MGAConfig), e.g. --option hidden=128 --option heads=8 (repeatable)")
    p.add_argument("--share-image-tower", action="store_true", help="the image adapters use the text tower's BiShare modules (HarMA paper)")
    p.add_argument("--data", default=None, help="HarMA json PREFIX, Karpathy json, precomp folder or GeoRSCLIP csv; default: embedded scene set")
    p.add_argument("--images", default=None, help="image root folder (paths in --data are relative to it)")
    p.add_argument("--format", default="auto", choices=FORMATS, help="data format (default %(default)s: detected)")
    p.add_argument("--encoding", default="utf-8", help="text encoding of csv / txt data (default %(default)s)")
    p.add_argument("--max-words", type=int, default=None, help="truncate cleaned captions to this many words")
    p.add_argument("--embedded-scale", type=float, default=1.0, help="embedded set size factor (1 = 240/60/60 images, 5 captions each)")
    p.add_argument("--triplet-weight", type=float, default=1.0, help="weight of the weighted triplet term (HarMA: 1)")
    p.add_argument("--margin", type=float, default=0.2)
    p.add_argument("--gamma", type=float, default=2.0)
    p.add_argument("--max-violation", action="store_true", help="hard-negative mining in the triplet term")
    p.add_argument("--triplet-diagonal-only", action="store_true",
                   help="HarMA's mask: only the pair itself is a positive in the triplet term (other captions of the same image count as negatives)")
    add_engine_args(p, epochs=10, batch_size=32, lr=2e-3, weight_decay=0.04)
    p.add_argument("--eval-batch-size", type=int, default=256)
    p.add_argument("--eval-only", action="store_true", help="evaluate the injected model (with --adapters) on the test split only")
    p.add_argument("--adapters", default=None, help="adapter file to start from (save_adapters format)")
    p.add_argument("--out", default=None, help="output folder (default runs/retrieval-<model>)")
    return p


RUN_KEYS = ("model", "checkpoint", "pretrained", "option", "share_image_tower", "data", "images", "format", "max_words",
            "embedded_scale", "triplet_weight", "margin", "gamma", "max_violation", "triplet_diagonal_only", "batch_size", "lr",
            "weight_decay", "warmup_steps", "clip_grad", "seed", "max_steps", "amp", "grad_checkpointing", "fsdp",
            "skip_bad_images", "adapters", "impl")


# --------------------------------------------------------------------------------------------------
# model


def build_retrieval_model(args) -> tuple:
    """``(RetrievalModel, tokenizer, train transform, eval transform)``: the open_clip model, injected (and
    ``--adapters`` loaded), with the learnable temperature."""
    from ..integration import inject, load_adapters
    from ..integration.config import config_for

    clip, tok, t_train, t_eval = create_clip(args.model, args.checkpoint, args.pretrained)
    opts = {**_MGA_DEFAULTS.get(args.model, {}), **method_options("mga", args.option)}
    opts.setdefault("impl", args.impl)
    if args.share_image_tower:
        opts["share_across_towers"] = True
    try:
        cfg = config_for("mga", **opts)
        inject(clip, cfg)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"cannot inject mga into {args.model!r}: {e}") from None
    if args.adapters:
        try:
            load_adapters(clip, args.adapters)
        except (OSError, ValueError, RuntimeError) as e:
            raise SystemExit(f"--adapters {args.adapters}: {e}") from None
    if args.grad_checkpointing:
        clip.set_grad_checkpointing(True)
    return RetrievalModel(clip), tok, t_train, t_eval


def _clip_blocks(model):
    from ..integration._blocks import ClipBlock

    return [m for m in model.modules() if ClipBlock is not None and isinstance(m, ClipBlock)]


# --------------------------------------------------------------------------------------------------
# data


class _Images(torch.utils.data.Dataset):
    """Images of a split through a transform: ``uint8 (N, 3, H, W)`` tensors (embedded set) or file paths."""

    def __init__(self, source, transform):
        self.source, self.transform = source, transform

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        from PIL import Image

        s = self.source[i]
        if isinstance(s, torch.Tensor):
            return self.transform(Image.fromarray(s.permute(1, 2, 0).numpy()))
        with Image.open(s) as im:
            return self.transform(im.convert("RGB"))


class _Pairs(torch.utils.data.Dataset):
    """One item per caption: ``(image, tokens, image id)``."""

    def __init__(self, images: _Images, tokens: torch.Tensor, txt_to_img):
        self.images, self.tokens, self.t2i = images, tokens, list(txt_to_img)

    def __len__(self):
        return len(self.t2i)

    def __getitem__(self, j):
        i = self.t2i[j]
        return self.images[i], self.tokens[j], i


def _embedded(args, size: int) -> dict:
    from ..data.scenes import CaptionedScenes

    out = {}
    for split in ("train", "val", "test"):
        s = CaptionedScenes.split(split, size=size, seed=args.seed, scale=args.embedded_scale)
        out[split] = CaptionSplit(list(s.images), s.captions, s.txt_to_img, source=f"embedded scenes ({split})")
    return out


def _drop_images(split: CaptionSplit, keep: set) -> CaptionSplit:
    remap = {old: new for new, old in enumerate(i for i in range(split.n_images) if i in keep)}
    caps = [(c, remap[i]) for c, i in zip(split.captions, split.txt_to_img) if i in remap]
    return CaptionSplit([p for i, p in enumerate(split.images) if i in keep], [c for c, _ in caps], [i for _, i in caps], split.source)


def load_splits(args, size: int, progress=None, splits=("train", "val", "test")) -> dict:
    """The splits as :class:`CaptionSplit`; every image file checked up front (unreadable ones listed or dropped)."""
    from ..train.data import check_images

    if args.data is None:
        return {k: v for k, v in _embedded(args, size).items() if k in splits}
    try:
        out = {s: read_split(args.data, s, args.format, args.images, args.encoding, args.max_words) for s in splits}
    except DataError as e:
        raise SystemExit(f"--data {args.data}: {e}") from None
    every = [(s, i) for s in splits for i in range(out[s].n_images)]
    ok = set(check_images([out[s].images[i] for s, i in every], workers=args.workers, skip_bad=args.skip_bad_images,
                          what=f"images of {args.data}", progress=progress))
    for s in splits:
        keep = {i for n, (s2, i) in enumerate(every) if s2 == s and n in ok}
        if len(keep) < out[s].n_images:
            out[s] = _drop_images(out[s], keep)
        if out[s].n_images == 0:
            raise SystemExit(f"--data {args.data}: no readable images in the {s} split")
    return out


# --------------------------------------------------------------------------------------------------
# objective and evaluation


def retrieval_loss(img, txt, temperature, ids, *, triplet_weight: float = 1.0, margin: float = 0.2, gamma: float = 2.0,
                   max_violation: bool = False, diagonal_only: bool = False, triplet_impl: str = "auto", world: int = 1):
    """HarMA's objective on one rank's batch: ``contrastive_loss(ids, τ) + triplet_weight · weighted_triplet_loss``
    (``img``, ``txt`` ``(B, E)`` L2-normalised, ``ids (B,)`` image ids; ``diagonal_only``: the triplet term without
    ids, HarMA's own mask). Under ``world`` > 1 both terms gather with gradients and the triplet term (a per-rank
    share of a sum) is multiplied by ``world`` (see the module docstring), so DDP's averaging gives the gradient
    of the whole global batch. Returns the scalar to backpropagate."""
    from ..ops.contrastive import contrastive_loss
    from ..ops.triplet import weighted_triplet_loss

    gather = world > 1
    loss = contrastive_loss(img, txt, ids=ids, temperature=temperature, gather=gather)
    if triplet_weight:
        trip = weighted_triplet_loss(img, txt, margin, gamma, max_violation, None if diagonal_only else ids, triplet_impl, gather)
        loss = loss + triplet_weight * world * trip
    return loss


def objective(args) -> dict:
    """The keyword arguments of :func:`retrieval_loss` that the command line sets."""
    return {"triplet_weight": args.triplet_weight, "margin": args.margin, "gamma": args.gamma,
            "max_violation": args.max_violation, "diagonal_only": args.triplet_diagonal_only,
            "triplet_impl": "reference" if args.impl == "reference" else "auto"}


@torch.no_grad()
def embed(model: RetrievalModel, images: _Images, tokens: torch.Tensor, args, progress=None):
    """L2-normalised embeddings of every image and caption, in batches: ``(img (N_img, E), txt (N_txt, E))`` fp32."""
    model.eval()
    dev = args._device
    loader = torch.utils.data.DataLoader(images, batch_size=args.eval_batch_size, shuffle=False, num_workers=args.workers)
    it = progress(loader, desc="embedding images", leave=False) if progress is not None else loader
    img = []
    for x in it:  # through forward(), so a DDP / FSDP2 wrapper runs its hooks (FSDP2 all-gathers the weights there)
        with autocast(args):
            img.append(model(x.to(dev, non_blocking=True), None)[0].float())
    txt = []
    for a in range(0, tokens.shape[0], args.eval_batch_size):
        with autocast(args):
            txt.append(model(None, tokens[a:a + args.eval_batch_size].to(dev))[1].float())
    return torch.cat(img), torch.cat(txt)


def evaluate_split(model, images: _Images, tokens: torch.Tensor, txt_to_img, args, progress=None) -> dict:
    """Recall@1/5/10 and mR (:func:`recall_at_k`) of a split, with ``n_images`` and ``n_captions``."""
    from .metrics import recall_at_k

    img, txt = embed(model, images, tokens, args, progress)
    m = recall_at_k(img @ txt.t(), torch.as_tensor(txt_to_img, device=img.device))
    m["n_images"], m["n_captions"] = int(img.shape[0]), int(txt.shape[0])
    return m


def _fmt(m: dict) -> str:
    return (f"mR {m['r_mean']:.2f} | i2t R@1/5/10 {m['txt_r1']:.1f}/{m['txt_r5']:.1f}/{m['txt_r10']:.1f} | "
            f"t2i R@1/5/10 {m['img_r1']:.1f}/{m['img_r5']:.1f}/{m['img_r10']:.1f}")


def _load_best(model: RetrievalModel, path: str) -> None:
    from safetensors.torch import load_file

    saved = load_file(path)
    params = dict(model.clip.named_parameters())
    with torch.no_grad():
        for n, t in saved.items():
            p = params[n]
            if hasattr(p, "device_mesh"):  # FSDP2 DTensor
                from torch.distributed.tensor import distribute_tensor

                p.copy_(distribute_tensor(t.to(p.device_mesh.device_type), p.device_mesh, p.placements))
            else:
                p.copy_(t)


# --------------------------------------------------------------------------------------------------
# the job


def main(argv: Optional[list] = None) -> int:
    from ..integration import trainable_parameters

    args = build_parser().parse_args(argv)
    dist = setup_distributed(args.fsdp)
    torch.manual_seed(args.seed)  # the same on every rank: the model is built identically everywhere
    random.seed(args.seed)
    args._device = dev = resolve_device(args.device, dist)
    out = args.out or os.path.join("runs", f"retrieval-{args.model}")
    ckpt_path = os.path.join(out, "checkpoint.pt")
    log = print if dist.is_main else (lambda *a, **k: None)
    resume_from = None if args.eval_only else resume_path(args, ckpt_path, log=lambda s: log(s, flush=True))
    progress = progress_fn(args, dist)

    model, tok, t_train, t_eval = build_retrieval_model(args)
    if dist.world > 1:  # then per-rank random streams (dropout, drop-path, mixup)
        torch.manual_seed(args.seed + dist.rank)
        random.seed(args.seed + dist.rank)
    size = int(model.clip.visual.image_size[0] if isinstance(model.clip.visual.image_size, (tuple, list)) else model.clip.visual.image_size)
    splits = load_splits(args, size, progress, ("test",) if args.eval_only else ("train", "val", "test"))
    tokens = {k: tok(v.captions) for k, v in splits.items()}
    images = {k: _Images(v.images, t_eval) for k, v in splits.items()}
    model.to(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    net = wrap_model(model, args, dist, _clip_blocks)
    src = args.data or "embedded scene set"
    log(f"model {args.model} + mga | {trainable_parameters(model.clip)} | device {dev} | img {size} | data {src}: "
        + ", ".join(f"{k} {v.n_images} images / {v.n_captions} captions" for k, v in splits.items())
        + (f" | {dist.world} processes" if dist.world > 1 else ""), flush=True)

    def ev(split):
        return evaluate_split(net, images[split], tokens[split], splits[split].txt_to_img, args, progress)

    if args.eval_only:
        m = ev("test")
        log(f"test: {_fmt(m)}", flush=True)
        if dist.is_main:
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "metrics.json"), "w") as f:
                json.dump({"model": args.model, "adapters": args.adapters, "checkpoint": args.checkpoint,
                           "zero_shot": m, "test": m}, f, indent=1)
        return 0

    train = splits["train"]
    pairs = _Pairs(_Images(train.images, t_train), tokens["train"], train.txt_to_img)
    from ..train.data import ResumableSampler, SeededSamples

    sampler = ResumableSampler(len(pairs), args.seed, args.batch_size, dist.rank, dist.world)
    loader = torch.utils.data.DataLoader(SeededSamples(pairs, args.seed), batch_size=args.batch_size, sampler=sampler,
                                         drop_last=dist.world > 1 or len(pairs) > args.batch_size, num_workers=args.workers,
                                         generator=torch.Generator().manual_seed(args.seed), pin_memory=dev.type == "cuda")

    obj = objective(args)

    def loss_fn(batch):
        x, t, ids = batch
        x, t, ids = x.to(dev, non_blocking=True), t.to(dev, non_blocking=True), ids.to(dev)
        net.train()
        with autocast(args):
            img, txt, temp = net(x, t)
        return retrieval_loss(img, txt, temp, ids, **obj, world=dist.world), x.shape[0]

    n_batches = len(loader)
    steps_per_epoch = n_batches if args.max_steps is None else min(n_batches, args.max_steps)
    opt, sched = build_optim(model, args, total_steps=max(1, steps_per_epoch * args.epochs), betas=(0.9, 0.98))
    scaler = torch.amp.GradScaler(dev.type) if amp_dtype(args) == torch.float16 else None
    stop = StopRequest()
    trainer = Trainer(model, loader, opt, sched, scaler, args, steps_per_epoch, progress, stop, ckpt_path, loss_fn, RUN_KEYS, dist)
    if resume_from is not None:
        trainer.load_checkpoint(resume_from)
    state = trainer.state
    best_path = os.path.join(out, "adapters.safetensors")
    if "zero_shot" not in state.extra:
        state.extra["zero_shot"] = ev("test")
        log(f"zero-shot test: {_fmt(state.extra['zero_shot'])}", flush=True)
    if resume_from is not None:
        log(trainer.resumed_text(resume_from), flush=True)

    with stop.installed():
        while state.epoch < args.epochs:
            if not trainer.train_epoch():
                break
            m = trainer.epoch_metrics()
            m["val"] = ev("val")
            m["epoch"] = state.epoch + 1
            m["temperature"] = float(model.temperature().detach())
            m["peak_memory"] = peak_memory(dev)
            best = state.extra.get("best_val")
            if best is None or m["val"]["r_mean"] > best["r_mean"]:
                state.extra["best_val"], state.extra["selected_epoch"] = m["val"], m["epoch"]
                save_adapters_from(model, model.clip, best_path, dist)
            trainer.end_epoch(m)
            log(f"epoch {m['epoch']}/{args.epochs}  loss {m['train_loss']:.4f}  val {_fmt(m['val'])}  τ {m['temperature']:.4f}  "
                f"{m['images_per_s']:.1f} pairs/s  peak mem {m['peak_memory']}", flush=True)
            if trainer._stop_now():
                trainer.save_checkpoint()
                break
        if stop.signum is not None:
            log(f"stopped by {signal.Signals(stop.signum).name} at epoch {state.epoch + 1}, step {state.epoch_step}; "
                f"checkpoint written to {ckpt_path} (continue with --resume)", flush=True)
            return 128 + int(stop.signum)
        if args.ckpt_every:
            trainer.save_checkpoint()

    if "selected_epoch" in state.extra:
        _load_best(model, best_path)
    else:  # no epoch ran (e.g. --epochs 0): the starting model
        state.extra["best_val"], state.extra["selected_epoch"] = ev("val"), 0
        save_adapters_from(model, model.clip, best_path, dist)
    test = ev("test")
    log(f"selected epoch {state.extra['selected_epoch']} (best validation mR {state.extra['best_val']['r_mean']:.2f}); "
        f"test: {_fmt(test)} (zero-shot mR {state.extra['zero_shot']['r_mean']:.2f})", flush=True)
    if dist.is_main:
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump({"model": args.model, "zero_shot": state.extra["zero_shot"], "val": state.extra["best_val"], "test": test,
                       "selected_epoch": state.extra["selected_epoch"], "history": state.history,
                       "args": {k: v for k, v in vars(args).items() if not k.startswith("_")}, "resumed_from": resume_from},
                      f, indent=1, default=str)
    log(f"saved the selected epoch's adapter weights to {best_path}", flush=True)
    return 0




if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
