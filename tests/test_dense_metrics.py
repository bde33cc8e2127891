"""Dense metrics (SPEC §6) against a direct numpy computation: confusion matrix, IoU / F1 with mmseg's NaN rule,
change scores of class 1."""
import math

import numpy as np
import pytest
import torch

from rspeft_fast.dense import change_scores, confusion_matrix, segmentation_scores


def _np_cm(pred, target, c, ignore=255):
    cm = np.zeros((c, c), np.int64)
    for t, p in zip(target.ravel(), pred.ravel()):
        if t != ignore:
            cm[t, p] += 1
    return cm


def _np_scores(cm):
    iou, f1 = [], []
    for k in range(cm.shape[0]):
        tp, fp, fn = cm[k, k], cm[:, k].sum() - cm[k, k], cm[k, :].sum() - cm[k, k]
        iou.append(100 * tp / (tp + fp + fn) if tp + fp + fn else math.nan)
        f1.append(100 * 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan)
    return iou, f1


@pytest.mark.parametrize("c", [2, 5, 7])
def test_confusion_matrix_and_scores_match_numpy_on_random_maps(c):
    rng = np.random.default_rng(c)
    target = rng.integers(0, c, (3, 13, 17))
    target[rng.uniform(size=target.shape) < 0.2] = 255
    pred = rng.integers(0, c, target.shape)
    if c > 2:  # one class absent from target and prediction: NaN, left out of the means
        target[target == c - 1] = 255
        pred[pred == c - 1] = 0
    cm = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), c)
    ref = _np_cm(pred, target, c)
    assert cm.dtype == torch.int64 and cm.shape == (c, c)
    np.testing.assert_array_equal(cm.numpy(), ref)
    s = segmentation_scores(cm)
    iou, f1 = _np_scores(ref)
    np.testing.assert_allclose(s["iou"], iou, equal_nan=True)
    np.testing.assert_allclose(s["f1"], f1, equal_nan=True)
    assert math.isclose(s["miou"], np.nanmean(iou)) and math.isclose(s["mf1"], np.nanmean(f1))
    assert math.isclose(s["oa"], 100 * np.trace(ref) / ref.sum())
    if c > 2:
        assert math.isnan(s["iou"][c - 1])
    if c == 2:
        ch = change_scores(cm)
        tp, fp, fn = ref[1, 1], ref[0, 1], ref[1, 0]
        assert math.isclose(ch["precision"], 100 * tp / (tp + fp)) and math.isclose(ch["recall"], 100 * tp / (tp + fn))
        assert math.isclose(ch["f1"], 100 * 2 * tp / (2 * tp + fp + fn)) and math.isclose(ch["iou"], 100 * tp / (tp + fp + fn))


def test_class_predicted_but_absent_from_target_counts_as_zero_not_nan():
    cm = confusion_matrix(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1]), 3)
    s = segmentation_scores(cm)
    assert s["iou"][2] == 0.0 and s["iou"][0] == 100.0 and math.isclose(s["miou"], 50.0)


def test_all_ignored_gives_an_empty_matrix_and_nan_scores():
    t = torch.full((4, 4), 255)
    cm = confusion_matrix(torch.zeros(4, 4, dtype=torch.long), t, 3)
    assert cm.sum() == 0
    s = segmentation_scores(cm)
    assert all(math.isnan(s[k]) for k in ("miou", "mf1", "oa"))
    ch = change_scores(confusion_matrix(torch.zeros(4, 4, dtype=torch.long), t, 2))
    assert all(math.isnan(v) for v in ch.values())


def test_no_predicted_change_gives_nan_precision_and_zero_f1():
    ch = change_scores(confusion_matrix(torch.zeros(6, dtype=torch.long), torch.tensor([0, 0, 0, 1, 1, 0]), 2))
    assert math.isnan(ch["precision"]) and ch["recall"] == 0.0 and ch["f1"] == 0.0


def test_confusion_matrix_rejects_labels_outside_the_class_set():
    with pytest.raises(ValueError, match="target has label 3"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 3]), 3)
    with pytest.raises(TypeError, match="argmax"):
        confusion_matrix(torch.rand(2), torch.tensor([0, 1]), 3)
