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
``decoder``, ``backbone``}, ``history``, ``notes``, ``predictions`` (the picture's description), ``args``),
``OUT/predictions.png`` (a few validation tiles: image | ground truth | prediction, change: A | B | label |
prediction, class palette and legend; :mod:`rspeft_fast.dense.pictures`). Never whole models.

Without ``--data``: the embedded synthetic set of the task (:mod:`rspeft_fast.data.dense_synth`), written to a
temporary folder in the users' layout and read by the same readers, and — unless ``--model`` is given — a
CPU-sized ConvNeXt (``convnext_atto``, 64-channel decoder, 64-pixel crops).

The job is a description for the engine (:class:`DenseJob`, a :class:`rspeft_fast.train.engine.Job`: model, data,
objective, evaluation, selection score); :func:`rspeft_fast.train.engine.run` does the rest. Two things the engine
does not know about are kept here: the decoder file is written beside the engine's adapter file whenever the engine
selects an epoch (:meth:`DenseJob.score` applies the engine's rule), and the decoder's BatchNorm statistics (buffers,
not trainable tensors) ride in the checkpoint's ``state.extra`` through a ``"checkpoint"`` phase hook.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
from typing import Optional

import torch
from torch import nn

from ..train.cli import parse_model_arg
from ..train.engine import Job, Settings, add_engine_args, control, method_options, parse_option, run

__all__ = ["build_parser", "DenseJob", "main_segment", "main_change", "save_dense", "load_dense", "decoder_state",
           "EMBEDDED_MODEL", "PAPER_MODEL"]

EMBEDDED_MODEL = "convnext_atto"  # the CPU-sized backbone of the embedded runs
PAPER_MODEL = "convnext_base"  # UPetu's backbone: the default with --data
DECODER = "decoder.safetensors"
PICTURES = "predictions.png"
PICTURE_TILES = 4  # validation tiles drawn in OUT/predictions.png
_BUFFERS = "decoder_buffers"  # state.extra key of the BatchNorm statistics


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
    p.add_argument("--class-weights", default=None,
                   help="cross-entropy class weights, comma-separated (e.g. 1,10 for change; default none, "
                        + ("1,5 on the embedded set)" if task == "change" else "equal)"))
    control(p, p.add_argument("--eval-batch-size", type=int, default=8, help="sliding windows per forward"))
    p.add_argument("--embedded-size", type=int, nargs=3, default=None, metavar=("TRAIN", "VAL", "TEST"),
                   help="embedded set: samples per split (default 48 12 12)")
    p.add_argument("--embedded-tile", type=int, default=None, help="embedded set: tile size (default 96; change 64)")
    add_engine_args(p, epochs=8, batch_size=8, lr=2e-3, weight_decay=0.01,
                    out_help=f"output folder (default runs/{task}-<model>-<method>)")
    p.set_defaults(lr=None)
    p.description += (" Default --lr: 2e-3" + (" (1e-2 on the embedded change set)." if task == "change" else "."))
    return p


def _fill_defaults(args) -> None:
    embedded = args.data is None
    if args.model is None:
        args.model = EMBEDDED_MODEL if embedded else PAPER_MODEL
    small = embedded and args.model == EMBEDDED_MODEL
    change = hasattr(args, "fusion")
    if args.lr is None:  # the short CPU run on the embedded change set needs a livelier start than real data
        args.lr = 1e-2 if embedded and change else 2e-3
    if args.class_weights is None and embedded and change:
        args.class_weights = "1,5"  # the change class is 5-7 % of the pixels
    if args.crop is None:
        args.crop = 64 if small else 512
    if args.stride is None:
        args.stride = max(1, args.crop * 2 // 3)
    if args.decoder_channels is None:
        args.decoder_channels = 64 if small else 256
    if args.crop <= 0 or not 0 < args.stride <= args.crop:
        raise SystemExit(f"--crop {args.crop} --stride {args.stride}: need 0 < stride <= crop")


def _replicated(fsdp: bool):
    """Under FSDP2, full tensors copied into sharded parameters count as replicated values (``implicit_replication``)."""
    if not fsdp:
        return contextlib.nullcontext()
    from torch.distributed.tensor.experimental import implicit_replication

    return implicit_replication()


def _nan_to_none(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_nan_to_none(v) for v in x]
    return x


# --------------------------------------------------------------------------------------------------
# saving: adapters (the engine: save_adapters of the backbone) and the decoder (everything trained after it)


def decoder_state(model: nn.Module) -> dict:
    """The state (parameters and buffers) of every module outside ``encoder.backbone``, as CPU copies; FSDP2-sharded
    tensors are all-gathered (``full_tensor``: a collective, every rank must call this)."""
    out = {}
    for k, v in model.state_dict().items():
        if not k.startswith("encoder.backbone."):
            v = v.full_tensor() if hasattr(v, "full_tensor") else v
            out[k] = v.detach().to("cpu", copy=True).contiguous()
    return out


def save_dense(model: nn.Module, out: str, meta: dict, *, adapters: bool = True, write: bool = True) -> None:
    """``OUT/adapters.safetensors`` (:func:`rspeft_fast.save_adapters` of the backbone; ``adapters=False``: the engine
    writes it) and ``OUT/decoder.safetensors`` (:func:`decoder_state`, ``meta`` in its header), written atomically.
    Under FSDP2 every rank calls it (the decoder's tensors are gathered) and only the one with ``write`` writes."""
    from safetensors.torch import save

    from .._fileio import atomic_write
    from ..integration import save_adapters

    state = decoder_state(model)
    if not write:
        return
    if adapters:
        save_adapters(model.encoder.backbone, os.path.join(out, "adapters.safetensors"))
    blob = save(state, metadata={"rspeft_fast_dense": json.dumps(meta)})
    atomic_write(os.path.join(out, DECODER), lambda f: f.write(blob))


def load_dense(model: nn.Module, out: str, *, adapters: bool = True) -> None:
    """Load ``OUT/adapters.safetensors`` (:func:`rspeft_fast.load_adapters`; ``adapters=False``: skip it) and
    ``OUT/decoder.safetensors`` into a model built as the job built it."""
    from safetensors.torch import load_file

    if adapters:
        from ..integration import load_adapters

        load_adapters(model.encoder.backbone, os.path.join(out, "adapters.safetensors"))
    missing, unexpected = model.load_state_dict(load_file(os.path.join(out, DECODER)), strict=False)
    if unexpected or any(not k.startswith("encoder.backbone.") for k in missing):
        raise RuntimeError(f"{out}/{DECODER} does not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})")


# --------------------------------------------------------------------------------------------------
# the job description


class DenseJob(Job):
    """Segmentation (``task="segment"``) or change detection (``"change"``) for the engine."""

    selects = True

    def __init__(self, args, task: str):
        super().__init__(args)
        _fill_defaults(args)
        self.name, self.change = task, task == "change"
        self.select_key = "f1" if self.change else "miou"
        self._tmp: Optional[str] = None
        self._best = None

    # -- model and data --------------------------------------------------------------------------------
    def _read(self, ctx):
        """The dataset (``--data`` or the embedded set, written to a temporary folder), checked up front."""
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
            kw = {} if self.change else {"classes": a.classes, "ignore_classes": tuple(a.ignore_class), "crop": a.crop}
            data, errors = read_dense(root, self.name, a.format, **kw)
            return check_data(data, errors, skip_bad=a.skip_bad_images, workers=a.workers, progress=ctx.progress,
                              warn=ctx.log)
        except DataError as e:
            raise SystemExit(f"--data {a.data}: {e}" if a.data else f"embedded set: {e}") from None

    def model(self, ctx):
        from ..integration.models import ModelBuildError
        from .model import ChangeDetector, Segmentor, create_encoder

        a = self.args
        self.dataset = self._read(ctx)  # first: the number of classes sizes the head
        self.num_classes = len(self.dataset.classes)
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

            try:
                set_grad_checkpointing(enc.backbone, True)
            except ValueError as e:
                raise SystemExit(f"--grad-checkpointing: {e}") from None
        try:
            self._model = (ChangeDetector(enc, a.decoder_channels, fusion=a.fusion) if self.change
                           else Segmentor(enc, self.num_classes, a.decoder_channels))
        except ImportError as e:  # the decoder library is the extra [dense]: one line saying so
            raise SystemExit(str(e)) from None
        if ctx.dist.world > 1:  # DDP / FSDP: the decoder's BatchNorm sees the global batch, as one process's
            from .model import sync_batchnorm

            for name, m in self._model.named_children():
                if name != "encoder":
                    sync_batchnorm(m, ctx.device)
        cfg = getattr(enc.backbone, "pretrained_cfg", None) or {}
        self.mean, self.std = tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))
        return self._model

    def data(self, ctx, model):
        from .transforms import Augment, DenseDataset

        a, d = self.args, self.dataset
        aug = Augment(crop=a.crop, scale=tuple(a.scale), jitter=a.jitter)
        self.sets = {"val": DenseDataset(d.splits["val"], d.decode, self.mean, self.std),
                     "test": DenseDataset(d.splits["test"], d.decode, self.mean, self.std)}
        return ctx.train_loader(DenseDataset(d.splits["train"], d.decode, self.mean, self.std, aug))

    def objective(self, ctx, net):
        from .losses import DenseLoss

        a = self.args
        w = [float(v) for v in a.class_weights.split(",")] if a.class_weights else None
        try:
            crit = DenseLoss(self.num_classes, class_weights=w, dice=a.dice, distributed=ctx.dist.world > 1)
        except ValueError as e:
            raise SystemExit(f"--class-weights: {e}") from None

        def loss_fn(batch):
            *images, target = (t.to(ctx.device, non_blocking=True) for t in batch)
            net.train()
            with ctx.autocast():
                logits = net(*images)
            return crit(logits, target), target.shape[0]

        return loss_fn

    def adapters(self, model):
        return model.encoder.backbone

    def shard_modules(self, model):
        """FSDP2 units (``--fsdp``): the backbone's blocks (its family's declaration, as ``train``) and the decoder
        head; the root unit holds the rest (stem, stage prompts, level prompts, pyramid, fusion)."""
        from ..integration.families import block_modules

        return block_modules(model.encoder.backbone) + [model.decode_head]

    # -- evaluation and selection ----------------------------------------------------------------------
    @torch.no_grad()
    def _eval(self, ctx, net, split: str) -> dict:
        """Every image of ``split`` scored whole (:func:`sliding_window`) into one confusion matrix (each rank its
        share of the images, summed over the ranks); the task's scores plus ``n_images``."""
        from .infer import sliding_window
        from .metrics import all_reduce_confusion, change_scores, confusion_matrix, segmentation_scores

        a, k, dev, ds = self.args, self.num_classes, ctx.device, self.sets[split]
        net.eval()
        cm = torch.zeros(k, k, dtype=torch.int64, device=dev)
        for i in ctx.progress(range(ctx.dist.rank, len(ds), ctx.dist.world), desc=f"scoring {split}", leave=False):
            *images, target = ds[i]
            with ctx.autocast():
                logits = sliding_window(net, *(x[None].to(dev) for x in images), crop=a.crop, stride=a.stride,
                                        num_classes=k, batch_size=a.eval_batch_size)
            cm += confusion_matrix(logits.argmax(1)[0], target.to(dev), k, all_reduce=False)
        all_reduce_confusion(cm)
        s = change_scores(cm) if self.change else segmentation_scores(cm)
        s["n_images"] = len(ds)
        return s

    def evaluate(self, ctx, net):
        return {"val": self._eval(ctx, net, "val")}

    def score(self, m):
        """The selection score (val mIoU; change: F1 of class 1; NaN → -inf). The engine saves the adapters of an
        epoch that beats the best so far; the same rule writes the decoder file beside them."""
        v = m["val"][self.select_key]
        v = -math.inf if math.isnan(v) else v
        if self._best is None or v > self._best:
            self._best = v
            self._save_decoder()
        return v

    def _meta(self) -> dict:
        a, enc = self.args, self._model.encoder
        return {"task": self.name, "model": a.model, "method": a.method, "classes": list(self.dataset.classes),
                "decoder_channels": a.decoder_channels, "prompts": 0 if enc.prompts is None else enc.prompts[0].num_prompts,
                "fusion": getattr(a, "fusion", None), "crop": a.crop, "mean": list(self.mean), "std": list(self.std)}

    def _save_decoder(self):
        """Every rank calls it (under ``--fsdp`` the decoder's tensors are all-gathered); rank 0 writes."""
        save_dense(self._model, self._ctx.settings.out, self._meta(), adapters=False, write=self._ctx.dist.is_main)

    # -- the run's beginning and end -------------------------------------------------------------------
    def hook(self, phase, state):
        """Phase hook: the decoder's BatchNorm statistics into the checkpoint (``state.extra``)."""
        if phase == "checkpoint":
            state.extra[_BUFFERS] = {n: b.detach().cpu().clone() for n, b in self._model.named_buffers()
                                     if not n.startswith("encoder.backbone.")}

    def describe(self, ctx, model):
        from .model import parameter_report

        a, d = self.args, self.dataset
        self.params = parameter_report(model)
        p = self.params
        return (f"{self.name}: {a.model} + {a.method} | adapters {p['adapters']:,} ({p['adapters_pct_of_backbone']:.2f} % "
                f"of the backbone's {p['backbone']:,}) | decoder {p['decoder']:,} | device {ctx.device} | crop {a.crop}, "
                f"stride {a.stride} | data {a.data or 'embedded ' + ('change' if self.change else 'land-cover') + ' set'} "
                f"({d.format}, {self.num_classes} classes): " + ", ".join(f"{k} {len(v)}" for k, v in d.splits.items())
                + (f" | {ctx.dist.world} processes" if ctx.dist.world > 1 else ""))

    def fmt(self, m: dict) -> str:
        if self.change:
            return (f"F1 {m['f1']:.2f} | IoU {m['iou']:.2f} | P {m['precision']:.2f} | R {m['recall']:.2f} | "
                    f"OA {m['oa']:.2f}")
        return f"mIoU {m['miou']:.2f} | mF1 {m['mf1']:.2f} | OA {m['oa']:.2f}"

    def epoch_line(self, m, epochs):
        return (f"epoch {m['epoch']}/{epochs}  loss {m['train_loss']:.4f}  val {self.fmt(m['val'])}  "
                f"{m['images_per_s']:.1f} img/s  peak mem {m['peak_memory']}")

    def start(self, ctx, net, state):
        self._ctx = ctx
        for n in self.dataset.notes:
            ctx.log(f"note: {n}")
        saved = state.extra.get(_BUFFERS)
        if saved:  # a resumed run: the BatchNorm statistics of the checkpoint
            bufs = dict(self._model.named_buffers())
            with torch.no_grad():
                for n, t in saved.items():
                    bufs[n].copy_(t)
        self._best = state.extra.get("best_score")
        if "untrained" not in state.extra:  # a resumed run has it from the checkpoint
            state.extra["untrained"] = self._eval(ctx, net, "test")
            ctx.log(f"untrained test: {self.fmt(state.extra['untrained'])}")

    def report(self, ctx, net, state):
        a, out = self.args, ctx.settings.out
        sel = state.extra["selected_epoch"]
        if sel:
            with _replicated(a.fsdp):  # --fsdp: each rank keeps its shard of the file's full tensors
                load_dense(self._model, out, adapters=False)  # the engine loaded the selected adapters back
        else:  # no epoch ran (--epochs 0): the starting model
            self._save_decoder()
        val = state.history[sel - 1]["val"] if sel else self._eval(ctx, net, "val")
        test = self._eval(ctx, net, "test")
        ctx.log(f"selected epoch {sel} (best val {self.select_key} {val[self.select_key]:.2f}); test: {self.fmt(test)} "
                f"(untrained: {self.fmt(state.extra['untrained'])})")
        ctx.log(f"saved the selected epoch's adapters and decoder to {out}/adapters.safetensors, {out}/{DECODER}")
        pictures = self._pictures(ctx, net)
        if pictures is not None:
            ctx.log(f"saved {pictures['tiles']} validation tiles as pictures to {out}/{PICTURES}")
        history = [{k: v for k, v in h.items()} for h in state.history]
        return _nan_to_none({"task": self.name, "model": a.model, "method": a.method, "classes": list(self.dataset.classes),
                             "format": self.dataset.format, "untrained": state.extra["untrained"], "val": val, "test": test,
                             "selected_epoch": sel, "params": self.params, "history": history, "notes": self.dataset.notes,
                             "predictions": pictures})

    @torch.no_grad()
    def _pictures(self, ctx, net) -> Optional[dict]:
        """``OUT/predictions.png``: the first :data:`PICTURE_TILES` validation tiles, image(s) | ground truth |
        prediction of the selected model (:func:`rspeft_fast.dense.pictures.save_predictions`); the figure's
        description, or None when there is no validation tile or matplotlib cannot draw (said in the log). Every rank
        runs the forwards (DDP / FSDP forwards are collective), rank 0 draws."""
        from .infer import sliding_window
        from .pictures import save_predictions

        a, ds = self.args, self.sets["val"]
        n = min(PICTURE_TILES, len(ds))
        if n == 0:
            return None
        mean, std = torch.tensor(self.mean).reshape(3, 1, 1), torch.tensor(self.std).reshape(3, 1, 1)
        rows = []
        net.eval()
        for i in range(n):
            *images, target = ds[i]
            with ctx.autocast():
                logits = sliding_window(net, *(x[None].to(ctx.device) for x in images), crop=a.crop, stride=a.stride,
                                        num_classes=self.num_classes, batch_size=a.eval_batch_size)
            pics = [(x * std + mean).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy() for x in images]
            rows.append((*pics, target.numpy(), logits.argmax(1)[0].cpu().numpy()))
        if not ctx.dist.is_main:
            return None
        palette = self.dataset.mask_rule.get("palette") if self.dataset.format == "potsdam" else None
        try:
            return save_predictions(os.path.join(ctx.settings.out, PICTURES), rows, self.dataset.classes,
                                    change=self.change, palette=palette,
                                    title=f"{a.model} + {a.method}: validation tiles, selected epoch")
        except ImportError as e:  # pragma: no cover - matplotlib is a dependency
            ctx.log(f"no {PICTURES}: {e}")
            return None

    def cleanup(self):
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)


def _main(task: str, argv, hooks) -> int:
    args = build_parser(task).parse_args(argv)
    job = DenseJob(args, task)
    out = args.out or os.path.join("runs", f"{task}-{args.model}-{args.method}")
    try:
        return run(job, Settings.from_args(args, out=out, hooks=(job.hook, *hooks)))
    finally:
        job.cleanup()


def main_segment(argv: Optional[list] = None, *, hooks=()) -> int:
    """``python -m rspeft_fast segment ...``; ``hooks``: phase hooks (:class:`~rspeft_fast.train.engine.Settings`)."""
    return _main("segment", argv, hooks)


def main_change(argv: Optional[list] = None, *, hooks=()) -> int:
    """``python -m rspeft_fast change ...``; ``hooks``: phase hooks (:class:`~rspeft_fast.train.engine.Settings`)."""
    return _main("change", argv, hooks)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main_segment())
