"""Readers of the dense layouts users have (SPEC §6), each turning a folder into train / val / test lists of files
plus the rule that turns a mask file into class indices (255 = ignore):

================  ==========================================================  =====================================
``--format``      layout                                                      masks
================  ==========================================================  =====================================
``folders``       ``{split}/{images,masks}/NAME.ext``                          index PNG, ``0..C-1``, 255 ignore;
                                                                              classes from ``classes.txt`` (one
                                                                              name a line) or ``--classes``
``loveda``        ``{Train,Val}/{Urban,Rural}/{images_png,masks_png}/N.png``    0 no-data → ignore, 1–7 → 0–6
``potsdam``       ``{split}/{images,masks}/NAME.ext`` (ISPRS Potsdam /          RGB palette → index (SPEC §6);
                  Vaihingen, already tiled)                                   black (eroded boundaries) → ignore;
                                                                              ``ignore_classes`` → ignore
``potsdam``       raw ISPRS tiles: ``top_potsdam_I_J_RGB.tif`` and             as above; cut into ``crop`` × ``crop``
                  ``top_potsdam_I_J_label.tif`` anywhere under the root        PNGs once (:func:`cut_isprs_tiles`)
                  (``2_Ortho_RGB/``, ``5_Labels_all/``)
``levircd``       ``{split}/{A,B,label}/NAME.ext`` (LEVIR-CD, WHU-CD)          0 / 255 (or 0 / 1) → 0 / 1
================  ==========================================================  =====================================

Raw ISPRS Potsdam tiles (6000 × 6000) are split by tile as mmsegmentation's converter does (test: tiles 2_13, 2_14,
3_13, 3_14, 4_13, 4_14, 4_15, 5_13, 5_14, 5_15, 6_13, 6_14, 6_15, 7_13; train: the rest; no separate val split,
so the epoch is selected on the test tiles, as the published numbers are) and cut once into non-overlapping
``crop``-sized PNG crops (the last row and column flush with the tile's edge) under ``ROOT/crops<crop>/``, which
is then read as the tiled layout.

``auto`` picks by the folders present (``Train/Urban`` → loveda; ``{split}/A`` → levircd; ``{split}/masks`` →
potsdam when the first mask is RGB, else folders). Split folders are matched case-insensitively
(``train``, ``val`` / ``validation``, ``test``). A layout without a labelled test split (LoveDA's test
labels are withheld) scores the val split as test, and one without val selects on test; either is said in
:attr:`DenseData.notes` (and in ``metrics.json``).

Every problem names its file, and all are found before training (:func:`check_data`): an image without its
mask (or a mask without its image, a date without its partner), files that cannot be read, sizes that differ
between an image and its mask (or A, B and label), and mask values outside the class set.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

__all__ = ["FORMATS", "DataError", "DenseData", "read_dense", "check_data", "decode_mask", "POTSDAM_CLASSES",
           "POTSDAM_PALETTE", "LOVEDA_CLASSES", "CHANGE_CLASSES", "rgb_to_index", "index_to_rgb", "IMG_EXT",
           "isprs_raw_tiles", "cut_isprs_tiles", "POTSDAM_TEST_TILES"]

FORMATS = ("auto", "folders", "loveda", "potsdam", "levircd")
IMG_EXT = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
IGNORE = 255

POTSDAM_CLASSES = ("impervious_surfaces", "building", "low_vegetation", "tree", "car", "clutter")
POTSDAM_PALETTE = ((255, 255, 255), (0, 0, 255), (0, 255, 255), (0, 255, 0), (255, 255, 0), (255, 0, 0))
LOVEDA_CLASSES = ("background", "building", "road", "water", "barren", "forest", "agriculture")
CHANGE_CLASSES = ("unchanged", "changed")


class DataError(ValueError):
    """A dataset problem; the message names the file (or folder)."""


@dataclass
class DenseData:
    """A dataset read from a layout: per split a list of file tuples (``(image, mask)`` for segmentation,
    ``(a, b, label)`` for change detection), the class names and the mask rule (:func:`decode_mask`)."""

    task: str  # "segment" | "change"
    format: str
    classes: tuple
    splits: dict  # split -> list of tuples of paths
    mask_rule: dict  # keyword arguments of decode_mask
    notes: list = field(default_factory=list)
    root: str = ""

    def decode(self, path: str) -> np.ndarray:
        return decode_mask(path, **self.mask_rule)


# --------------------------------------------------------------------------------------------------
# masks


def rgb_to_index(rgb: np.ndarray, palette: Sequence[tuple], *, ignore_colors: Sequence[tuple] = (), path: str = "") -> np.ndarray:
    """``(H, W, 3)`` uint8 colours → ``(H, W)`` uint8 indices into ``palette`` (255 for ``ignore_colors`` and
    for palette entries given as ``None``); another colour raises :class:`DataError` naming ``path``."""
    key = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2].astype(np.int64)
    uniq, inv = np.unique(key.reshape(-1), return_inverse=True)
    table = {}
    for i, c in enumerate(palette):
        if c is not None:
            table[(c[0] << 16) | (c[1] << 8) | c[2]] = i
    for c in ignore_colors:
        table[(c[0] << 16) | (c[1] << 8) | c[2]] = IGNORE
    lut = np.empty(len(uniq), dtype=np.uint8)
    for j, k in enumerate(uniq.tolist()):
        if k not in table:
            raise DataError(f"{path}: colour {(k >> 16, (k >> 8) & 255, k & 255)} is not in the label palette "
                            f"{[tuple(c) for c in palette if c is not None]}")
        lut[j] = table[k]
    return lut[inv].reshape(key.shape)


def index_to_rgb(index: np.ndarray, palette: Sequence[tuple], ignore_color=(0, 0, 0)) -> np.ndarray:
    """``(H, W)`` indices → ``(H, W, 3)`` uint8 colours of ``palette`` (255 → ``ignore_color``)."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:] = ignore_color
    for i, c in enumerate(palette):
        lut[i] = c
    return lut[index]


def decode_mask(path: str, *, kind: str, num_classes: int, palette=None, ignore_colors=(), remap=None) -> np.ndarray:
    """The ``(H, W)`` uint8 class-index map (255 = ignore) of a mask file.

    ``kind``: ``"index"`` (values ``0..num_classes-1`` and 255; ``remap``: a ``{value: index}`` table applied
    first, a value not in it is an error), ``"rgb"`` (``palette`` colours; ``ignore_colors`` → 255), ``"binary"``
    (0 / 255 or 0 / 1 → 0 / 1). Values outside the class set raise :class:`DataError` naming the file."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if kind == "rgb":
                arr = np.asarray(im.convert("RGB"))
            elif im.mode in ("L", "P", "I;16", "I", "1"):
                arr = np.asarray(im if im.mode != "1" else im.convert("L"))
            else:  # an RGB rendering of a grey mask (LEVIR-CD ships some): one channel must say it all
                rgb = np.asarray(im.convert("RGB"))
                if not ((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()):
                    raise DataError(f"{path}: a {im.mode} mask with colours; expected a single-channel index mask "
                                    "(colour-coded labels: --format potsdam)")
                arr = rgb[..., 0]
    except DataError:
        raise
    except Exception as e:  # PIL raises many types
        raise DataError(f"{path}: cannot read the mask ({type(e).__name__}: {e})") from None
    if kind == "rgb":
        return rgb_to_index(arr, palette, ignore_colors=ignore_colors, path=path)
    arr = arr.astype(np.int64)
    vals = np.unique(arr)
    if kind == "binary":
        if set(vals.tolist()) <= {0, 255}:
            return (arr == 255).astype(np.uint8)
        if set(vals.tolist()) <= {0, 1}:
            return arr.astype(np.uint8)
        raise DataError(f"{path}: change labels must be 0 / 255 (or 0 / 1), found values {vals[:10].tolist()}")
    if remap is not None:
        bad = [int(v) for v in vals if int(v) not in remap]
        if bad:
            raise DataError(f"{path}: mask values {bad[:10]} are outside the class set {sorted(remap)}")
        lut = np.full(int(vals.max()) + 1, IGNORE, dtype=np.uint8)
        for k, v in remap.items():
            if k < len(lut):
                lut[k] = v
        return lut[arr]
    bad = [int(v) for v in vals if not (0 <= v < num_classes or v == IGNORE)]
    if bad:
        raise DataError(f"{path}: mask values {bad[:10]} are outside the class set 0..{num_classes - 1} (255 = ignore)")
    return arr.astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# layouts


_SPLIT_NAMES = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}


def _subdir(root: str, *names: str) -> Optional[str]:
    """The child of ``root`` whose name matches one of ``names`` case-insensitively."""
    if not os.path.isdir(root):
        return None
    want = {n.lower() for n in names}
    for e in sorted(os.listdir(root)):
        if e.lower() in want and os.path.isdir(os.path.join(root, e)):
            return os.path.join(root, e)
    return None


def _images_by_stem(folder: str) -> dict:
    out = {}
    for f in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(f)
        if ext.lower() in IMG_EXT and not f.startswith("."):
            out[stem] = os.path.join(folder, f)
    return out


def _pair(folders: Sequence[str], errors: list) -> list:
    """Tuples of files with the same stem in each of ``folders``; a stem missing in some folder is an error
    naming the file that has no partner."""
    maps = [_images_by_stem(f) for f in folders]
    stems = sorted(set().union(*maps))
    out = []
    for s in stems:
        missing = [f for f, m in zip(folders, maps) if s not in m]
        if missing:
            have = next(m[s] for m in maps if s in m)
            errors.append((have, f"{have}: no partner named {s}.* in {', '.join(missing)}"))
            continue
        out.append(tuple(m[s] for m in maps))
    return out


def _finish_splits(found: dict, root: str, notes: list) -> dict:
    if not found.get("train"):
        raise DataError(f"{root}: no training samples (expected a train split; found {sorted(k for k, v in found.items() if v)})")
    if not found.get("val") and not found.get("test"):
        raise DataError(f"{root}: no val or test split next to train")
    if not found.get("test"):
        found["test"] = found["val"]
        notes.append("no labelled test split: the val split is scored as test (selection and test on the same images)")
    if not found.get("val"):
        found["val"] = found["test"]
        notes.append("no val split: the epoch is selected on the test split")
    return {k: found[k] for k in ("train", "val", "test")}


# mmsegmentation's tools/dataset_converters/potsdam.py: the tiles of its val (= reported test) split
POTSDAM_TEST_TILES = ("2_13", "2_14", "3_13", "3_14", "4_13", "4_14", "4_15", "5_13", "5_14", "5_15", "6_13", "6_14",
                      "6_15", "7_13")
_RAW_IMAGE, _RAW_LABEL = "_RGB.tif", "_label.tif"


def isprs_raw_tiles(root: str, errors: Optional[list] = None) -> list:
    """``[(tile_id, image, label)]`` of the raw ISPRS Potsdam tiles anywhere under ``root`` (``top_potsdam_2_10_RGB.tif``
    with ``top_potsdam_2_10_label.tif``; tile id ``"2_10"``), sorted; a tile without its partner is appended to
    ``errors`` as ``(file, message)``."""
    images, labels = {}, {}
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if not x.startswith(".") and not x.startswith("crops"))
        for f in sorted(files):
            if f.startswith("top_potsdam_") and f.endswith(_RAW_IMAGE):
                images[f[: -len(_RAW_IMAGE)]] = os.path.join(d, f)
            elif f.startswith("top_potsdam_") and f.endswith(_RAW_LABEL):
                labels[f[: -len(_RAW_LABEL)]] = os.path.join(d, f)
    out = []
    for key in sorted(set(images) | set(labels)):
        if key not in images or key not in labels:
            have = images.get(key) or labels[key]
            want = key + (_RAW_LABEL if key in images else _RAW_IMAGE)
            if errors is not None:
                errors.append((have, f"{have}: no partner {want} under {root}"))
            continue
        out.append(("_".join(key.split("_")[-2:]), images[key], labels[key]))
    return out


def _crop_starts(size: int, crop: int) -> list:
    if size <= crop:
        return [0]
    return list(range(0, size - crop, crop)) + [size - crop]


def cut_isprs_tiles(root: str, crop: int = 512, errors: Optional[list] = None) -> str:
    """Cut the raw tiles of :func:`isprs_raw_tiles` into ``crop`` × ``crop`` PNGs under ``ROOT/crops<crop>/{train,test}/
    {images,masks}/`` (test: :data:`POTSDAM_TEST_TILES`), once (a ``done`` file marks a finished cut); returns that
    folder. An unreadable tile or an image and label of different sizes raise :class:`DataError` naming the file."""
    import numpy as np
    from PIL import Image

    from .._fileio import atomic_write_text

    out = os.path.join(root, f"crops{int(crop)}")
    tiles = isprs_raw_tiles(root, errors)
    marker = os.path.join(out, "done")
    listing = "\n".join(t for t, _, _ in tiles)
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as f:
            if f.read() == listing:
                return out
        import shutil

        shutil.rmtree(out)  # our earlier cut of another set of tiles: no stale crops
    Image.MAX_IMAGE_PIXELS = None  # 6000 x 6000 tiles are legitimate
    for tile, img_path, lab_path in tiles:
        split = "test" if tile in POTSDAM_TEST_TILES else "train"
        arrays = []
        for p in (img_path, lab_path):
            try:
                with Image.open(p) as im:
                    arrays.append(np.asarray(im.convert("RGB")))
            except Exception as e:
                raise DataError(f"{p}: cannot read the tile ({type(e).__name__}: {e})") from None
        if arrays[0].shape != arrays[1].shape:
            raise DataError(f"{lab_path}: label size {arrays[1].shape[1]}x{arrays[1].shape[0]} differs from the image's "
                            f"{arrays[0].shape[1]}x{arrays[0].shape[0]} ({img_path})")
        h, w = arrays[0].shape[:2]
        for sub, arr in zip(("images", "masks"), arrays):
            os.makedirs(os.path.join(out, split, sub), exist_ok=True)
            for y in _crop_starts(h, crop):
                for x in _crop_starts(w, crop):
                    name = f"top_potsdam_{tile}_{y}_{x}.png"
                    Image.fromarray(np.ascontiguousarray(arr[y:y + crop, x:x + crop])).save(os.path.join(out, split, sub, name))
    atomic_write_text(marker, listing)
    return out


def detect_format(root: str) -> str:
    if not os.path.isdir(root):
        raise DataError(f"{root}: no such folder")
    tr = _subdir(root, "train")
    if tr is None and isprs_raw_tiles(root):
        return "potsdam"
    if tr is None:
        raise DataError(f"{root}: no train/ (or LoveDA Train/) folder; layouts: {', '.join(FORMATS[1:])} (see --help)")
    if _subdir(tr, "urban") or _subdir(tr, "rural"):
        return "loveda"
    if _subdir(tr, "a") and _subdir(tr, "b"):
        return "levircd"
    masks = _subdir(tr, "masks")
    if _subdir(tr, "images") and masks:
        from PIL import Image

        first = next(iter(_images_by_stem(masks).values()), None)
        if first is None:
            raise DataError(f"{masks}: no mask files")
        try:
            with Image.open(first) as im:
                mode = im.mode
        except Exception as e:
            raise DataError(f"{first}: cannot read the mask ({type(e).__name__}: {e})") from None
        return "potsdam" if mode in ("RGB", "RGBA") else "folders"
    raise DataError(f"{tr}: neither images/ + masks/ (folders, potsdam), A/ + B/ + label/ (levircd) nor Urban/ Rural/ (loveda)")


def _read_classes(root: str, classes) -> tuple:
    if classes:
        if isinstance(classes, int) or (isinstance(classes, str) and classes.isdigit()):
            return tuple(f"class_{i}" for i in range(int(classes)))
        return tuple(c.strip() for c in (classes.split(",") if isinstance(classes, str) else classes) if c.strip())
    path = os.path.join(root, "classes.txt")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            names = tuple(ln.strip() for ln in f if ln.strip())
        if names:
            return names
    raise DataError(f"{root}: folders layout needs the class names: a classes.txt (one name a line) or --classes N|a,b,c")


def read_dense(root: str, task: str, fmt: str = "auto", *, classes=None, ignore_classes: Sequence[str] = (),
               crop: int = 512) -> tuple:
    """``(DenseData, errors)``: the dataset at ``root`` in layout ``fmt`` for ``task`` (``"segment"`` or
    ``"change"``), and the listing errors (``[(file, message)]``: files without partners) for
    :func:`check_data` to report with the rest. A layout that is not there raises :class:`DataError`. ``crop``:
    the crop size raw ISPRS tiles are cut into (:func:`cut_isprs_tiles`)."""
    fmt = detect_format(root) if fmt == "auto" else fmt
    errors: list = []
    if fmt == "potsdam" and task == "segment" and _subdir(root, "train") is None and isprs_raw_tiles(root):
        raw = root
        root = cut_isprs_tiles(root, crop, errors)
        data, more = read_dense(root, task, "potsdam", ignore_classes=ignore_classes)
        data.notes.insert(0, f"raw ISPRS tiles under {raw} cut into {crop}x{crop} crops in {root} "
                             f"(test tiles: mmsegmentation's {len(POTSDAM_TEST_TILES)})")
        return data, errors + more
    if fmt not in FORMATS[1:]:
        raise DataError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    if (fmt == "levircd") != (task == "change"):
        want = "levircd" if task == "change" else "folders, loveda or potsdam"
        raise DataError(f"{root}: a {fmt} layout is not data for the {task} job (expected {want})")
    notes, found = [], {}
    if fmt == "loveda":
        for split in ("train", "val", "test"):
            sd = _subdir(root, *_SPLIT_NAMES[split])
            items = []
            for domain in ("urban", "rural"):
                dd = _subdir(sd, domain) if sd else None
                if dd is None:
                    continue
                img, msk = _subdir(dd, "images_png"), _subdir(dd, "masks_png")
                if img and msk:
                    items += _pair([img, msk], errors)
            found[split] = items
        data = DenseData(task, fmt, LOVEDA_CLASSES, {}, {"kind": "index", "num_classes": 7,
                                                        "remap": {0: IGNORE, **{i: i - 1 for i in range(1, 8)}}}, notes, root)
    elif fmt == "levircd":
        for split in ("train", "val", "test"):
            sd = _subdir(root, *_SPLIT_NAMES[split])
            dirs = [_subdir(sd, n) for n in ("A", "B", "label")] if sd else []
            if sd and any(d is None for d in dirs):
                raise DataError(f"{sd}: expected A/, B/ and label/ folders")
            found[split] = _pair(dirs, errors) if sd else []
        data = DenseData(task, fmt, CHANGE_CLASSES, {}, {"kind": "binary", "num_classes": 2}, notes, root)
    else:
        for split in ("train", "val", "test"):
            sd = _subdir(root, *_SPLIT_NAMES[split])
            img, msk = (_subdir(sd, "images"), _subdir(sd, "masks")) if sd else (None, None)
            if sd and (img is None or msk is None):
                raise DataError(f"{sd}: expected images/ and masks/ folders")
            found[split] = _pair([img, msk], errors) if sd else []
        if fmt == "potsdam":
            unknown = [c for c in ignore_classes if c not in POTSDAM_CLASSES]
            if unknown:
                raise DataError(f"--ignore-class {unknown}: not an ISPRS class ({', '.join(POTSDAM_CLASSES)})")
            kept = [c for c in POTSDAM_CLASSES if c not in ignore_classes]
            palette = [POTSDAM_PALETTE[POTSDAM_CLASSES.index(c)] for c in kept]
            ignored = [POTSDAM_PALETTE[POTSDAM_CLASSES.index(c)] for c in ignore_classes] + [(0, 0, 0)]
            data = DenseData(task, fmt, tuple(kept), {}, {"kind": "rgb", "num_classes": len(kept), "palette": palette,
                                                          "ignore_colors": ignored}, notes, root)
        else:
            names = _read_classes(root, classes)
            data = DenseData(task, fmt, names, {}, {"kind": "index", "num_classes": len(names)}, notes, root)
    data.splits = _finish_splits(found, root, notes)
    return data, errors


# --------------------------------------------------------------------------------------------------
# up-front checks


class _Check:
    """One sample's check: every file opens, all have one size, the mask decodes within the class set."""

    def __init__(self, samples, decode: Callable):
        self.samples, self.decode = samples, decode

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from PIL import Image

        files = self.samples[i]
        sizes = []
        for f in files:
            try:
                with Image.open(f) as im:
                    sizes.append(im.size)
                    if f is not files[-1]:
                        im.verify()  # header and, for PNG, every chunk's CRC (no decoding); the mask decodes below
            except Exception as e:
                return i, f"{f}: cannot read ({type(e).__name__}: {e})"
        if len(set(sizes)) > 1:
            desc = ", ".join(f"{os.path.basename(os.path.dirname(f))}/{os.path.basename(f)} {w}x{h}" for f, (w, h) in zip(files, sizes))
            return i, f"{files[-1]}: sizes differ ({desc})"
        try:
            self.decode(files[-1])
        except DataError as e:
            return i, str(e)
        return i, ""


def check_data(data: DenseData, listing_errors=(), *, skip_bad: bool = False, workers: int = 0, progress=None,
               warn=print) -> DenseData:
    """Check every sample of every split (:class:`_Check`) plus ``listing_errors``; all problems are reported in
    one :class:`DataError` (the first 20, and the count), or with ``skip_bad`` the bad samples are dropped with a
    warning. Returns ``data`` (with the bad samples dropped)."""
    from ..train.data import scan

    uniq = {}
    for split, items in data.splits.items():
        for s in items:
            uniq.setdefault(s, None)
    samples = list(uniq)
    failed = scan(_Check(samples, data.decode), len(samples), workers=workers, batch_size=16,
                  desc=f"checking {len(samples)} samples", progress=progress)
    bad = {samples[i]: msg for i, msg in failed.items()}
    problems = [m for _, m in listing_errors] + list(bad.values())
    if not problems:
        return data
    if not skip_bad:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DataError(f"{len(problems)} problem(s) in {data.root} (--skip-bad-images drops them):\n  {shown}{more}")
    warn(f"warning: dropping {len(problems)} bad sample(s) of {data.root} (--skip-bad-images); first: {problems[0]}")
    data.splits = {k: [s for s in v if s not in bad] for k, v in data.splits.items()}
    for k, v in data.splits.items():
        if not v:
            raise DataError(f"{data.root}: no usable samples left in the {k} split")
    return data
