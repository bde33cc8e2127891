"""Classification fine-tuning: ``python -m rspeft_fast train --model vit_base_patch16_224 --method mufa [--data DIR] ...``

A job description for the engine (:mod:`rspeft_fast.train.engine`): the model is a timm / HF classifier
(:func:`rspeft_fast.integration.models.create_classifier`), frozen, with the adapters of ``--method`` injected
(:func:`rspeft_fast.inject`); the objective cross-entropy (label smoothing, or timm's Mixup / CutMix with soft
targets); the metric the validation accuracy. The engine does the rest (AdamW, warm-up + cosine, autocast,
clipping, checkpoints, ``--resume``, DDP / FSDP2 under ``torchrun``); per epoch the train loss, the validation
accuracy, images/s and peak memory; at the end the adapter weights (``OUT/adapters.safetensors``) and the metrics
(``OUT/metrics.json``).

Data: ``--data DIR`` in the layout of UCM / NWPU-RESISC45 / AID (one folder per class; or ``DIR/train`` and
``DIR/val`` each so), read with torchvision's ``ImageFolder``, every file checked before training; transforms
from timm's ``resolve_data_config`` + ``create_transform`` (the model's mean / std, interpolation and crop;
RandomResizedCrop + flips + colour jitter, ``--aa`` RandAugment, ``--mixup`` / ``--cutmix``, ``--smoothing``);
without ``--data`` the embedded procedural texture set (:mod:`rspeft_fast.data`) through the same transforms.

Checkpoints and resuming (nothing is lost on interruption):

* ``--ckpt-every N`` writes ``OUT/checkpoint.pt`` every N optimizer steps (and at the end of the run); on
  SIGINT / SIGTERM the loop finishes the step in flight (or the evaluation, or the checkpoint write), writes the
  checkpoint and exits with 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM); a signal during the final
  save lets it finish, then exits so. A second signal aborts at once. Every write is atomic.
* One job per ``--out`` (a lock naming the other job's pid); a folder holding a checkpoint is not trained over
  afresh without ``--resume`` or ``--overwrite``; the folder's room is checked before the first step.
* ``--resume [PATH]`` (default ``OUT/checkpoint.pt``; a bare ``--resume`` starts afresh when that file does not
  exist yet) restores the trainable tensors, optimizer, LR scheduler, fp16 GradScaler, RNG states and the data
  position, and refuses other settings that shape the run (every option but the run-control ones: model,
  method, options, data, batch size, lr, seed, augmentation, ...) or another frozen backbone. ``--epochs`` may grow (the cosine schedule is then
  re-targeted to the new end from the current step); the checkpoint interval, workers and progress may change.
  On CPU a resumed run ends with bit-for-bit the adapter weights of an uninterrupted one.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from typing import Optional

import torch
from torch import nn

from ..integration.families import block_modules
from .engine import Job, Settings, add_engine_args, method_options, parse_option, run

__all__ = ["main", "build_parser", "build_model", "evaluate", "Classification"]


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
    add_engine_args(p, epochs=3, batch_size=32, lr=2e-3, weight_decay=0.01, out_help="output folder (default runs/<model>-<method>)")
    p.add_argument("--model-arg", action="append", type=parse_model_arg, default=[], metavar="KEY=VALUE",
                   help="extra timm.create_model argument, e.g. --model-arg depth=6 --model-arg drop_path_rate=0.1 (repeatable)")
    p.add_argument("--global-pool", default=None, help="timm global_pool (e.g. avg, token); default: the model's")
    p.add_argument("--img-size", type=int, default=None, help="input size (default: the model's on CUDA, 64 on CPU)")
    p.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights (needs the network)")
    p.add_argument("--checkpoint", default=None, help="load backbone weights from a local file (timm/safetensors/torch)")
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


# --------------------------------------------------------------------------------------------------
# model and metric


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
def evaluate(model, loader, ctx) -> float:
    """Top-1 accuracy (%) of ``model`` over ``loader``."""
    model.eval()
    correct = total = 0
    for x, y in loader:
        x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
        with ctx.autocast():
            pred = model(x).argmax(-1)
        correct += (pred == y).sum().item()
        total += y.numel()
    return 100.0 * correct / max(total, 1)


# --------------------------------------------------------------------------------------------------
# the job


class Classification(Job):
    """Scene classification: cross-entropy on a folder-per-class set, validation accuracy per epoch, the last
    epoch's adapters saved."""

    name = "train"

    def model(self, ctx):
        a = self.args
        self.img_size = a.img_size if a.img_size is not None else (None if ctx.device.type == "cuda" else 64)
        if a.data is None:  # classes first (the folder scan is cheap), so the head is created with the right size
            from ..data import CLASSES

            n_classes = len(CLASSES)
        else:
            from .data import class_names

            n_classes = len(class_names(a.data))
        self._model = build_model(a, n_classes, self.img_size)
        return self._model

    def data(self, ctx, model):
        from .data import classification_datasets

        tr, va, self.classes, self.data_cfg, workers = classification_datasets(self.args, model, self.img_size, ctx.progress)
        self.n_train, self.n_val = len(tr), len(va)
        self.val_loader = torch.utils.data.DataLoader(va, batch_size=ctx.settings.batch_size * 2, shuffle=False,
                                                      num_workers=workers, pin_memory=ctx.device.type == "cuda")
        return ctx.train_loader(tr, workers=workers)

    def objective(self, ctx, net):
        a = self.args
        mixup = None
        if a.mixup > 0 or a.cutmix > 0:
            from timm.data import Mixup
            from timm.loss import SoftTargetCrossEntropy

            mixup = Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, label_smoothing=a.smoothing, num_classes=len(self.classes))
            crit = SoftTargetCrossEntropy()
        else:
            crit = nn.CrossEntropyLoss(label_smoothing=a.smoothing)

        def loss_fn(batch):
            x, y = batch
            x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
            if mixup is not None:
                x, y = mixup(x, y)
            net.train()
            with ctx.autocast():
                loss = crit(net(x), y)
            return loss, x.shape[0]

        return loss_fn

    def evaluate(self, ctx, net):
        return {"val_acc": evaluate(net, self.val_loader, ctx)}

    def shard_modules(self, model):
        return block_modules(model)

    def describe(self, ctx, model):
        from ..integration import trainable_parameters

        a, d = self.args, ctx.dist
        src = a.data or f"embedded textures ({len(self.classes)} classes)"
        return (f"model {a.model} + {a.method} | {trainable_parameters(model)} | device {ctx.device} | "
                f"img {int(self.data_cfg['input_size'][-1])} | data {src}: {self.n_train} train / {self.n_val} val"
                + (f" | {d.world} processes" if d.world > 1 else ""))

    def epoch_line(self, m, epochs):
        return (f"epoch {m['epoch']}/{epochs}  train_loss {m['train_loss']:.4f}  val_acc {m['val_acc']:.2f}%  "
                f"{m['images_per_s']:.1f} img/s  peak mem {m['peak_memory']}")

    def report(self, ctx, net, state):
        from ..integration import trainable_parameters

        ctx.log(f"saved adapter weights to {os.path.join(ctx.settings.out, 'adapters.safetensors')} "
                f"(chance accuracy {100.0 / len(self.classes):.1f}%)")
        return {"classes": self.classes, "data_config": self.data_cfg,
                "trainable": trainable_parameters(self._model)._asdict(),
                "state": asdict(state)}


def main(argv: Optional[list] = None, *, hooks=()) -> int:
    """``python -m rspeft_fast train ...``; ``hooks``: phase hooks (:class:`~rspeft_fast.train.engine.Settings`)."""
    args = build_parser().parse_args(argv)
    out = args.out or os.path.join("runs", f"{args.model}-{args.method}")
    return run(Classification(args), Settings.from_args(args, out=out, hooks=hooks))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
