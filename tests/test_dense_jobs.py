"""The dense jobs end to end at a CI size (embedded sets, a 4-block ConvNeXt, 32-pixel tiles): they learn (test score
above the untrained model's), write adapter + decoder files, metrics.json and predictions.png (validation tiles as pictures) only, and a run stopped by SIGTERM
(raised by a phase hook, as in test_resume) and resumed ends bit-for-bit where an uninterrupted one does, BatchNorm
statistics of the decoder included."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("segmentation_models_pytorch")
from safetensors.torch import load_file  # noqa: E402

from _helpers import signal_at  # noqa: E402
from rspeft_fast.dense import job  # noqa: E402

TINY = ["--model", "convnext_atto", "--model-arg", "dims=16,32,64,128", "--model-arg", "depths=1,1,1,1",
        "--decoder-channels", "16", "--crop", "32", "--stride", "32", "--embedded-tile", "32", "--no-progress",
        "--device", "cpu", "--impl", "reference", "--batch-size", "4", "--lr", "1e-2"]


pytestmark = pytest.mark.usefixtures("one_thread")




def _main(task, args, hooks=()):
    return (job.main_segment if task == "segment" else job.main_change)(TINY + list(args), hooks=hooks)


def _metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


def _files(out):
    return {n: load_file(os.path.join(out, n)) for n in ("adapters.safetensors", "decoder.safetensors")}


@pytest.mark.parametrize("task,key,size", [("segment", "miou", "12 4 4"), ("change", "f1", "16 4 4")])
def test_job_learns_and_writes_adapter_and_decoder_files_only(tmp_path, task, key, size):
    out = tmp_path / task
    assert _main(task, ["--epochs", "3", "--embedded-size", *size.split(), "--out", str(out)]) == 0
    assert sorted(f for f in os.listdir(out) if not f.startswith(".")) == ["adapters.safetensors", "decoder.safetensors",
                                                                            "metrics.json", "predictions.png"]
    m = _metrics(out)
    pic, cols = m["predictions"], 4 if task == "change" else 3  # A | B | label | prediction; image | truth | prediction
    assert pic["file"] == "predictions.png" and pic["tiles"] == 4 and pic["panels"] == 4 * cols == 4 * len(pic["columns"])
    assert pic["legend"] == m["classes"] + ["ignored"]
    from PIL import Image

    with Image.open(out / "predictions.png") as im:
        assert list(im.size) == pic["size_px"] and im.size[0] > 100 * cols
    assert m["model"] == "convnext_atto" and m["method"] == "eqam+capm" and 1 <= m["selected_epoch"] <= 3
    assert set(m["params"]) >= {"adapters", "adapters_pct_of_backbone", "decoder"} and m["params"]["decoder"] > 0
    assert m["test"][key] > (m["untrained"][key] or 0.0) + 5, (m["untrained"], m["test"])
    files = _files(out)
    assert any("capm" in k for k in files["adapters.safetensors"]) and any("decode_head" in k for k in files["decoder.safetensors"])
    assert not any(k.startswith("encoder.backbone.") for k in files["decoder.safetensors"])
    if task == "segment":
        assert len(m["test"]["iou"]) == 5 and m["classes"][1] == "building"


def test_sigterm_then_resume_is_bit_exact(tmp_path):
    """3 steps per epoch, 2 epochs: stopped at step 2 and during the first end-of-epoch evaluation, resumed to
    the end: adapters, decoder (BatchNorm statistics included), scores and losses as an uninterrupted run's."""
    args = ["--epochs", "2", "--embedded-size", "12", "4", "4", "--ckpt-every", "2"]
    ref = tmp_path / "ref"
    assert _main("segment", args + ["--out", str(ref)]) == 0
    out = tmp_path / "run"
    for i, hook in enumerate((signal_at("step", 2), signal_at("eval", 1))):
        rc = _main("segment", args + ["--out", str(out)] + (["--resume"] if i else []), hooks=(hook,))
        assert rc == 128 + signal.SIGTERM
        assert torch.load(out / "checkpoint.pt", weights_only=True)["state"]["step"] == (2, 3)[i]
    assert _main("segment", args + ["--out", str(out), "--resume"]) == 0
    a, b = _files(ref), _files(out)
    for name in a:
        assert a[name].keys() == b[name].keys()
        diff = [k for k in a[name] if not torch.equal(a[name][k], b[name][k])]
        assert not diff, (name, diff[:5])
    assert any("running_mean" in k for k in a["decoder.safetensors"])
    ma, mb = _metrics(ref), _metrics(out)
    assert ma["test"] == mb["test"] and ma["untrained"] == mb["untrained"] and ma["selected_epoch"] == mb["selected_epoch"]
    assert [h["train_loss"] for h in ma["history"]] == [h["train_loss"] for h in mb["history"]]
    with pytest.raises(SystemExit, match="other settings"):
        _main("segment", args[:-2] + ["--ckpt-every", "2", "--lr", "0.5", "--out", str(out), "--resume"])


def test_bad_data_stops_before_training_naming_the_file(tmp_path):
    os.makedirs(tmp_path / "d" / "train" / "A")
    os.makedirs(tmp_path / "d" / "train" / "B")
    with pytest.raises(SystemExit, match="expected A/, B/ and label/"):
        _main("change", ["--data", str(tmp_path / "d"), "--out", str(tmp_path / "o")])
