"""Dense readers on tiny fixture files (every layout, each error naming its file), the ISPRS palette round trip,
aligned augmentations and the embedded sets' determinism."""
import hashlib
import os

import numpy as np
import pytest
import torch

from rspeft_fast.dense.readers import (POTSDAM_PALETTE, DataError, check_data, index_to_rgb, read_dense,
                                       rgb_to_index)
from rspeft_fast.dense.transforms import Augment, DenseDataset

Image = pytest.importorskip("PIL.Image")


def _png(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(path)


def _img(h=8, w=8):
    return np.random.default_rng(h * w).integers(0, 255, (h, w, 3))


def _folders(root, masks, classes=("a", "b", "c")):
    for split, items in masks.items():
        for name, m in items.items():
            _png(f"{root}/{split}/images/{name}.png", _img(*np.shape(m)[:2]))
            _png(f"{root}/{split}/masks/{name}.png", m)
    if classes:
        with open(f"{root}/classes.txt", "w") as f:
            f.write("\n".join(classes))
    return str(root)


def _read(root, task="segment", fmt="auto", **kw):
    data, errors = read_dense(str(root), task, fmt, **kw)
    return check_data(data, errors)


def test_folders_layout_reads_index_masks_and_scores_val_as_test_without_test(tmp_path):
    m = np.array([[0, 1], [2, 255]]).repeat(4, 0).repeat(4, 1)
    d = _read(_folders(tmp_path, {"train": {"x": m, "y": m}, "val": {"z": m}}))
    assert d.format == "folders" and d.classes == ("a", "b", "c")
    assert [len(d.splits[k]) for k in ("train", "val", "test")] == [2, 1, 1] and d.notes
    np.testing.assert_array_equal(d.decode(d.splits["train"][0][1]), m)


def test_every_error_names_its_file_and_skip_bad_drops_them(tmp_path):
    m = np.zeros((8, 8))
    root = _folders(tmp_path, {"train": {"ok": m, "bad_value": np.full((8, 8), 7), "small": np.zeros((4, 4))},
                               "val": {"v": m}})
    _png(f"{root}/train/masks/small.png", np.zeros((6, 6)))  # image 4x4, mask 6x6
    _png(f"{root}/train/images/orphan.png", _img())  # no mask
    with open(f"{root}/train/images/broken.png", "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not a png")
    _png(f"{root}/train/masks/broken.png", m)
    with pytest.raises(DataError) as e:
        _read(root)
    msg = str(e.value)
    assert "4 problem(s)" in msg
    assert "orphan.png: no partner" in msg
    assert "bad_value.png: mask values [7]" in msg
    assert "small.png: sizes differ" in msg and "4x4" in msg and "6x6" in msg
    assert "broken.png: cannot read" in msg
    data, errors = read_dense(root, "segment")
    d = check_data(data, errors, skip_bad=True, warn=lambda s: None)
    assert [os.path.basename(s[0]) for s in d.splits["train"]] == ["ok.png"]


def test_folders_without_class_names_says_how_to_give_them(tmp_path):
    root = _folders(tmp_path, {"train": {"x": np.zeros((4, 4))}, "val": {"x": np.zeros((4, 4))}}, classes=None)
    with pytest.raises(DataError, match="classes.txt"):
        read_dense(root, "segment")
    d, _ = read_dense(root, "segment", classes=4)
    assert len(d.classes) == 4


def test_loveda_maps_nodata_to_ignore_and_classes_1_to_7_to_0_to_6(tmp_path):
    m = np.array([[0, 1, 2, 3], [4, 5, 6, 7]]).repeat(2, 0)
    for split in ("Train", "Val"):
        for dom in ("Urban", "Rural"):
            _png(f"{tmp_path}/{split}/{dom}/images_png/{dom}1.png", _img(4, 4))
            _png(f"{tmp_path}/{split}/{dom}/masks_png/{dom}1.png", m)
    d = _read(tmp_path)
    assert d.format == "loveda" and len(d.classes) == 7 and len(d.splits["train"]) == 2
    np.testing.assert_array_equal(d.decode(d.splits["val"][0][1])[0], [255, 0, 1, 2])
    _png(f"{tmp_path}/Train/Urban/masks_png/Urban1.png", np.full((4, 4), 9))
    with pytest.raises(DataError, match=r"Urban1.png: mask values \[9\]"):
        _read(tmp_path)


def test_potsdam_palette_round_trip_ignore_class_and_unknown_colour(tmp_path):
    idx = np.arange(6).repeat(2).reshape(3, 4)
    rgb = index_to_rgb(idx, POTSDAM_PALETTE)
    np.testing.assert_array_equal(rgb_to_index(rgb, POTSDAM_PALETTE), idx)
    _folders(tmp_path, {"train": {"t": rgb}, "val": {"t": rgb}}, classes=None)
    d = _read(tmp_path)
    assert d.format == "potsdam" and len(d.classes) == 6
    np.testing.assert_array_equal(d.decode(d.splits["train"][0][1]), idx)
    d = _read(tmp_path, ignore_classes=("clutter",))
    out = d.decode(d.splits["train"][0][1])
    assert len(d.classes) == 5 and (out[idx == 5] == 255).all() and (out[idx < 5] == idx[idx < 5]).all()
    bad = rgb.copy()
    bad[0, 0] = (12, 34, 56)
    _png(f"{tmp_path}/val/masks/t.png", bad)
    with pytest.raises(DataError, match=r"val/masks/t.png: colour \(12, 34, 56\)"):
        _read(tmp_path)


def test_levircd_labels_0_255_become_0_1_and_size_mismatch_names_files(tmp_path):
    lab = np.zeros((8, 8))
    lab[2:4, 2:6] = 255
    for split in ("train", "val", "test"):
        for sub in ("A", "B"):
            _png(f"{tmp_path}/{split}/{sub}/p.png", _img())
        _png(f"{tmp_path}/{split}/label/p.png", lab)
    d = _read(tmp_path, "change")
    assert d.format == "levircd" and d.classes == ("unchanged", "changed")
    assert d.decode(d.splits["test"][0][2]).sum() == 8
    with pytest.raises(DataError, match="not data for the segment job"):
        read_dense(str(tmp_path), "segment")
    _png(f"{tmp_path}/val/B/p.png", _img(8, 9))
    _png(f"{tmp_path}/test/label/p.png", np.full((8, 8), 128))
    with pytest.raises(DataError) as e:
        _read(tmp_path, "change")
    assert "val/label/p.png: sizes differ (A/p.png 8x8, B/p.png 9x8, label/p.png 8x8)" in str(e.value)
    assert "test/label/p.png: change labels must be 0 / 255" in str(e.value)


def test_augmentation_keeps_images_mask_and_both_dates_aligned():
    torch.manual_seed(0)
    h = w = 24
    mask = torch.randint(0, 3, (h // 6, w // 6)).repeat_interleave(6, 0).repeat_interleave(6, 1)
    img = mask[None].float().expand(3, h, w) / 4  # the mask is readable from the image
    for scale, agree in (((1.0, 1.0), 1.0), ((0.7, 1.6), 0.8)):  # rescaling blurs edges only (a misaligned mask: ~40 %)
        aug = Augment(crop=16, scale=scale, jitter=0.0)
        for _ in range(10):
            (a, b), m = aug([img.clone(), img.clone()], mask.clone())
            assert a.shape == (3, 16, 16) and m.shape == (16, 16)
            torch.testing.assert_close(a, b)  # both dates: one geometry
            valid = m != 255
            assert ((a[0] * 4).round().long()[valid] == m[valid]).float().mean() >= agree
    (a, b), _ = Augment(crop=0, jitter=0.3)([img.clone(), img.clone()], mask)
    assert not torch.equal(a, b)  # photometric jitter: each date on its own draw


def test_dataset_returns_normalised_images_and_int64_masks(tmp_path):
    m = np.array([[0, 1], [2, 255]]).repeat(4, 0).repeat(4, 1)
    d = _read(_folders(tmp_path, {"train": {"x": m}, "val": {"x": m}}))
    x, y = DenseDataset(d.splits["train"], d.decode, (0.5,) * 3, (0.25,) * 3)[0]
    assert x.dtype == torch.float32 and x.shape == (3, 8, 8) and y.dtype == torch.int64
    assert x.min() >= -2.0 and x.max() <= 2.0 and y[7, 7] == 255


def _tree_hash(root):
    h = hashlib.sha256()
    for dp, _, fs in sorted(os.walk(root)):
        for f in sorted(fs):
            with open(os.path.join(dp, f), "rb") as fh:
                h.update(f.encode() + fh.read())
    return h.hexdigest()


def test_embedded_sets_are_deterministic_and_read_by_the_users_readers(tmp_path):
    from rspeft_fast.data.dense_synth import write_change_set, write_segmentation_set

    for k in (1, 2):
        write_segmentation_set(f"{tmp_path}/s{k}", n=(3, 1, 1), size=32)
        write_change_set(f"{tmp_path}/c{k}", n=(3, 1, 1), size=32)
    assert _tree_hash(f"{tmp_path}/s1") == _tree_hash(f"{tmp_path}/s2")
    assert _tree_hash(f"{tmp_path}/c1") == _tree_hash(f"{tmp_path}/c2")
    assert _read(f"{tmp_path}/s1").format == "folders"
    assert _read(f"{tmp_path}/c1", "change").format == "levircd"


def test_potsdam_raw_tiles_are_cut_into_crops_by_mmseg_split_once(tmp_path):
    """``top_potsdam_I_J_RGB.tif`` beside ``..._label.tif`` (ISPRS's folders): cut into crop-sized PNGs (last row and
    column flush with the edge), tiles 2_13 and 2_14 in test, 2_10 in train; a second read reuses the cut; a tile without its
    label, or with a label of another size, is named."""
    lab = index_to_rgb(np.random.default_rng(0).integers(0, 6, (20, 20)), POTSDAM_PALETTE)
    for tile in ("2_10", "2_13", "2_14"):
        Image.fromarray(_img(20, 20).astype(np.uint8)).save(_mk(tmp_path / "2_Ortho_RGB" / f"top_potsdam_{tile}_RGB.tif"))
        Image.fromarray(lab).save(_mk(tmp_path / "5_Labels_all" / f"top_potsdam_{tile}_label.tif"))
    d = _read(tmp_path, crop=8)
    assert d.format == "potsdam" and len(d.classes) == 6 and "cut into 8x8" in d.notes[0]
    assert [len(d.splits[s]) for s in ("train", "val", "test")] == [9, 18, 18]  # 3 x 3 crops: starts 0, 8, 12
    assert all("2_13" in p or "2_14" in p for p, _ in d.splits["test"]) and all("2_10" in p for p, _ in d.splits["train"])
    crop = next(m for _, m in d.splits["train"] if m.endswith("_12_8.png"))
    np.testing.assert_array_equal(d.decode(crop), rgb_to_index(lab[12:20, 8:16], POTSDAM_PALETTE))
    stamp = os.path.getmtime(crop)
    _read(tmp_path, crop=8)
    assert os.path.getmtime(crop) == stamp  # not cut again
    os.remove(tmp_path / "5_Labels_all" / "top_potsdam_2_13_label.tif")
    with pytest.raises(DataError, match=r"top_potsdam_2_13_RGB.tif: no partner top_potsdam_2_13_label.tif"):
        _read(tmp_path, crop=8)
    Image.fromarray(lab[:16]).save(tmp_path / "5_Labels_all" / "top_potsdam_2_13_label.tif")
    with pytest.raises(DataError, match=r"top_potsdam_2_13_label.tif: label size 20x16 differs"):
        _read(tmp_path, crop=8)


def _mk(path):
    os.makedirs(path.parent, exist_ok=True)
    return path
