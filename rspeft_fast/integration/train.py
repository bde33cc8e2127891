"""Fine-tuning CLI: ``python -m rspeft_fast train --model vit_base_patch16_224 --method mufa [--data DIR] ...``

An ordinary PyTorch loop: a timm model, frozen, with the adapters of ``--method`` injected
(:func:`rspeft_fast.inject`); AdamW over the trainable parameters, a cosine schedule with linear warm-up
(stepped per batch), autocast (bf16) on CUDA; per epoch the train loss, the validation accuracy,
images/s and peak memory; at the end the adapter weights (``--out DIR/adapters.safetensors``) and the
metrics (``DIR/metrics.json``).

Data: ``--data DIR`` in the layout of UCM / NWPU-RESISC45 / AID (one folder per class; or ``DIR/train``
and ``DIR/val`` each so), read with PIL + torchvision transforms; without ``--data`` the embedded
procedural texture set (:mod:`rspeft_fast.data`), which needs no download.

The loop is split into ``build_*`` functions and :class:`TrainState` (epoch, step, history) so that
checkpointing and ``--resume`` can be added at the marked points (save the trainable tensors, the
optimizer, the scheduler and the state; restore them before the epoch loop).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import sys
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


def build_data(args, img_size: int, mean, std):
    """``(train_loader, val_loader, class names)``."""
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
    train_loader = torch.utils.data.DataLoader(tr, batch_size=args.batch_size, shuffle=True, drop_last=len(tr) > args.batch_size,
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


def _autocast(args):
    dev = args._device.type
    mode = args.amp
    if mode == "auto":
        mode = "bf16" if dev == "cuda" else "off"
    if mode == "off":
        return torch.autocast(dev, enabled=False), None
    dt = torch.bfloat16 if mode == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(dev) if dt == torch.float16 else None
    return torch.autocast(dev, dtype=dt), scaler


def _peak_memory(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (CUDA allocated)"
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return f"{rss_kib / 2**20:.2f} GiB (process RSS)"


def train_one_epoch(model, loader, opt, sched, args, state: TrainState, progress) -> dict:
    model.train()
    crit = nn.CrossEntropyLoss()
    dev = args._device
    total_loss, n_seen, n_steps = 0.0, 0, 0
    first_loss = None
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    bar = progress(loader, desc=f"epoch {state.epoch + 1}/{args.epochs}", leave=False)
    for x, y in bar:
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        ac, scaler = _autocast(args)
        with ac:
            loss = crit(model(x), y)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        sched.step()
        state.step += 1
        li = loss.item()
        if not math.isfinite(li):
            raise FloatingPointError(f"non-finite loss {li} at step {state.step}")
        first_loss = li if first_loss is None else first_loss
        total_loss += li * x.shape[0]
        n_seen += x.shape[0]
        n_steps += 1
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{li:.3f}", lr=f"{sched.get_last_lr()[0]:.2e}")
        if args.max_steps is not None and n_steps >= args.max_steps:
            break
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    dt = time.perf_counter() - t0
    return {"train_loss": total_loss / max(n_seen, 1), "first_loss": first_loss, "images_per_s": n_seen / dt, "train_s": dt, "steps": n_steps}


@torch.no_grad()
def evaluate(model, loader, args) -> float:
    model.eval()
    dev = args._device
    correct = total = 0
    for x, y in loader:
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        ac, _ = _autocast(args)
        with ac:
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

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    args._device = _resolve_device(args.device)
    dev = args._device
    if args.img_size is None:
        args.img_size = None if dev.type == "cuda" else 64
    out = args.out or os.path.join("runs", f"{args.model}-{args.method}")

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

    steps_per_epoch = len(train_loader) if args.max_steps is None else min(len(train_loader), args.max_steps)
    opt, sched = build_optim(model, args, total_steps=max(1, steps_per_epoch * args.epochs))
    state = TrainState()
    # --resume would restore (trainable tensors, opt, sched, state) here, from an atomic checkpoint.

    tp = trainable_parameters(model)
    src = args.data or f"embedded textures ({len(classes)} classes)"
    print(f"model {args.model} + {args.method} | {tp} | device {dev} | img {img_size} | data {src}: "
          f"{len(train_loader.dataset)} train / {len(val_loader.dataset)} val", flush=True)
    if args.no_progress:
        def progress(it, **_):
            return it
    else:
        from tqdm.auto import tqdm as progress

    while state.epoch < args.epochs:
        m = train_one_epoch(model, train_loader, opt, sched, args, state, progress)
        m["val_acc"] = evaluate(model, val_loader, args)
        m["epoch"] = state.epoch + 1
        m["peak_memory"] = _peak_memory(dev)
        state.history.append(m)
        state.epoch += 1
        print(f"epoch {m['epoch']}/{args.epochs}  train_loss {m['train_loss']:.4f}  val_acc {m['val_acc']:.2f}%  "
              f"{m['images_per_s']:.1f} img/s  peak mem {m['peak_memory']}", flush=True)
        # an atomic checkpoint (trainable tensors + opt + sched + asdict(state)) would be written here for --resume.

    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "adapters.safetensors")
    save_adapters(model, path)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump({"args": {k: v for k, v in vars(args).items() if not k.startswith("_")}, "classes": classes,
                   "trainable": tp._asdict(), "state": asdict(state)}, f, indent=1, default=str)
    print(f"saved adapter weights to {path} (chance accuracy {100.0 / len(classes):.1f}%)", flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
