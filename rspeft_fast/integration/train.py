"""Fine-tuning CLI: ``python -m rspeft_fast train --model vit_base_patch16_224 --method mufa [--data DIR] ...``

An ordinary PyTorch loop: a timm model, frozen, with the adapters of ``--method`` injected
(:func:`rspeft_fast.inject`); AdamW over the trainable parameters, a cosine schedule with linear warm-up
(stepped per batch), autocast (bf16) on CUDA; per epoch the train loss, the validation accuracy,
images/s and peak memory; at the end the adapter weights (``--out DIR/adapters.safetensors``) and the
metrics (``DIR/metrics.json``).

Data: ``--data DIR`` in the layout of UCM / NWPU-RESISC45 / AID (one folder per class; or ``DIR/train``
and ``DIR/val`` each so), read with PIL + torchvision transforms; without ``--data`` the embedded
procedural texture set (:mod:`rspeft_fast.data`), which needs no download.

Checkpoints and resuming (nothing is lost on interruption):

* ``--ckpt-every N`` writes ``DIR/checkpoint.pt`` every N optimizer steps (and at the end of the run);
  on SIGINT / SIGTERM the loop finishes the step in flight, writes the checkpoint and exits with
  128 + the signal number (130 for Ctrl-C, 143 for SIGTERM); a second signal aborts at once.
  Every write is atomic: a temporary file in the same folder, fsync, ``os.replace`` (then the folder
  is fsynced), so a crash or a kill during the write leaves the previous checkpoint intact.
* ``--resume [PATH]`` (default ``DIR/checkpoint.pt``; a bare ``--resume`` starts afresh when that file
  does not exist yet, so a job script can always pass it) restores the trainable tensors, the optimizer,
  the LR scheduler, the fp16 GradScaler, the RNG states (torch CPU/CUDA, numpy, python) and the data
  position (epoch, step within the epoch, the sampler's generator at the start of the epoch), and checks
  that the arguments that shape the run (model, method, options, data, batch size, lr, epochs, seed, ...)
  and the frozen backbone are the same. On CPU a resumed run ends with bit-for-bit the adapter weights
  of an uninterrupted one.
* The training order is a permutation drawn per epoch from the sampler's own generator, and each
  sample's random augmentation is seeded from (seed, epoch, index), so neither depends on the
  DataLoader workers or on where the run was interrupted.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import contextlib
import resource
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from torch import nn

__all__ = ["main", "build_parser", "TrainState"]

IMG_EXT = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


# --------------------------------------------------------------------------------------------------
# arguments


def _parse_option(s: str):
    if "=" not in s:
        raise argparse.ArgumentTypeError(f"--option expects key=value, got {s!r}")
    k, v = s.split("=", 1)
    try:
        val = json.loads(v)
    except json.JSONDecodeError:
        val = v
    if isinstance(val, str) and "," in val:  # rates=8,16,32
        try:
            val = tuple(int(t) for t in val.split(","))
        except ValueError:
            pass
    if isinstance(val, list):
        val = tuple(val)
    return k.replace("-", "_"), val


def build_parser() -> argparse.ArgumentParser:
    from .config import METHODS

    p = argparse.ArgumentParser(
        prog="python -m rspeft_fast train",
        description="Fine-tune a timm model with parameter-efficient adapters (frozen backbone) and save the adapter weights.",
    )
    p.add_argument("--model", default="vit_base_patch16_224", help="timm model name (ViT, Swin or ConvNeXt; default %(default)s)")
    p.add_argument("--method", default="mufa", choices=[m for m in METHODS if m != "mga"] + ["mga"], help="PEFT method (default %(default)s)")
    p.add_argument("--option", action="append", type=_parse_option, default=[], metavar="KEY=VALUE",
                   help="method option, e.g. --option rates=8,16,32 --option placement=serial --option rank=16 (repeatable)")
    p.add_argument("--data", default=None, help="image folder (one sub-folder per class, or train/ and val/); default: embedded texture set")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of each class held out for validation when DIR has no val/ (default %(default)s)")
    p.add_argument("--embedded-per-class", type=int, default=40, help="embedded set: training images per class (8 classes; val gets a quarter)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default %(default)s)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps (default: 5%% of all steps)")
    p.add_argument("--model-arg", action="append", type=_parse_option, default=[], metavar="KEY=VALUE",
                   help="extra timm.create_model argument, e.g. --model-arg depth=6 --model-arg drop_path_rate=0.1 (repeatable)")
    p.add_argument("--global-pool", default=None, help="timm global_pool (e.g. avg, token); default: the model's")
    p.add_argument("--img-size", type=int, default=None, help="input size (default: the model's on CUDA, 64 on CPU)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--impl", default="auto", choices=["auto", "reference", "triton"], help="adapter kernels (default %(default)s)")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"], help="autocast: auto = bf16 on CUDA, off on CPU")
    p.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights (needs the network)")
    p.add_argument("--checkpoint", default=None, help="load backbone weights from a local file (timm/safetensors/torch)")
    p.add_argument("--out", default=None, help="output folder (default runs/<model>-<method>)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for --data (default %(default)s)")
    p.add_argument("--max-steps", type=int, default=None, help="stop each epoch after this many steps (smoke tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--ckpt-every", type=int, default=None, metavar="N",
                   help="write an atomic checkpoint (DIR/checkpoint.pt) every N optimizer steps and at the end; "
                        "one is always written on SIGINT/SIGTERM")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                   help="resume from PATH (default DIR/checkpoint.pt; bare --resume starts afresh if it does not exist)")
    p.add_argument("--stop-after-steps", type=int, default=None, help=argparse.SUPPRESS)  # test hook: SIGTERM to self
    return p


# --------------------------------------------------------------------------------------------------
# data


class ImageFolderList(torch.utils.data.Dataset):
    """``(path, label)`` pairs read with PIL and a torchvision transform."""

    def __init__(self, items, transform):
        self.items, self.transform = items, transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from PIL import Image

        path, label = self.items[i]
        with Image.open(path) as im:
            return self.transform(im.convert("RGB")), label


def _scan(root: str, classes=None):
    if not os.path.isdir(root):
        raise SystemExit(f"--data {root}: not a directory")
    found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    classes = classes or found
    if not classes:
        raise SystemExit(f"--data {root}: no class folders (expected one sub-folder per class, as in UCM / NWPU-RESISC45 / AID)")
    items = []
    for k, c in enumerate(classes):
        d = os.path.join(root, c)
        if not os.path.isdir(d):
            raise SystemExit(f"--data {root}: class folder {c!r} missing")
        for f in sorted(os.listdir(d)):
            if f.lower().endswith(IMG_EXT):
                items.append((os.path.join(d, f), k))
    if not items:
        raise SystemExit(f"--data {root}: no images ({', '.join(IMG_EXT)}) found")
    return items, list(classes)


class ResumableSampler(torch.utils.data.Sampler):
    """A random permutation per epoch from the sampler's own generator, yielding ``(epoch, index)`` from
    position ``start`` on. ``begin_epoch`` records the generator state at the start of the epoch, which
    (with the position) is all a checkpoint needs to replay the rest of the epoch."""

    def __init__(self, n: int, seed: int):
        self.n = int(n)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.epoch, self.start, self.perm, self.epoch_start_state = 0, 0, None, None

    def begin_epoch(self, epoch: int, start: int = 0, generator_state: Optional[torch.Tensor] = None) -> None:
        if generator_state is not None:
            self.generator.set_state(generator_state)
        self.epoch_start_state = self.generator.get_state()
        self.perm = torch.randperm(self.n, generator=self.generator).tolist()
        self.epoch, self.start = int(epoch), int(start)

    def __iter__(self):
        if self.perm is None:
            raise RuntimeError("ResumableSampler: call begin_epoch() before iterating")
        for i in self.perm[self.start:]:
            yield (self.epoch, i)

    def __len__(self) -> int:
        return self.n


class SeededSamples(torch.utils.data.Dataset):
    """``dataset[(epoch, i)]`` = ``base[i]`` with the torch RNG seeded from (seed, epoch, i) while it is
    read: random augmentations are a function of the sample, not of the worker or the interruption point."""

    def __init__(self, base, seed: int):
        self.base, self.seed = base, int(seed)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        epoch, i = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + i)
            return self.base[i]


def build_data(args, img_size: int, mean, std):
    """``(train_loader, val_loader, class names)``; the train loader's sampler is a :class:`ResumableSampler`."""
    g = torch.Generator().manual_seed(args.seed)
    if args.data is None:
        from ..data import TextureScenes

        tr = TextureScenes("train", per_class=args.embedded_per_class, size=img_size, seed=args.seed, mean=mean, std=std)
        va = TextureScenes("val", per_class=max(args.embedded_per_class // 4, 2), size=img_size, seed=args.seed, mean=mean, std=std)
        classes, workers = list(tr.classes), 0
    else:
        from torchvision import transforms as T

        norm = T.Normalize(mean, std)
        t_train = T.Compose([T.Resize((img_size, img_size)), T.RandomHorizontalFlip(), T.RandomVerticalFlip(), T.ToTensor(), norm])
        t_val = T.Compose([T.Resize((img_size, img_size)), T.ToTensor(), norm])
        if os.path.isdir(os.path.join(args.data, "train")) and os.path.isdir(os.path.join(args.data, "val")):
            tr_items, classes = _scan(os.path.join(args.data, "train"))
            va_items, _ = _scan(os.path.join(args.data, "val"), classes)
        else:
            items, classes = _scan(args.data)
            rng = random.Random(args.seed)
            tr_items, va_items = [], []
            for k in range(len(classes)):
                cls_items = [it for it in items if it[1] == k]
                rng.shuffle(cls_items)
                n_val = max(1, int(round(len(cls_items) * args.val_fraction))) if len(cls_items) > 1 else 0
                va_items += cls_items[:n_val]
                tr_items += cls_items[n_val:]
        tr, va = ImageFolderList(tr_items, t_train), ImageFolderList(va_items, t_val)
        workers = args.workers
    pin = args._device.type == "cuda"
    # the loader's own generator only seeds workers (never the global RNG, whose state a checkpoint restores)
    train_loader = torch.utils.data.DataLoader(SeededSamples(tr, args.seed), batch_size=args.batch_size,
                                               sampler=ResumableSampler(len(tr), args.seed), drop_last=len(tr) > args.batch_size,
                                               num_workers=workers, generator=g, pin_memory=pin)
    val_loader = torch.utils.data.DataLoader(va, batch_size=args.batch_size * 2, shuffle=False, num_workers=workers, pin_memory=pin)
    return train_loader, val_loader, classes


# --------------------------------------------------------------------------------------------------
# model


def build_model(args, num_classes: int, img_size: int) -> nn.Module:
    import timm

    from . import inject
    from .config import config_for

    kw = dict(args.model_arg)
    kw["num_classes"] = num_classes
    if args.global_pool is not None:
        kw["global_pool"] = args.global_pool
    if img_size is not None and any(k in args.model for k in ("vit", "swin", "deit", "eva")):
        kw["img_size"] = img_size  # ViT / Swin take the input size at creation (pos-embed resampled when loading)
    try:
        if args.checkpoint:
            if not os.path.isfile(args.checkpoint):
                raise SystemExit(f"--checkpoint {args.checkpoint}: no such file")
            model = timm.create_model(args.model, pretrained=True, pretrained_cfg_overlay={"file": os.path.abspath(args.checkpoint)}, **kw)
        elif args.pretrained:
            try:
                model = timm.create_model(args.model, pretrained=True, **kw)
            except Exception as e:  # network / hub errors come in many types
                raise SystemExit(
                    f"--pretrained: could not fetch timm weights for {args.model!r} ({type(e).__name__}: {e}). "
                    "Without network access, download them elsewhere and pass --checkpoint FILE."
                ) from None
        else:
            model = timm.create_model(args.model, pretrained=False, **kw)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise SystemExit(f"--model {args.model!r}: {e}") from None
        raise
    opts = dict(args.option)
    opts.setdefault("impl", args.impl)
    cfg = config_for(args.method, **opts)
    try:
        inject(model, cfg)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"cannot inject {args.method!r} into {args.model!r}: {e}") from None
    return model


def _mean_std(model):
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", (0.5,) * 3)), tuple(cfg.get("std", (0.5,) * 3))


# --------------------------------------------------------------------------------------------------
# loop


@dataclass
class TrainState:
    """Everything besides tensors that a checkpoint must hold to resume."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    history: list = field(default_factory=list)
    epoch_step: int = 0  # steps taken in the epoch in flight
    epoch_acc: dict = field(default_factory=dict)  # running sums of the epoch in flight (loss, images, ...)


def _fresh_acc() -> dict:
    return {"total_loss": 0.0, "n_seen": 0, "first_loss": None, "train_s": 0.0}


def build_optim(model: nn.Module, args, total_steps: int):
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        fused=args._device.type == "cuda" or None,
    )
    warm = args.warmup_steps if args.warmup_steps is not None else max(1, int(0.05 * total_steps))

    def lr_at(step):  # linear warm-up then cosine to 0
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total_steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    return opt, sched


def _amp_dtype(args):
    mode = args.amp
    if mode == "auto":
        mode = "bf16" if args._device.type == "cuda" else "off"
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]


def _autocast(args):
    dt = _amp_dtype(args)
    if dt is None:
        return torch.autocast(args._device.type, enabled=False)
    return torch.autocast(args._device.type, dtype=dt)


def _peak_memory(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (CUDA allocated)"
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return f"{rss_kib / 2**20:.2f} GiB (process RSS)"


class StopRequest:
    """SIGINT/SIGTERM handler: the first signal asks the loop to stop after the step in flight; a second
    one restores the default action and re-raises the signal (abort at once)."""

    def __init__(self):
        self.signum = None

    def __call__(self, signum, frame):
        if self.signum is not None:
            signal.signal(signum, signal.SIG_DFL if signum != signal.SIGINT else signal.default_int_handler)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        print(f"\nreceived {signal.Signals(signum).name}: finishing the current step and writing a checkpoint "
              "(send it again to abort without saving)", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():  # signals can only be handled there
            yield self
            return
        old = {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


class Trainer:
    """The training loop with its checkpointable state (see the module docstring)."""

    def __init__(self, model, train_loader, opt, sched, scaler, args, steps_per_epoch: int, progress, stop: StopRequest, ckpt_path: str):
        self.model, self.loader, self.opt, self.sched, self.scaler = model, train_loader, opt, sched, scaler
        self.sampler = train_loader.sampler
        self.args, self.steps_per_epoch, self.progress, self.stop, self.ckpt_path = args, steps_per_epoch, progress, stop, ckpt_path
        self.state = TrainState(epoch_acc=_fresh_acc())
        self._sampler_state = None  # generator state to start the epoch in flight from (set by resume)

    # -- one epoch -------------------------------------------------------------------------------------
    def train_epoch(self) -> bool:
        """Runs (the rest of) the epoch in flight; returns False when a signal stopped it part-way."""
        model, args, st, dev = self.model, self.args, self.state, self.args._device
        self.sampler.begin_epoch(st.epoch, start=st.epoch_step * args.batch_size, generator_state=self._sampler_state)
        self._sampler_state = None
        if st.epoch_step >= self.steps_per_epoch:
            return True
        model.train()
        crit = nn.CrossEntropyLoss()
        acc = st.epoch_acc
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        bar = self.progress(self.loader, desc=f"epoch {st.epoch + 1}/{args.epochs}", leave=False)
        for x, y in bar:
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            with _autocast(args):
                loss = crit(model(x), y)
            self.opt.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.opt)
                self.scaler.update()
            else:
                loss.backward()
                self.opt.step()
            self.sched.step()
            st.step += 1
            st.epoch_step += 1
            li = loss.item()
            if not math.isfinite(li):
                raise FloatingPointError(f"non-finite loss {li} at step {st.step}")
            acc["first_loss"] = li if acc["first_loss"] is None else acc["first_loss"]
            acc["total_loss"] += li * x.shape[0]
            acc["n_seen"] += x.shape[0]
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{li:.3f}", lr=f"{self.sched.get_last_lr()[0]:.2e}")
            done = st.epoch_step >= self.steps_per_epoch
            if args.stop_after_steps is not None and st.step == args.stop_after_steps:
                os.kill(os.getpid(), signal.SIGTERM)  # test hook: the handler runs before the next line
            if self.stop.signum is not None or (args.ckpt_every and st.step % args.ckpt_every == 0):
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                acc["train_s"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                self.save_checkpoint()
                if self.stop.signum is not None:
                    return False
            if done:
                break
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        acc["train_s"] += time.perf_counter() - t0
        return True

    def epoch_metrics(self) -> dict:
        acc, n = self.state.epoch_acc, self.state.epoch_acc["n_seen"]
        return {"train_loss": acc["total_loss"] / max(n, 1), "first_loss": acc["first_loss"],
                "images_per_s": n / max(acc["train_s"], 1e-9), "train_s": acc["train_s"], "steps": self.state.epoch_step}

    def end_epoch(self, metrics: dict) -> None:
        self.state.history.append(metrics)
        self.state.epoch += 1
        self.state.epoch_step = 0
        self.state.epoch_acc = _fresh_acc()

    # -- checkpoints -----------------------------------------------------------------------------------
    def checkpoint(self) -> dict:
        try:
            import numpy as np

            ns = np.random.get_state()
            np_state = {"name": ns[0], "keys": torch.from_numpy(ns[1].astype("int64")), "pos": int(ns[2]),
                        "has_gauss": int(ns[3]), "cached_gaussian": float(ns[4])}
        except ImportError:  # pragma: no cover
            np_state = None
        dev = self.args._device
        return {
            "format": "rspeft_fast.train/1",
            "run": run_fingerprint(self.args),
            "backbone_checksum": backbone_checksum(self.model),
            "trainable": {n: p.detach().to("cpu", copy=True) for n, p in self.model.named_parameters() if p.requires_grad},
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "state": asdict(self.state),
            "sampler": {"epoch": self.sampler.epoch, "epoch_start_state": self.sampler.epoch_start_state},
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np_state,
                    "cuda": torch.cuda.get_rng_state_all() if dev.type == "cuda" else None},
        }

    def save_checkpoint(self) -> None:
        atomic_torch_save(self.checkpoint(), self.ckpt_path)

    def load_checkpoint(self, path: str) -> None:
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise SystemExit(f"--resume {path}: cannot read the checkpoint ({type(e).__name__}: {e})") from None
        if not isinstance(ck, dict) or ck.get("format") != "rspeft_fast.train/1":
            raise SystemExit(f"--resume {path}: not an rspeft_fast training checkpoint")
        now, then = run_fingerprint(self.args), ck["run"]
        diff = {k: (then.get(k), now.get(k)) for k in sorted(set(now) | set(then)) if now.get(k) != then.get(k)}
        if diff:
            raise SystemExit(f"--resume {path}: the checkpoint was written by a run with other settings; differing "
                             f"(checkpoint, now): {diff}")
        if ck["backbone_checksum"] != backbone_checksum(self.model):
            raise SystemExit(f"--resume {path}: the frozen backbone weights differ from the checkpointed run's "
                             "(another --checkpoint file or timm version?)")
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        saved = ck["trainable"]
        if set(saved) != set(params) or any(tuple(saved[n].shape) != tuple(params[n].shape) for n in params):
            raise SystemExit(f"--resume {path}: the checkpoint's trainable tensors do not match the model's")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        if self.scaler is not None and ck["scaler"] is not None:
            self.scaler.load_state_dict(ck["scaler"])
        self.state = TrainState(**ck["state"])
        self._sampler_state = ck["sampler"]["epoch_start_state"]
        rng = ck["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(_as_tuple(rng["python"]))
        if rng["numpy"] is not None:
            import numpy as np

            n = rng["numpy"]
            np.random.set_state((n["name"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["cached_gaussian"]))
        if rng["cuda"] is not None and self.args._device.type == "cuda":
            torch.cuda.set_rng_state_all(rng["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


_RUN_KEYS = ("model", "method", "option", "data", "val_fraction", "embedded_per_class", "epochs", "batch_size", "lr",
             "weight_decay", "warmup_steps", "model_arg", "global_pool", "img_size", "seed", "max_steps", "pretrained",
             "checkpoint")


def run_fingerprint(args) -> dict:
    """The arguments that shape the training trajectory, as JSON strings (compared on --resume)."""
    return {k: json.dumps(getattr(args, k), sort_keys=True, default=str) for k in _RUN_KEYS}


@torch.no_grad()
def backbone_checksum(model: nn.Module) -> str:
    """A float64 sum per frozen tensor, hashed: the frozen backbone must be the same on --resume."""
    import hashlib

    h = hashlib.sha256()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            h.update(f"{n}:{tuple(p.shape)}:{p.double().sum().item():.17g}:{p.double().abs().sum().item():.17g};".encode())
    return h.hexdigest()


def atomic_torch_save(obj, path: str) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, ``os.replace``, fsync the folder."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError, AttributeError):  # the rename itself, durable (POSIX)
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


@torch.no_grad()
def evaluate(model, loader, args) -> float:
    model.eval()
    dev = args._device
    correct = total = 0
    for x, y in loader:
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        with _autocast(args):
            pred = model(x).argmax(-1)
        correct += (pred == y).sum().item()
        total += y.numel()
    return 100.0 * correct / max(total, 1)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available here")
    return dev


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    from . import save_adapters, trainable_parameters

    if args.ckpt_every is not None and args.ckpt_every <= 0:
        raise SystemExit(f"--ckpt-every must be a positive number of steps, got {args.ckpt_every}")
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    args._device = _resolve_device(args.device)
    dev = args._device
    if args.img_size is None:
        args.img_size = None if dev.type == "cuda" else 64
    out = args.out or os.path.join("runs", f"{args.model}-{args.method}")
    ckpt_path = os.path.join(out, "checkpoint.pt")
    resume_from = None
    if args.resume is not None:
        resume_from = args.resume or ckpt_path
        if not os.path.isfile(resume_from):
            if args.resume:
                raise SystemExit(f"--resume {args.resume}: no such file")
            print(f"--resume: no checkpoint at {resume_from} yet; starting afresh", flush=True)
            resume_from = None

    # classes first (folder scan is cheap), so the head is created with the right size
    if args.data is None:
        from ..data import CLASSES

        n_classes = len(CLASSES)
    else:
        root = os.path.join(args.data, "train") if os.path.isdir(os.path.join(args.data, "train")) else args.data
        n_classes = len(_scan(root)[1])
    model = build_model(args, n_classes, args.img_size)
    img_size = args.img_size or int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    mean, std = _mean_std(model)
    train_loader, val_loader, classes = build_data(args, img_size, mean, std)
    model.to(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    n_batches = len(train_loader)
    steps_per_epoch = n_batches if args.max_steps is None else min(n_batches, args.max_steps)
    opt, sched = build_optim(model, args, total_steps=max(1, steps_per_epoch * args.epochs))
    scaler = torch.amp.GradScaler(dev.type) if _amp_dtype(args) == torch.float16 else None
    if args.no_progress:
        def progress(it, **_):
            return it
    else:
        from tqdm.auto import tqdm as progress
    stop = StopRequest()
    trainer = Trainer(model, train_loader, opt, sched, scaler, args, steps_per_epoch, progress, stop, ckpt_path)
    if resume_from is not None:
        trainer.load_checkpoint(resume_from)
    state = trainer.state

    tp = trainable_parameters(model)
    src = args.data or f"embedded textures ({len(classes)} classes)"
    print(f"model {args.model} + {args.method} | {tp} | device {dev} | img {img_size} | data {src}: "
          f"{len(train_loader.dataset)} train / {len(val_loader.dataset)} val", flush=True)
    if resume_from is not None:
        print(f"resumed from {resume_from}: epoch {state.epoch + 1}, step {state.epoch_step} of {steps_per_epoch} "
              f"({state.step} steps done)", flush=True)

    with stop.installed():
        while state.epoch < args.epochs:
            if not trainer.train_epoch():
                break
            m = trainer.epoch_metrics()
            m["val_acc"] = evaluate(model, val_loader, args)
            m["epoch"] = state.epoch + 1
            m["peak_memory"] = _peak_memory(dev)
            trainer.end_epoch(m)
            print(f"epoch {m['epoch']}/{args.epochs}  train_loss {m['train_loss']:.4f}  val_acc {m['val_acc']:.2f}%  "
                  f"{m['images_per_s']:.1f} img/s  peak mem {m['peak_memory']}", flush=True)
            if stop.signum is not None:  # arrived during the evaluation: the epoch is complete
                trainer.save_checkpoint()
                break
        if stop.signum is not None:
            print(f"stopped by {signal.Signals(stop.signum).name} at epoch {state.epoch + 1}, step {state.epoch_step}; "
                  f"checkpoint written to {ckpt_path} (continue with --resume)", flush=True)
            return 128 + int(stop.signum)
        if args.ckpt_every:
            trainer.save_checkpoint()

        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, "adapters.safetensors")
        save_adapters(model, path)
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if not k.startswith("_")}, "classes": classes,
                       "trainable": tp._asdict(), "state": asdict(state), "resumed_from": resume_from}, f, indent=1, default=str)
    print(f"saved adapter weights to {path} (chance accuracy {100.0 / len(classes):.1f}%)", flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
