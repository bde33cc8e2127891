"""Image-caption data readers for the retrieval job: one entry point, :func:`read_split`, four formats.

``--format`` (``auto`` detects it from ``--data``):

* ``harma`` — HarMA / PIR json: ``--data PREFIX`` with ``PREFIX_train.json`` (a list with one entry per caption:
  ``{"image", "caption", "image_id"}``) and ``PREFIX_val.json`` / ``PREFIX_test.json`` (one entry per image:
  ``{"image", "caption": [...]}``; a single string is taken as one caption);
* ``karpathy`` — Karpathy json (``dataset_rsicd.json`` style): ``{"images": [{"filename", "split",
  "sentences": [{"raw"}, ...]}, ...]}`` (``filepath`` joined in front of ``filename`` when present;
  split ``restval`` counts as train);
* ``precomp`` — AMFMN precomp txt: ``--data DIR`` with ``{split}_caps.txt`` (one caption per line) and
  ``{split}_filename.txt`` (one file name per caption, or one per image when there are k captions per image,
  consecutive);
* ``csv`` — GeoRSCLIP CSV: columns ``filename`` and ``title`` (one row per caption; ``--encoding``), either one
  file with a ``split`` column or ``PREFIX_{split}.csv`` files.

Image paths are relative to ``--images DIR`` (absolute paths are kept). Captions are cleaned as HarMA does
(:func:`clean_caption`) and cut at 30 words (HarMA's ``max_words``). Any number of captions per image. In a HarMA
train json, ``image_id`` names the image: every entry with the same id must name the same ``image`` (HarMA loads
each entry's own file and pairs by id). Errors (:class:`DataError`, a ``ValueError``) are complete one-line
messages (a caller prints ``str(e)`` as it is) that name the file and the entry: a missing image, an empty caption,
an unknown split, a malformed entry; missing images are listed together, a missing ``--images`` folder once.
"""
from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from typing import Optional

__all__ = ["CaptionSplit", "DataError", "clean_caption", "detect_format", "read_split", "FORMATS", "SPLITS", "MAX_WORDS"]

FORMATS = ("auto", "harma", "karpathy", "precomp", "csv")
MAX_WORDS = 30  # HarMA's caption length (dataset/re_dataset.py); = recipe.HARMA_RECIPE.max_words
SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """Malformed retrieval data; the message names the file and the entry (complete: print it without a prefix)."""


@dataclass
class CaptionSplit:
    """One split: ``images`` (paths), ``captions`` (flat), ``txt_to_img`` (the image index of each caption)."""

    images: list
    captions: list
    txt_to_img: list
    source: str = ""
    entries: list = field(default_factory=list)  # per image: where it was declared (file, entry), for messages
    names: list = field(default_factory=list)  # per image: the name as the data file gives it

    @property
    def n_images(self) -> int:
        return len(self.images)

    @property
    def n_captions(self) -> int:
        return len(self.captions)


_PUNCT = re.compile(r"([,.'!?\"()*#:;~])")
_SPACES = re.compile(r"\s{2,}")


def clean_caption(caption: str, max_words: Optional[int] = None) -> str:
    """HarMA's (ALBEF's) ``pre_caption``: lower case, punctuation ``,.'!?"()*#:;~`` removed, ``-`` and ``/`` as
    spaces, ``<person>`` → ``person``, runs of white space collapsed, stripped, truncated to ``max_words``."""
    c = _PUNCT.sub("", caption.lower()).replace("-", " ").replace("/", " ").replace("<person>", "person")
    c = _SPACES.sub(" ", c).rstrip("\n").strip(" ")
    if max_words is not None:
        words = c.split(" ")
        if len(words) > max_words:
            c = " ".join(words[:max_words])
    return c


class _Builder:
    def __init__(self, root: Optional[str], max_words: Optional[int], check_files: bool):
        self.root, self.max_words, self.check_files = root, max_words, check_files
        self.index: dict = {}
        self.split = CaptionSplit([], [], [])
        self.missing: list = []

    def add(self, image: str, caption, where: str, key=None) -> None:
        if not isinstance(image, str) or not image:
            raise DataError(f"{where}: no image file name")
        if not isinstance(caption, str):
            raise DataError(f"{where}: caption must be a string, got {type(caption).__name__}")
        text = clean_caption(caption, self.max_words)
        if not text:
            raise DataError(f"{where}: empty caption {caption!r} (after cleaning)")
        key = image if key is None else key
        i = self.index.get(key)
        if i is not None and key != image and self.split.names[i] != image:
            raise DataError(f"{where}: image {image!r} disagrees with its image_id {key!r}, which "
                            f"{self.split.entries[i]} gives to image {self.split.names[i]!r}")
        if i is None:
            path = image if (self.root is None or os.path.isabs(image)) else os.path.join(self.root, image)
            if self.check_files and not os.path.isfile(path):
                self.missing.append(f"{where}: image {image!r} not found" + (f" under --images {self.root}" if self.root else ""))
            i = self.index[key] = len(self.split.images)
            self.split.images.append(path)
            self.split.names.append(image)
            self.split.entries.append(where)
        self.split.captions.append(text)
        self.split.txt_to_img.append(i)

    def done(self, source: str) -> CaptionSplit:
        if self.missing:
            more = f"\n  ... and {len(self.missing) - 20} more" if len(self.missing) > 20 else ""
            raise DataError(f"{source}: {len(self.missing)} image(s) missing:\n  " + "\n  ".join(self.missing[:20]) + more)
        if not self.split.images:
            raise DataError(f"{source}: no entries")
        self.split.source = source
        return self.split


def _load_json(path: str, hint: str = ""):
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file" + (f"; {hint}" if hint else ""))
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid json ({e})") from None


def _read_harma(prefix: str, split: str, b: _Builder) -> CaptionSplit:
    path = f"{prefix}_{split}.json"
    data = _load_json(path, "--format harma reads PREFIX_train.json, PREFIX_val.json and PREFIX_test.json: pass "
                            "--data PREFIX" + (f" (--data {prefix} is one file: --format karpathy?)" if os.path.isfile(prefix) else ""))
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of entries, got {type(data).__name__}")
    for n, e in enumerate(data):
        where = f"{path} entry {n}"
        if not isinstance(e, dict) or "image" not in e or "caption" not in e:
            raise DataError(f"{where}: expected an object with 'image' and 'caption'")
        caps = e["caption"] if isinstance(e["caption"], list) else [e["caption"]]
        if not caps:
            raise DataError(f"{where}: empty caption list")
        for c in caps:
            b.add(e["image"], c, where, key=e.get("image_id", e["image"]) if split == "train" else e["image"])
    return b.done(path)


def _read_karpathy(path: str, split: str, b: _Builder) -> CaptionSplit:
    data = _load_json(path, "--format karpathy reads one .json file (e.g. dataset_rsicd.json)"
                            + (f"; {path}_train.json exists: that is --format harma" if os.path.isfile(f"{path}_train.json") else ""))
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path}: expected {{'images': [...]}} (Karpathy format)")
    for n, e in enumerate(data["images"]):
        where = f"{path} images[{n}]"
        if not isinstance(e, dict) or "filename" not in e or "sentences" not in e:
            raise DataError(f"{where}: expected 'filename', 'split' and 'sentences'")
        s = e.get("split")
        if s not in ("train", "val", "test", "restval"):
            raise DataError(f"{where}: unknown split {s!r} (expected train, val, test or restval)")
        if (s if s != "restval" else "train") != split:
            continue
        if not e["sentences"]:
            raise DataError(f"{where}: no sentences")
        name = os.path.join(e["filepath"], e["filename"]) if e.get("filepath") else e["filename"]
        for m, sent in enumerate(e["sentences"]):
            text = sent.get("raw") if isinstance(sent, dict) else sent
            if text is None and isinstance(sent, dict) and "tokens" in sent:
                text = " ".join(sent["tokens"])
            b.add(name, text, f"{where}.sentences[{m}]", key=n)
    return b.done(f"{path} (split {split})")


def _read_lines(path: str, encoding: str) -> list:
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    with open(path, encoding=encoding) as f:
        return [ln.rstrip("\r\n") for ln in f]


def _read_precomp(folder: str, split: str, b: _Builder, encoding: str) -> CaptionSplit:
    cp, fp = os.path.join(folder, f"{split}_caps.txt"), os.path.join(folder, f"{split}_filename.txt")
    caps, files = _read_lines(cp, encoding), _read_lines(fp, encoding)
    while caps and not caps[-1].strip():  # trailing blank lines
        caps.pop()
    while files and not files[-1].strip():
        files.pop()
    if not files:
        raise DataError(f"{fp}: no file names")
    if len(files) == len(caps):
        per = 1
    elif len(caps) % len(files) == 0:
        per = len(caps) // len(files)
    else:
        raise DataError(f"{cp} has {len(caps)} captions and {fp} {len(files)} file names: expected one file name per caption "
                        "or the same number of captions for every file name")
    for n, c in enumerate(caps):
        f = files[n // per].strip()
        b.add(f, c, f"{cp} line {n + 1} (image {fp} line {n // per + 1})")
    return b.done(cp)


def _read_csv(data: str, split: str, b: _Builder, encoding: str) -> CaptionSplit:
    one_file = os.path.isfile(data)
    path = data if one_file else f"{data}_{split}.csv"
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file (csv: one file with a 'split' column, or PREFIX_train.csv / _val / _test)")
    with open(path, encoding=encoding, newline="") as f:
        sample = f.read(4096)
        f.seek(0)
        try:
            dialect = csv.Sniffer().sniff(sample, delimiters=",\t;")
        except csv.Error:
            dialect = csv.excel
        rows = csv.DictReader(f, dialect=dialect)
        cols = rows.fieldnames or []
        if "filename" not in cols or "title" not in cols:
            raise DataError(f"{path}: expected columns 'filename' and 'title' (GeoRSCLIP), got {cols}")
        if one_file and "split" not in cols:
            raise DataError(f"{path}: no 'split' column; give one, or pass PREFIX with PREFIX_train.csv / PREFIX_val.csv / PREFIX_test.csv")
        for n, r in enumerate(rows):
            where = f"{path} row {n + 2}"
            if one_file:
                s = (r.get("split") or "").strip()
                if s not in SPLITS:
                    raise DataError(f"{where}: unknown split {s!r} (expected train, val or test)")
                if s != split:
                    continue
            b.add((r["filename"] or "").strip(), r["title"] or "", where)
    return b.done(f"{path} (split {split})" if one_file else path)


def detect_format(data: str) -> str:
    """The format of ``--data`` (see the module docstring)."""
    if os.path.isdir(data) and any(n.endswith("_caps.txt") for n in os.listdir(data)):
        return "precomp"
    if os.path.isfile(data):
        if data.endswith(".csv"):
            return "csv"
        if data.endswith(".json"):
            return "karpathy"
    if os.path.isfile(f"{data}_train.json"):
        return "harma"
    if os.path.isfile(f"{data}_train.csv"):
        return "csv"
    raise DataError(f"--data {data}: cannot tell the format (a precomp folder with *_caps.txt, a Karpathy .json, a .csv, "
                    "or a PREFIX with PREFIX_train.json / PREFIX_train.csv); pass --format")


def read_split(data: str, split: str, fmt: str = "auto", images: Optional[str] = None, encoding: str = "utf-8",
               max_words: Optional[int] = MAX_WORDS, check_files: bool = True) -> CaptionSplit:
    """Read ``split`` (train / val / test) of ``data`` in format ``fmt``; image paths joined to ``images``; captions
    cut at ``max_words`` words (HarMA: 30; ``None``: not cut)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} (expected train, val or test)")
    if fmt not in FORMATS:
        raise DataError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if max_words is not None and (isinstance(max_words, bool) or not isinstance(max_words, int) or max_words < 1):
        raise DataError(f"--max-words {max_words!r}: expected a positive int (or none)")
    if check_files and images is not None and not os.path.isdir(images):
        raise DataError(f"--images {images}: no such folder")
    fmt = detect_format(data) if fmt == "auto" else fmt
    b = _Builder(images, max_words, check_files)
    if fmt == "harma":
        return _read_harma(data, split, b)
    if fmt == "karpathy":
        return _read_karpathy(data, split, b)
    if fmt == "precomp":
        return _read_precomp(data, split, b, encoding)
    return _read_csv(data, split, b, encoding)
