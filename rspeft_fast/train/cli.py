"""Classification fine-tuning: ``python -m rspeft_fast train --model vit_base_patch16_224 --method mufa [--data DIR] ...``

A timm model (:func:`rspeft_fast.integration.models.create_classifier`), frozen, with the adapters of ``--method``
injected (:func:`rspeft_fast.inject`), trained by the engine of :mod:`rspeft_fast.train.loop` (AdamW, warm-up +
cosine, autocast, clipping, checkpoints, ``--resume``, DDP / FSDP2 under ``torchrun``); per epoch the train loss,
the validation accuracy, images/s and peak memory; at the end the adapter weights (``OUT/adapters.safetensors``)
and the metrics (``OUT/metrics.json``).

Data: ``--data DIR`` in the layout of UCM / NWPU-RESISC45 / AID (one folder per class; or ``DIR/train`` and
``DIR/val`` each so), read with torchvision's ``ImageFolder``, every file checked before training; transforms
from timm's ``resolve_data_config`` + ``create_transform`` (the model's mean / std, interpolation and crop;
RandomResizedCrop + flips + colour jitter, ``--aa`` RandAugment, ``--mixup`` / ``--cutmix``, ``--smoothing``);
without ``--data`` the embedded procedural texture set (:mod:`rspeft_fast.data`) through the same transforms.

Checkpoints and resuming (nothing is lost on interruption):

* ``--ckpt-every N`` writes ``OUT/checkpoint.pt`` every N optimizer steps (and at the end of the run); on
  SIGINT / SIGTERM the loop finishes the step in flight, writes the checkpoint and exits with 128 + the signal
  number (130 for Ctrl-C, 143 for SIGTERM); a second signal aborts at once. Every write is atomic.
* ``--resume [PATH]`` (default ``OUT/checkpoint.pt``; a bare ``--resume`` starts afresh when that file does not
  exist yet) restores the trainable tensors, optimizer, LR scheduler, fp16 GradScaler, RNG states and the data
  position, and refuses other settings that shape the run (model, method, options, data, batch size, lr,
  seed, augmentation, ...) or another frozen backbone. ``--epochs`` may grow (the cosine schedule is then
  re-targeted to the new end from the current step); the checkpoint interval, workers and progress may change.
  On CPU a resumed run ends with bit-for-bit the adapter weights of an uninterrupted one.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
from dataclasses import asdict
from typing import Optional

import torch
from torch import nn

from ..integration.families import block_modules
from .loop import (StopRequest, Trainer, amp_dtype, autocast, build_optim, peak_memory, resolve_device, save_adapters_from,
                   setup_distributed, wrap_model)

__all__ = ["main", "build_parser", "parse_option", "method_options", "add_engine_args", "progress_fn", "resume_path"]


# --------------------------------------------------------------------------------------------------
# arguments shared by the jobs


def parse_option(s: str):
    """``key=value`` → ``(key, value string)`` (``-`` in keys → ``_``); the value is coerced for the method by
    :func:`rspeft_fast.integration.config.coerce_options` (``rates=8,16,32`` → ``(8, 16, 32)``, ``"4"`` → 4, ...)."""
    if "=" not in s:
        raise argparse.ArgumentTypeError(f"--option expects key=value, got {s!r}")
    k, v = s.split("=", 1)
    return k.replace("-", "_"), v


def parse_model_arg(s: str):
    """``key=value`` for a model constructor: JSON values (``depth=2`` → 2), ``a,b`` of ints → a tuple."""
    k, v = parse_option(s)
    try:
        val = json.loads(v)
    except json.JSONDecodeError:
        val = v
    if isinstance(val, str) and "," in val:
        try:
            val = tuple(int(t) for t in val.split(","))
        except ValueError:
            pass
    return k, tuple(val) if isinstance(val, list) else val


def method_options(method: str, options) -> dict:
    """``--option`` pairs coerced for ``method`` (one-line ``SystemExit`` naming a bad option)."""
    from ..integration.config import OptionError, coerce_options

    try:
        return coerce_options(method, dict(options))
    except OptionError as e:
        raise SystemExit(f"--option: {e}") from None


def add_engine_args(p: argparse.ArgumentParser, *, epochs: int, batch_size: int, lr: float, weight_decay: float) -> None:
    """The training-engine options both jobs share."""
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--batch-size", type=int, default=batch_size, help="per process (default %(default)s)")
    p.add_argument("--lr", type=float, default=lr, help="peak learning rate (default %(default)s)")
    p.add_argument("--weight-decay", type=float, default=weight_decay)
    p.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps (default: 5%% of all steps)")
    p.add_argument("--clip-grad", type=float, default=None, metavar="NORM", help="clip the gradient norm (default: off)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--impl", default="auto", choices=["auto", "reference", "triton"], help="adapter kernels (default %(default)s)")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"], help="autocast: auto = bf16 on CUDA, off on CPU")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute the backbone blocks in the backward (less memory)")
    p.add_argument("--fsdp", action="store_true", help="shard the injected model with FSDP2 fully_shard (under torchrun)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (default %(default)s)")
    p.add_argument("--skip-bad-images", action="store_true", help="drop unreadable images (with a warning) instead of stopping")
    p.add_argument("--max-steps", type=int, default=None, help="stop each epoch after this many steps (smoke tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--ckpt-every", type=int, default=None, metavar="N",
                   help="write an atomic checkpoint (OUT/checkpoint.pt) every N optimizer steps and at the end; "
                        "one is always written on SIGINT/SIGTERM")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                   help="resume from PATH (default OUT/checkpoint.pt; bare --resume starts afresh if it does not exist)")
    p.add_argument("--stop-after-steps", type=int, default=None, help=argparse.SUPPRESS)  # test hook: SIGTERM to self


def progress_fn(args, dist=None):
    if args.no_progress or (dist is not None and not dist.is_main):
        def progress(it, **_):
            return it
        return progress
    from tqdm.auto import tqdm

    return tqdm


def resume_path(args, ckpt_path: str, log=print) -> Optional[str]:
    """The checkpoint ``--resume`` names (None: start afresh); checks the checkpoint options first."""
    if args.ckpt_every is not None and args.ckpt_every <= 0:
        raise SystemExit(f"--ckpt-every must be a positive number of steps, got {args.ckpt_every}")
    if getattr(args, "fsdp", False) and (args.ckpt_every or args.resume is not None):
        raise SystemExit("--fsdp: training checkpoints (--ckpt-every, --resume) are not supported with FSDP2 sharding yet; "
                         "use DDP (torchrun without --fsdp) for resumable runs")
    if args.resume is None:
        return None
    path = args.resume or ckpt_path
    if not os.path.isfile(path):
        if args.resume:
            raise SystemExit(f"--resume {args.resume}: no such file")
        log(f"--resume: no checkpoint at {path} yet; starting afresh")
        return None
    return path


def build_parser() -> argparse.ArgumentParser:
    from ..integration.config import METHODS

    p = argparse.ArgumentParser(
        prog="python -m rspeft_fast train",
        description="Fine-tune a timm model with parameter-efficient adapters (frozen backbone) and save the adapter weights.",
    )
    p.add_argument("--model", default="vit_base_patch16_224", help="timm model name (ViT, Swin or ConvNeXt; default %(default)s)")
    p.add_argument("--method", default="mufa", choices=[m for m in METHODS if m != "mga"] + ["mga"], help="PEFT method (default %(default)s)")
    p.add_argument("--option", action="append", type=parse_option, default=[], metavar="KEY=VALUE",
                   help="method option, e.g. --option rates=8,16,32 --option placement=serial --option rank=16 (repeatable)")
    p.add_argument("--data", default=None, help="image folder (one sub-folder per class, or train/ and val/); default: embedded texture set")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of each class held out for validation when DIR has no val/ (default %(default)s)")
    p.add_argument("--embedded-per-class", type=int, default=40, help="embedded set: training images per class (8 classes; val gets a quarter)")
    add_engine_args(p, epochs=3, batch_size=32, lr=2e-3, weight_decay=0.01)
    p.add_argument("--model-arg", action="append", type=parse_model_arg, default=[], metavar="KEY=VALUE",
                   help="extra timm.create_model argument, e.g. --model-arg depth=6 --model-arg drop_path_rate=0.1 (repeatable)")
    p.add_argument("--global-pool", default=None, help="timm global_pool (e.g. avg, token); default: the model's")
    p.add_argument("--img-size", type=int, default=None, help="input size (default: the model's on CUDA, 64 on CPU)")
    p.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights (needs the network)")
    p.add_argument("--checkpoint", default=None, help="load backbone weights from a local file (timm/safetensors/torch)")
    p.add_argument("--out", default=None, help="output folder (default runs/<model>-<method>)")
    aug = p.add_argument_group("augmentation (timm create_transform / Mixup; defaults as timm's fine-tuning, plus vertical flips)")
    aug.add_argument("--scale", type=float, nargs=2, default=(0.08, 1.0), metavar=("MIN", "MAX"), help="RandomResizedCrop scale")
    aug.add_argument("--hflip", type=float, default=0.5)
    aug.add_argument("--vflip", type=float, default=0.5, help="vertical flips (overhead imagery has no up; default %(default)s)")
    aug.add_argument("--color-jitter", type=float, default=0.4)
    aug.add_argument("--aa", default=None, help="timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1 (RandAugment); default off")
    aug.add_argument("--reprob", type=float, default=0.0, help="random-erasing probability")
    aug.add_argument("--smoothing", type=float, default=0.1, help="label smoothing (default %(default)s)")
    aug.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0 = off)")
    aug.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (0 = off)")
    return p


# the arguments that shape the training trajectory (compared on --resume; epochs apart: it may grow)
RUN_KEYS = ("model", "method", "option", "data", "val_fraction", "embedded_per_class", "batch_size", "lr",
            "weight_decay", "warmup_steps", "clip_grad", "model_arg", "global_pool", "img_size", "seed", "max_steps",
            "pretrained", "checkpoint", "amp", "grad_checkpointing", "fsdp", "skip_bad_images", "scale", "hflip", "vflip",
            "color_jitter", "aa", "reprob", "smoothing", "mixup", "cutmix")


# --------------------------------------------------------------------------------------------------
# model


def build_model(args, num_classes: int, img_size) -> nn.Module:
    from ..integration import inject
    from ..integration.config import config_for
    from ..integration.models import ModelBuildError, create_classifier

    try:
        model = create_classifier(args.model, num_classes=num_classes, pretrained=args.pretrained, checkpoint=args.checkpoint,
                                  img_size=img_size, global_pool=args.global_pool, model_args=dict(args.model_arg))
    except ModelBuildError as e:
        raise SystemExit(str(e)) from None
    opts = method_options(args.method, args.option)
    opts.setdefault("impl", args.impl)
    cfg = config_for(args.method, **opts)
    try:
        inject(model, cfg)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"cannot inject {args.method!r} into {args.model!r}: {e}") from None
    if args.grad_checkpointing:
        from ..integration.families import set_grad_checkpointing

        try:
            set_grad_checkpointing(model, True)
        except ValueError as e:
            raise SystemExit(f"--grad-checkpointing: {e}") from None
    return model


@torch.no_grad()
def evaluate(model, loader, args) -> float:
    model.eval()
    dev = args._device
    correct = total = 0
    for x, y in loader:
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        with autocast(args):
            pred = model(x).argmax(-1)
        correct += (pred == y).sum().item()
        total += y.numel()
    return 100.0 * correct / max(total, 1)


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    from ..integration import trainable_parameters
    from .data import build_classification_data, class_names

    dist = setup_distributed(args.fsdp)
    torch.manual_seed(args.seed)  # the same on every rank: the model is built identically everywhere
    random.seed(args.seed)
    args._device = dev = resolve_device(args.device, dist)
    if args.img_size is None:
        args.img_size = None if dev.type == "cuda" else 64
    out = args.out or os.path.join("runs", f"{args.model}-{args.method}")
    ckpt_path = os.path.join(out, "checkpoint.pt")
    log = print if dist.is_main else (lambda *a, **k: None)
    resume_from = resume_path(args, ckpt_path, log=lambda s: log(s, flush=True))
    progress = progress_fn(args, dist)

    # classes first (folder scan is cheap), so the head is created with the right size
    if args.data is None:
        from ..data import CLASSES

        n_classes = len(CLASSES)
    else:
        n_classes = len(class_names(args.data))
    model = build_model(args, n_classes, args.img_size)
    if dist.world > 1:  # then per-rank random streams (dropout, drop-path, mixup)
        torch.manual_seed(args.seed + dist.rank)
        random.seed(args.seed + dist.rank)
    try:  # timm's Mixup draws from numpy
        import numpy as np

        np.random.seed(args.seed + dist.rank)
    except ImportError:  # pragma: no cover
        pass
    train_loader, val_loader, classes, data_cfg = build_classification_data(args, model, args.img_size, dist, progress)
    img_size = int(data_cfg["input_size"][-1])
    model.to(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    net = wrap_model(model, args, dist, block_modules)

    mixup = None
    if args.mixup > 0 or args.cutmix > 0:
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy

        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing, num_classes=len(classes))
        crit = SoftTargetCrossEntropy()
    else:
        crit = nn.CrossEntropyLoss(label_smoothing=args.smoothing)

    def loss_fn(batch):
        x, y = batch
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        if mixup is not None:
            x, y = mixup(x, y)
        net.train()
        with autocast(args):
            loss = crit(net(x), y)
        return loss, x.shape[0]

    n_batches = len(train_loader)
    steps_per_epoch = n_batches if args.max_steps is None else min(n_batches, args.max_steps)
    opt, sched = build_optim(model, args, total_steps=max(1, steps_per_epoch * args.epochs))
    scaler = torch.amp.GradScaler(dev.type) if amp_dtype(args) == torch.float16 else None
    stop = StopRequest()
    trainer = Trainer(model, train_loader, opt, sched, scaler, args, steps_per_epoch, progress, stop, ckpt_path,
                      loss_fn, RUN_KEYS, dist)
    if resume_from is not None:
        trainer.load_checkpoint(resume_from)
    state = trainer.state

    tp = trainable_parameters(model)
    src = args.data or f"embedded textures ({len(classes)} classes)"
    log(f"model {args.model} + {args.method} | {tp} | device {dev} | img {img_size} | data {src}: "
        f"{len(train_loader.dataset)} train / {len(val_loader.dataset)} val"
        + (f" | {dist.world} processes" if dist.world > 1 else ""), flush=True)
    if resume_from is not None:
        log(trainer.resumed_text(resume_from), flush=True)

    with stop.installed():
        while state.epoch < args.epochs:
            if not trainer.train_epoch():
                break
            m = trainer.epoch_metrics()
            m["val_acc"] = evaluate(net, val_loader, args)
            m["epoch"] = state.epoch + 1
            m["peak_memory"] = peak_memory(dev)
            trainer.end_epoch(m)
            log(f"epoch {m['epoch']}/{args.epochs}  train_loss {m['train_loss']:.4f}  val_acc {m['val_acc']:.2f}%  "
                f"{m['images_per_s']:.1f} img/s  peak mem {m['peak_memory']}", flush=True)
            if trainer._stop_now():  # arrived during the evaluation: the epoch is complete
                trainer.save_checkpoint()
                break
        if stop.signum is not None:
            log(f"stopped by {signal.Signals(stop.signum).name} at epoch {state.epoch + 1}, step {state.epoch_step}; "
                f"checkpoint written to {ckpt_path} (continue with --resume)", flush=True)
            return 128 + int(stop.signum)
        if args.ckpt_every:
            trainer.save_checkpoint()

        path = os.path.join(out, "adapters.safetensors")
        save_adapters_from(model, model, path, dist)
        if dist.is_main:
            with open(os.path.join(out, "metrics.json"), "w") as f:
                json.dump({"args": {k: v for k, v in vars(args).items() if not k.startswith("_")}, "classes": classes,
                           "data_config": data_cfg, "trainable": tp._asdict(), "state": asdict(state),
                           "resumed_from": resume_from}, f, indent=1, default=str)
    log(f"saved adapter weights to {path} (chance accuracy {100.0 / len(classes):.1f}%)", flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
