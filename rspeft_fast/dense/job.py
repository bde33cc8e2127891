"""The dense jobs: ``python -m rspeft_fast segment`` (semantic segmentation) and ``python -m rspeft_fast change``
(change detection), UPetu's protocol (SPEC §6).

1. a timm backbone (``--model``; ``--pretrained`` / ``--checkpoint`` as for ``train``), frozen, ``--method``
   injected (default ``eqam+capm``), read at 4 levels with CAPM per level (:mod:`rspeft_fast.dense.model`),
   smp's UperNet + 1×1 head; change detection: one Siamese encoder for both dates, ``|f_A − f_B|`` fusion;
2. the untrained model's test scores (adapters and decoder at initialisation);
3. training on random ``--crop`` crops (aligned scale-crop, flips, rot90; photometric jitter on images only),
   cross-entropy with ignore index 255 (``--dice``, ``--class-weights``), on the engine of
   :mod:`rspeft_fast.train.loop` (AdamW, warm-up + cosine, autocast, checkpoints, bit-exact ``--resume``, DDP);
4. after each epoch the val split scored whole by a sliding window (``--crop``, ``--stride``); the epoch with
   the best val mIoU (change: F1 of the change class) is selected, its adapters and decoder kept;
5. the selected epoch's test scores, once, at the end.

Outputs: ``OUT/adapters.safetensors`` (:func:`rspeft_fast.save_adapters` of the backbone: the injected adapters and
stage prompts), ``OUT/decoder.safetensors`` (everything trained after the backbone: level prompts, ViT pyramid,
change fusion, UperNet, head, BatchNorm statistics included), ``OUT/metrics.json`` (``model``, ``method``,
``untrained``, ``val``, ``test``, ``selected_epoch``, ``params`` {``adapters``, ``adapters_pct_of_backbone``,
``decoder``, ``backbone``}, ``history``, ``notes``, ``args``). Never whole models.

Without ``--data``: the embedded synthetic set of the task (:mod:`rspeft_fast.data.dense_synth`), written to a
temporary folder in the users' layout and read by the same readers, and — unless ``--model`` is given — a
CPU-sized ConvNeXt (``convnext_atto``, 64-channel decoder, 64-pixel crops).

The job is a description (:class:`DenseTask`: model, data, objective, evaluation, selection score) run by
:func:`run`, which holds the engine wiring only.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
from typing import Optional

import torch
from torch import nn

from ..train.cli import add_engine_args, method_options, parse_model_arg, parse_option, progress_fn, resume_path
from ..train.loop import (StopRequest, Trainer, amp_dtype, autocast, build_optim, peak_memory, resolve_device,
                          setup_distributed, wrap_model)

__all__ = ["build_parser", "DenseTask", "run", "main_segment", "main_change", "EMBEDDED_MODEL"]

EMBEDDED_MODEL = "convnext_atto"  # the CPU-sized backbone of the embedded runs
PAPER_MODEL = "convnext_base"  # UPetu's backbone: the default with --data


# --------------------------------------------------------------------------------------------------
# options


def build_parser(task: str) -> argparse.ArgumentParser:
    from .readers import FORMATS

    what = "semantic segmentation" if task == "segment" else "change detection (two dates, Siamese encoder)"
    p = argparse.ArgumentParser(
        prog=f"python -m rspeft_fast {task}",
        description=f"Fine-tune a frozen timm backbone with PEFT adapters + CAPM per level + an UperNet decoder for {what}; "
                    "select on val (sliding-window inference), report the test split.")
    p.add_argument("--model", default=None,
                   help=f"timm backbone (ConvNeXt, Swin, ResNet, ViT, DeiT, Eva); default {PAPER_MODEL} with --data, "
                        f"{EMBEDDED_MODEL} on the embedded set")
    p.add_argument("--method", default="eqam+capm", help="PEFT method of rspeft_fast.inject (default %(default)s, UPetu)")
    p.add_argument("--option", action="append", type=parse_option, default=[], metavar="KEY=VALUE",
                   help="method option, e.g. --option hidden=16 --option num_prompts=8 (repeatable)")
    p.add_argument("--model-arg", action="append", type=parse_model_arg, default=[], metavar="KEY=VALUE",
                   help="extra timm.create_model argument (repeatable)")
    p.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights (needs the network)")
    p.add_argument("--checkpoint", default=None, help="backbone weights from a local file (timm / safetensors / torch)")
    p.add_argument("--data", default=None, help="dataset root (see --format); default: the embedded synthetic set")
    p.add_argument("--format", default="auto", choices=FORMATS, help="dataset layout (default %(default)s: detected)")
    if task == "segment":
        p.add_argument("--classes", default=None, help="folders layout without classes.txt: N or name,name,...")
        p.add_argument("--ignore-class", action="append", default=[], metavar="NAME",
                       help="potsdam: a class scored as ignore (e.g. clutter; repeatable)")
    else:
        p.add_argument("--fusion", default="diff", choices=["diff", "concat"], help="per-level fusion of the two dates (default |fA - fB|)")
    p.add_argument("--crop", type=int, default=None, help="training crop and sliding-window size (default 512; embedded 64)")
    p.add_argument("--stride", type=int, default=None, help="sliding-window stride (default 2/3 of --crop)")
    p.add_argument("--scale", type=float, nargs=2, default=(0.5, 2.0), metavar=("MIN", "MAX"), help="random scale range")
    p.add_argument("--jitter", type=float, default=0.2, help="photometric jitter strength on images (0 = off)")
    p.add_argument("--decoder-channels", type=int, default=None, help="UperNet width (default 256; embedded 64)")
    p.add_argument("--prompts", type=int, default=None,
                   help="CAPM prompts per level added before the decoder (default: 8, or none when the backbone carries "
                        "stage CAPMs / is a ConvNeXt, whose method decides)")
    p.add_argument("--dice", type=float, default=0.0, help="weight of a Dice term added to the cross-entropy (default 0)")
    p.add_argument("--class-weights", default=None, help="cross-entropy class weights, comma-separated (e.g. 1,10 for change)")
    p.add_argument("--eval-batch-size", type=int, default=8, help="sliding windows per forward")
    p.add_argument("--embedded-size", type=int, nargs=3, default=None, metavar=("TRAIN", "VAL", "TEST"),
                   help="embedded set: samples per split (default 48 12 12)")
    p.add_argument("--embedded-tile", type=int, default=None, help="embedded set: tile size (default 96; change 64)")
    add_engine_args(p, epochs=8, batch_size=8, lr=2e-3, weight_decay=0.01)
    p.add_argument("--out", default=None, help=f"output folder (default runs/{task}-<model>-<method>)")
    return p


_CONTROL = {"epochs", "device", "workers", "no_progress", "ckpt_every", "resume", "stop_after_steps", "out", "eval_batch_size"}


def run_keys(args) -> tuple:
    """The options that shape the training trajectory (compared on ``--resume``): all but run control."""
    return tuple(k for k in sorted(vars(args)) if not k.startswith("_") and k not in _CONTROL)


def _fill_defaults(args) -> None:
    embedded = args.data is None
    if args.model is None:
        args.model = EMBEDDED_MODEL if embedded else PAPER_MODEL
    small = embedded and args.model == EMBEDDED_MODEL
    if args.crop is None:
        args.crop = 64 if small else 512
    if args.stride is None:
        args.stride = max(1, args.crop * 2 // 3)
    if args.decoder_channels is None:
        args.decoder_channels = 64 if small else 256
    if args.crop <= 0 or not 0 < args.stride <= args.crop:
        raise SystemExit(f"--crop {args.crop} --stride {args.stride}: need 0 < stride <= crop")
    if args.fsdp:
        raise SystemExit("--fsdp: not supported by the dense jobs yet (use DDP: torchrun without --fsdp)")


def _nan_to_none(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_nan_to_none(v) for v in x]
    return x


# --------------------------------------------------------------------------------------------------
# the task description


class DenseTask:
    """What a dense job is: its model, data, objective, evaluation and selection score. :func:`run` does the rest."""

    def __init__(self, name: str, args):
        self.name, self.args = name, args
        self.change = name == "change"
        self.select_key = "f1" if self.change else "miou"
        self.notes: list = []
        self._tmp: Optional[str] = None

    # -- data ------------------------------------------------------------------------------------------
    def data(self, progress=None, log=print):
        """Reads and checks the dataset (``--data`` or the embedded set, written to a temporary folder)."""
        from .readers import DataError, check_data, read_dense

        a = self.args
        root = a.data
        if root is None:
            from ..data.dense_synth import write_change_set, write_segmentation_set

            self._tmp = tempfile.mkdtemp(prefix=f"rspeft_fast_{self.name}_")
            n = tuple(a.embedded_size or (48, 12, 12))
            tile = a.embedded_tile or (64 if self.change else 96)
            root = (write_change_set(self._tmp, n=n, size=tile, seed=a.seed) if self.change
                    else write_segmentation_set(self._tmp, n=n, size=tile, seed=a.seed))
        try:
            kw = {} if self.change else {"classes": a.classes, "ignore_classes": tuple(a.ignore_class)}
            data, errors = read_dense(root, self.name, a.format, **kw)
            data = check_data(data, errors, skip_bad=a.skip_bad_images, workers=a.workers, progress=progress,
                              warn=lambda s: log(s, flush=True))
        except DataError as e:
            raise SystemExit(f"--data {a.data}: {e}" if a.data else f"embedded set: {e}") from None
        self.data_info, self.notes = data, list(data.notes)
        return data

    def cleanup(self):
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def datasets(self, data, mean, std):
        from .transforms import Augment, DenseDataset

        a = self.args
        aug = Augment(crop=a.crop, scale=tuple(a.scale), jitter=a.jitter)
        return {"train": DenseDataset(data.splits["train"], data.decode, mean, std, aug),
                "val": DenseDataset(data.splits["val"], data.decode, mean, std),
                "test": DenseDataset(data.splits["test"], data.decode, mean, std)}

    # -- model -----------------------------------------------------------------------------------------
    def build_model(self, num_classes: int) -> nn.Module:
        from ..integration.models import ModelBuildError
        from .model import ChangeDetector, Segmentor, create_encoder

        a = self.args
        opts = method_options(a.method, a.option)
        opts.setdefault("impl", a.impl)
        try:
            enc = create_encoder(a.model, a.method, opts, prompts=a.prompts, pretrained=a.pretrained,
                                 checkpoint=a.checkpoint, img_size=a.crop, model_args=dict(a.model_arg))
        except ModelBuildError as e:
            raise SystemExit(str(e)) from None
        except (TypeError, ValueError) as e:
            raise SystemExit(f"cannot build the {self.name} encoder from {a.model!r} + {a.method!r}: {e}") from None
        if a.grad_checkpointing:
            from ..integration.families import set_grad_checkpointing

            set_grad_checkpointing(enc.backbone, True)
        if self.change:
            return ChangeDetector(enc, a.decoder_channels, fusion=a.fusion)
        return Segmentor(enc, num_classes, a.decoder_channels)

    def loss(self, num_classes: int) -> nn.Module:
        from .losses import DenseLoss

        a = self.args
        w = [float(v) for v in a.class_weights.split(",")] if a.class_weights else None
        try:
            return DenseLoss(num_classes, class_weights=w, dice=a.dice)
        except ValueError as e:
            raise SystemExit(f"--class-weights: {e}") from None

    # -- evaluation ------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, net, dataset, num_classes: int, device, dist, amp_ctx, progress=None) -> dict:
        """Every image of ``dataset`` scored whole (:func:`sliding_window`), one confusion matrix (each rank its
        share of the images, summed over the ranks), the task's scores plus ``n_images``."""
        from .infer import sliding_window
        from .metrics import all_reduce_confusion, change_scores, confusion_matrix, segmentation_scores

        a = self.args
        net.eval()
        cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
        idx = range(dist.rank, len(dataset), dist.world)
        it = progress(idx, desc="evaluating", leave=False) if progress is not None else idx
        for i in it:
            *images, target = dataset[i]
            images = [x[None].to(device) for x in images]
            with amp_ctx():
                logits = sliding_window(net, *images, crop=a.crop, stride=a.stride, num_classes=num_classes,
                                        batch_size=a.eval_batch_size)
            cm += confusion_matrix(logits.argmax(1)[0], target.to(device), num_classes, all_reduce=False)
        all_reduce_confusion(cm)
        s = change_scores(cm) if self.change else segmentation_scores(cm)
        s["n_images"] = len(dataset)
        return s

    def score(self, m: dict) -> float:
        v = m[self.select_key]
        return -math.inf if math.isnan(v) else v

    def fmt(self, m: dict) -> str:
        if self.change:
            return (f"F1 {m['f1']:.2f} | IoU {m['iou']:.2f} | P {m['precision']:.2f} | R {m['recall']:.2f} | "
                    f"OA {m['oa']:.2f}")
        return f"mIoU {m['miou']:.2f} | mF1 {m['mf1']:.2f} | OA {m['oa']:.2f}"


# --------------------------------------------------------------------------------------------------
# saving: adapters (save_adapters of the backbone) and the decoder (everything trained after it)


def decoder_state(model: nn.Module) -> dict:
    """The state (parameters and buffers) of every module outside ``encoder.backbone``."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith("encoder.backbone.")}


def save_dense(model: nn.Module, out: str, meta: dict) -> None:
    """``OUT/adapters.safetensors`` (:func:`rspeft_fast.save_adapters` of the backbone) and ``OUT/decoder.safetensors``
    (:func:`decoder_state`, ``meta`` in the header), both written atomically."""
    from safetensors.torch import save

    from .._fileio import atomic_write
    from ..integration import save_adapters

    save_adapters(model.encoder.backbone, os.path.join(out, "adapters.safetensors"))
    blob = save(decoder_state(model), metadata={"rspeft_fast_dense": json.dumps(meta)})
    atomic_write(os.path.join(out, "decoder.safetensors"), lambda f: f.write(blob))


def load_dense(model: nn.Module, out: str) -> None:
    """Load ``OUT/adapters.safetensors`` and ``OUT/decoder.safetensors`` into a model built as the job built it."""
    from safetensors.torch import load_file

    saved = load_file(os.path.join(out, "adapters.safetensors"))
    params = dict(model.encoder.backbone.named_parameters())
    with torch.no_grad():
        for n, t in saved.items():
            if n in params:
                params[n].copy_(t)
    missing, unexpected = model.load_state_dict(load_file(os.path.join(out, "decoder.safetensors")), strict=False)
    if unexpected or any(not k.startswith("encoder.backbone.") for k in missing):
        raise RuntimeError(f"{out}/decoder.safetensors does not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})")


class _DenseTrainer(Trainer):
    """The engine's Trainer, with the decoder's BatchNorm statistics (buffers, not parameters) in the checkpoint."""

    def checkpoint(self) -> dict:
        ck = super().checkpoint()
        ck["buffers"] = {n: b.detach().cpu().clone() for n, b in self.model.named_buffers() if not n.startswith("encoder.backbone.")}
        return ck

    def load_checkpoint(self, path: str) -> None:
        super().load_checkpoint(path)
        ck = torch.load(path, map_location="cpu", weights_only=True)
        bufs = dict(self.model.named_buffers())
        with torch.no_grad():
            for n, t in ck.get("buffers", {}).items():
                bufs[n].copy_(t)


# --------------------------------------------------------------------------------------------------
# the runner (engine wiring only)


def run(task: DenseTask) -> int:
    from ..train.data import ResumableSampler, SeededSamples
    from .model import parameter_report

    args = task.args
    _fill_defaults(args)
    dist = setup_distributed(False)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    args._device = dev = resolve_device(args.device, dist)
    out = args.out or os.path.join("runs", f"{task.name}-{args.model}-{args.method}")
    ckpt_path = os.path.join(out, "checkpoint.pt")
    log = print if dist.is_main else (lambda *a, **k: None)
    resume_from = resume_path(args, ckpt_path, log=lambda s: log(s, flush=True))
    progress = progress_fn(args, dist)
    try:
        data = task.data(progress, log)
        k = len(data.classes)
        model = task.build_model(k)
        cfg = model.encoder.backbone.pretrained_cfg if hasattr(model.encoder.backbone, "pretrained_cfg") else {}
        mean, std = cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225))
        sets = task.datasets(data, mean, std)
        crit = task.loss(k)
        if dist.world > 1:
            torch.manual_seed(args.seed + dist.rank)
            random.seed(args.seed + dist.rank)
        model.to(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        net = wrap_model(model, args, dist)
        train = sets["train"]
        sampler = ResumableSampler(len(train), args.seed, args.batch_size, dist.rank, dist.world)
        loader = torch.utils.data.DataLoader(SeededSamples(train, args.seed), batch_size=args.batch_size, sampler=sampler,
                                             drop_last=dist.world > 1 or len(train) > args.batch_size, num_workers=args.workers,
                                             generator=torch.Generator().manual_seed(args.seed), pin_memory=dev.type == "cuda")

        def loss_fn(batch):
            *images, target = (t.to(dev, non_blocking=True) for t in batch)
            net.train()
            with autocast(args):
                logits = net(*images)
            return crit(logits, target), target.shape[0]

        steps_per_epoch = len(loader) if args.max_steps is None else min(len(loader), args.max_steps)
        opt, sched = build_optim(model, args, total_steps=max(1, steps_per_epoch * args.epochs))
        scaler = torch.amp.GradScaler(dev.type) if amp_dtype(args) == torch.float16 else None
        stop = StopRequest()
        trainer = _DenseTrainer(model, loader, opt, sched, scaler, args, steps_per_epoch, progress, stop, ckpt_path,
                                loss_fn, run_keys(args), dist)
        if resume_from is not None:
            trainer.load_checkpoint(resume_from)
        state = trainer.state
        params = parameter_report(model)
        meta = {"task": task.name, "model": args.model, "method": args.method, "classes": list(data.classes),
                "decoder_channels": args.decoder_channels, "prompts": model.encoder.prompts is not None and len(model.encoder.prompts),
                "fusion": getattr(args, "fusion", None), "crop": args.crop, "mean": list(mean), "std": list(std)}

        def ev(split):
            return task.evaluate(net, sets[split], k, dev, dist, lambda: autocast(args), progress)

        src = args.data or f"embedded {'change' if task.change else 'land-cover'} set"
        log(f"{task.name}: {args.model} + {args.method} | adapters {params['adapters']:,} "
            f"({params['adapters_pct_of_backbone']:.2f} % of the backbone's {params['backbone']:,}) | decoder "
            f"{params['decoder']:,} | device {dev} | crop {args.crop}, stride {args.stride} | data {src} ({data.format}, "
            f"{k} classes): " + ", ".join(f"{s} {len(v)}" for s, v in sets.items())
            + (f" | {dist.world} processes" if dist.world > 1 else ""), flush=True)
        for n in task.notes:
            log(f"note: {n}", flush=True)
        if "untrained" not in state.extra:
            state.extra["untrained"] = ev("test")
            log(f"untrained test: {task.fmt(state.extra['untrained'])}", flush=True)
        if resume_from is not None:
            log(trainer.resumed_text(resume_from), flush=True)
        os.makedirs(out, exist_ok=True)

        with stop.installed():
            while state.epoch < args.epochs:
                if not trainer.train_epoch():
                    break
                m = trainer.epoch_metrics()
                m["val"] = ev("val")
                m["epoch"] = state.epoch + 1
                m["peak_memory"] = peak_memory(dev)
                best = state.extra.get("best_val")
                if best is None or task.score(m["val"]) > task.score(best):
                    state.extra["best_val"], state.extra["selected_epoch"] = m["val"], m["epoch"]
                    if dist.is_main:
                        save_dense(model, out, meta)
                trainer.end_epoch(m)
                log(f"epoch {m['epoch']}/{args.epochs}  loss {m['train_loss']:.4f}  val {task.fmt(m['val'])}  "
                    f"{m['images_per_s']:.1f} img/s  peak mem {m['peak_memory']}", flush=True)
                if trainer._stop_now():
                    trainer.save_checkpoint()
                    break
            if stop.signum is not None:
                log(f"stopped by {signal.Signals(stop.signum).name} at epoch {state.epoch + 1}, step {state.epoch_step}; "
                    f"checkpoint written to {ckpt_path} (continue with --resume)", flush=True)
                return 128 + int(stop.signum)
            if args.ckpt_every:
                trainer.save_checkpoint()

        if dist.world > 1:
            torch.distributed.barrier()
        if "selected_epoch" in state.extra:
            load_dense(model, out)
        else:  # no epoch ran (--epochs 0): the starting model
            state.extra["best_val"], state.extra["selected_epoch"] = ev("val"), 0
            if dist.is_main:
                save_dense(model, out, meta)
        test = ev("test")
        log(f"selected epoch {state.extra['selected_epoch']} (best val {task.select_key} "
            f"{state.extra['best_val'][task.select_key]:.2f}); test: {task.fmt(test)} "
            f"(untrained: {task.fmt(state.extra['untrained'])})", flush=True)
        if dist.is_main:
            from .._fileio import atomic_write

            report = {"task": task.name, "model": args.model, "method": args.method, "classes": list(data.classes),
                      "format": data.format, "untrained": state.extra["untrained"], "val": state.extra["best_val"],
                      "test": test, "selected_epoch": state.extra["selected_epoch"], "params": params,
                      "history": state.history, "notes": task.notes, "resumed_from": resume_from,
                      "args": {k2: v for k2, v in vars(args).items() if not k2.startswith("_")}}
            text = json.dumps(_nan_to_none(report), indent=1, default=str).encode()
            atomic_write(os.path.join(out, "metrics.json"), lambda f: f.write(text))
        log(f"saved the selected epoch's adapters and decoder to {out}/adapters.safetensors, {out}/decoder.safetensors", flush=True)
        return 0
    finally:
        task.cleanup()


def main_segment(argv: Optional[list] = None) -> int:
    return run(DenseTask("segment", build_parser("segment").parse_args(argv)))


def main_change(argv: Optional[list] = None) -> int:
    return run(DenseTask("change", build_parser("change").parse_args(argv)))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main_segment())
