"""Data for the training jobs: resumable sampling, per-sample seeded augmentation, up-front image checks,
and the classification data (torchvision ``ImageFolder`` + timm's ``resolve_data_config`` / ``create_transform``).

Resumable loading. We kept the hand-written sampler over torchdata's ``StatefulDataLoader`` (torchdata is not
a dependency here): the training order is a permutation drawn per epoch from the sampler's own generator
(:class:`ResumableSampler`; a checkpoint stores the generator state at the start of the epoch and the step),
and each sample's random augmentation is seeded from (seed, epoch, index) (:class:`SeededSamples`: torch,
python and numpy RNGs, which timm's RandAugment uses), so neither depends on the DataLoader workers or on
where the run was interrupted. That is all a bit-exact resume needs; a ``StatefulDataLoader`` would add a
dependency and still need the per-sample seeding for worker-count independence.

Bad data fails before training (:func:`check_images`): every image file is opened and verified (header and,
for PNG, every chunk's CRC; ``PIL.Image.verify``, no decoding) in the DataLoader's workers, and the job stops
with one error listing the unreadable files, or with ``--skip-bad-images`` drops them with a warning and a count.
"""
from __future__ import annotations

import os
import random
import warnings
from typing import Optional, Sequence

import torch

__all__ = ["ResumableSampler", "SeededSamples", "check_images", "scan", "classification_datasets", "class_names",
           "EmbeddedTextures", "IMG_EXT"]

IMG_EXT = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


# --------------------------------------------------------------------------------------------------
# resumable order and seeded augmentation


class ResumableSampler(torch.utils.data.Sampler):
    """A random permutation per epoch from the sampler's own generator, yielding ``(epoch, index)`` from
    step ``start_step`` on. ``begin_epoch`` records the generator state at the start of the epoch, which
    (with the step) is all a checkpoint needs to replay the rest of the epoch.

    Under ``torch.distributed`` (``world`` > 1) step ``g`` covers the global batch ``perm[g*B*W:(g+1)*B*W]``
    and rank ``r`` reads its slice ``[r*B, (r+1)*B)`` (``B`` the per-rank batch): W processes with batch B
    see exactly the samples of one process with batch B*W; the last incomplete global batch is dropped.
    """

    def __init__(self, n: int, seed: int, batch_size: int = 1, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.rank, self.world = int(n), int(batch_size), int(rank), int(world)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.epoch, self.start_step, self.perm, self.epoch_start_state = 0, 0, None, None

    def begin_epoch(self, epoch: int, start_step: int = 0, generator_state: Optional[torch.Tensor] = None) -> None:
        if generator_state is not None:
            self.generator.set_state(generator_state)
        self.epoch_start_state = self.generator.get_state()
        self.perm = torch.randperm(self.n, generator=self.generator).tolist()
        self.epoch, self.start_step = int(epoch), int(start_step)

    def __iter__(self):
        if self.perm is None:
            raise RuntimeError("ResumableSampler: call begin_epoch() before iterating")
        b = self.batch_size
        if self.world == 1:
            for i in self.perm[self.start_step * b:]:
                yield (self.epoch, i)
            return
        gb = b * self.world
        for g in range(self.start_step, self.n // gb):
            for i in self.perm[g * gb + self.rank * b: g * gb + (self.rank + 1) * b]:
                yield (self.epoch, i)

    def __len__(self) -> int:
        return self.n if self.world == 1 else (self.n // (self.batch_size * self.world)) * self.batch_size


class SeededSamples(torch.utils.data.Dataset):
    """``dataset[(epoch, i)]`` = ``base[i]`` with the torch, python and numpy RNGs seeded from (seed, epoch, i)
    while it is read (and restored after): random augmentations are a function of the sample, not of the
    worker or the interruption point."""

    def __init__(self, base, seed: int):
        self.base, self.seed = base, int(seed)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        epoch, i = key
        s = (self.seed * 1_000_003 + epoch) * 10_000_019 + i
        py = random.getstate()
        try:
            import numpy as np

            ns = np.random.get_state()
            np.random.seed(s % 2**32)
        except ImportError:  # pragma: no cover
            np, ns = None, None
        try:
            random.seed(s)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(s)
                return self.base[i]
        finally:
            random.setstate(py)
            if np is not None:
                np.random.set_state(ns)


# --------------------------------------------------------------------------------------------------
# up-front image checks


class _HeaderCheck(torch.utils.data.Dataset):
    def __init__(self, paths):
        self.paths = list(paths)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image

        p = self.paths[i]
        try:
            with Image.open(p) as im:
                im.verify()
            return i, ""
        except Exception as e:  # any reader error: PIL raises many types
            return i, f"{type(e).__name__}: {e}"


def scan(checker, n: int, *, workers: int = 0, batch_size: int = 64, desc: str = "checking", progress=None) -> dict:
    """Run ``checker[i] -> (i, message)`` (a Dataset: "" = fine) over ``range(n)`` in ``workers`` DataLoader
    workers, with a progress bar; returns ``{i: message}`` of the items that failed. The one place that checks
    data up front in parallel (images here, dense samples in :mod:`rspeft_fast.dense.readers`)."""
    loader = torch.utils.data.DataLoader(checker, batch_size=batch_size, num_workers=workers,
                                         collate_fn=lambda b: b, shuffle=False)
    it = progress(loader, desc=desc, leave=False) if progress is not None else loader
    return {i: msg for chunk in it for i, msg in chunk if msg}


def check_images(paths: Sequence[str], *, workers: int = 0, skip_bad: bool = False, what: str = "images",
                 progress=None) -> list:
    """Open and verify every file of ``paths`` (in ``workers`` DataLoader workers). Returns the indices of the
    readable ones; with unreadable files, raises ``SystemExit`` listing them, or with ``skip_bad`` warns with
    the count and drops them."""
    if not paths:
        return []
    bad = scan(_HeaderCheck(paths), len(paths), workers=workers, desc=f"checking {len(paths)} {what}", progress=progress)
    if not bad:
        return list(range(len(paths)))
    lines = [f"  {paths[i]}: {bad[i]}" for i in sorted(bad)[:50]]
    if len(bad) > 50:
        lines.append(f"  ... and {len(bad) - 50} more")
    if not skip_bad:
        raise SystemExit(f"{len(bad)} of {len(paths)} {what} cannot be read (fix or remove them, or pass "
                         "--skip-bad-images to drop them):\n" + "\n".join(lines))
    warnings.warn(f"--skip-bad-images: dropped {len(bad)} unreadable file(s) of {len(paths)} {what}:\n" + "\n".join(lines[:10]),
                  stacklevel=2)
    return [i for i in range(len(paths)) if i not in bad]


# --------------------------------------------------------------------------------------------------
# classification data


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMG_EXT)


def class_names(root: str) -> list:
    """The class folders of ``--data DIR`` (``DIR/train`` when DIR has train/ and val/)."""
    if not os.path.isdir(root):
        raise SystemExit(f"--data {root}: not a directory")
    sub = os.path.join(root, "train")
    if os.path.isdir(sub) and os.path.isdir(os.path.join(root, "val")):
        root = sub
    found = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not found:
        raise SystemExit(f"--data {root}: no class folders (expected one sub-folder per class, as in UCM / NWPU-RESISC45 / AID)")
    return found


def _image_folder(root: str, transform, classes=None):
    from torchvision.datasets import ImageFolder

    if classes is not None:
        missing = [c for c in classes if not os.path.isdir(os.path.join(root, c))]
        if missing:
            raise SystemExit(f"--data {root}: class folder {missing[0]!r} missing")
    try:
        ds = ImageFolder(root, transform=transform, is_valid_file=_is_image, allow_empty=True)
    except FileNotFoundError as e:
        raise SystemExit(f"--data {root}: {e}") from None
    if classes is not None and ds.classes != list(classes):  # val/ must index classes as train/ does
        extra = sorted(set(ds.classes) - set(classes))
        raise SystemExit(f"--data {root}: class folders {extra} are not in the training split")
    if not ds.samples:
        raise SystemExit(f"--data {root}: no images ({', '.join(IMG_EXT)}) found")
    return ds


def _with_samples(ds, samples, transform):
    import copy

    out = copy.copy(ds)
    out.samples = out.imgs = list(samples)
    out.targets = [t for _, t in samples]
    out.transform = transform
    return out


class EmbeddedTextures(torch.utils.data.Dataset):
    """The embedded texture set (:func:`rspeft_fast.data.make_textures`) as PIL images through a transform."""

    def __init__(self, split: str, per_class: int, size: int, seed: int, transform):
        from ..data import make_textures

        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        imgs, self.labels, self.classes = make_textures(per_class, size, seed=seed * 2 + (split == "val") + 1)
        self.images = imgs.permute(0, 2, 3, 1).contiguous().numpy()  # (N, H, W, 3) uint8
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def timm_transforms(model, args, img_size: Optional[int]):
    """``(train transform, eval transform, data config)`` from the model's pretrained config (mean / std,
    interpolation, crop) and the augmentation options, as timm's own fine-tuning builds them."""
    from timm.data import create_transform, resolve_data_config

    over = {"input_size": (3, img_size, img_size)} if img_size else {}
    cfg = resolve_data_config(over, model=model)
    aa = None if args.aa in (None, "", "none") else args.aa
    t_train = create_transform(**cfg, is_training=True, scale=tuple(args.scale), hflip=args.hflip, vflip=args.vflip,
                               color_jitter=args.color_jitter, auto_augment=aa, re_prob=args.reprob)
    t_eval = create_transform(**cfg, is_training=False)
    return t_train, t_eval, cfg


def classification_datasets(args, model, img_size, progress=None):
    """``(train set, val set, class names, data config, workers)`` of ``--data`` (or the embedded textures) through
    timm's transforms; every image of ``--data`` is checked first (:func:`check_images`)."""
    t_train, t_eval, cfg = timm_transforms(model, args, img_size)
    size = int(cfg["input_size"][-1])
    if args.data is None:
        tr = EmbeddedTextures("train", args.embedded_per_class, size, args.seed, t_train)
        va = EmbeddedTextures("val", max(args.embedded_per_class // 4, 2), size, args.seed, t_eval)
        return tr, va, list(tr.classes), cfg, 0
    root = args.data
    classes = class_names(root)
    if os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "val")):
        tr = _image_folder(os.path.join(root, "train"), t_train)
        va = _image_folder(os.path.join(root, "val"), t_eval, classes)
        tr_s, va_s = tr.samples, va.samples
    else:
        tr = _image_folder(root, t_train)
        rng = random.Random(args.seed)
        tr_s, va_s = [], []
        for k in range(len(classes)):
            cls_items = [it for it in tr.samples if it[1] == k]
            rng.shuffle(cls_items)
            n_val = max(1, int(round(len(cls_items) * args.val_fraction))) if len(cls_items) > 1 else 0
            va_s += cls_items[:n_val]
            tr_s += cls_items[n_val:]
        va = tr
    every = tr_s + va_s
    ok = set(check_images([p for p, _ in every], workers=args.workers, skip_bad=args.skip_bad_images,
                          what=f"images under {root}", progress=progress))
    n_tr = len(tr_s)
    tr_s = [s for i, s in enumerate(tr_s) if i in ok]
    va_s = [s for j, s in enumerate(va_s) if n_tr + j in ok]
    if not tr_s:
        raise SystemExit(f"--data {root}: no readable training images")
    return _with_samples(tr, tr_s, t_train), _with_samples(va, va_s, t_eval), classes, cfg, args.workers
