"""The fine-tuning CLI end to end on the embedded data and on an image folder (a few steps, tiny sizes)."""
import json
import os

import pytest
import torch

timm = pytest.importorskip("timm")

import rspeft_fast as rf  # noqa: E402
from rspeft_fast.__main__ import main as dispatch  # noqa: E402
from rspeft_fast.data import CLASSES, make_textures, write_image_folder  # noqa: E402
from rspeft_fast.integration.train import main as train_main  # noqa: E402

# 4 tokens per image, 2 blocks: each step is cheap on a CPU
SMALL = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--no-progress", "--device", "cpu",
         "--model-arg", "depth=2"]


def _metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


def test_embedded_data_is_deterministic_and_balanced():
    a, la, names = make_textures(per_class=3, size=32, seed=5)
    b, lb, _ = make_textures(per_class=3, size=32, seed=5)
    assert a.shape == (3 * len(CLASSES), 3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert torch.bincount(la).tolist() == [3] * len(CLASSES) and names == CLASSES
    assert a.float().std() > 20  # not blank


def test_train_embedded_loss_falls_and_adapters_saved(tmp_path, capsys):
    out = str(tmp_path / "run")
    rc = train_main(SMALL + ["--method", "mufa", "--epochs", "4", "--embedded-per-class", "8", "--batch-size", "16",
                             "--lr", "3e-3", "--out", out, "--global-pool", "avg"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "epoch 4/4" in text and "val_acc" in text and "img/s" in text and "peak mem" in text
    m = _metrics(out)
    hist = m["state"]["history"]
    assert len(hist) == 4 and m["state"]["step"] == 4 * 4
    assert hist[-1]["train_loss"] < hist[0]["first_loss"], [h["train_loss"] for h in hist]
    assert all(0.0 <= h["val_acc"] <= 100.0 for h in hist)
    # the saved file re-creates the trained model on a fresh timm model
    path = os.path.join(out, "adapters.safetensors")
    cfg = rf.integration.read_adapter_config(path)
    assert cfg.method == "mufa" and cfg.num_classes == len(CLASSES)
    fresh = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, global_pool="avg")
    rf.load_adapters(fresh, path)
    assert fresh.num_classes == len(CLASSES)


def test_train_image_folder_and_checkpoint_via_dispatcher(tmp_path, capsys):
    data = write_image_folder(str(tmp_path / "ucm_like"), per_class=3, size=40, seed=1)
    ckpt = str(tmp_path / "backbone.safetensors")
    from safetensors.torch import save_file

    save_file(timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict(), ckpt)
    out = str(tmp_path / "run")
    rc = dispatch(["train"] + SMALL + ["--method", "lora", "--data", data, "--epochs", "1", "--batch-size", "8",
                                       "--checkpoint", ckpt, "--out", out, "--val-fraction", "0.34"])
    assert rc == 0
    m = _metrics(out)
    assert m["classes"] == sorted(CLASSES)
    assert os.path.isfile(os.path.join(out, "adapters.safetensors"))
    assert "16 train / 8 val" in capsys.readouterr().out  # split per class: 2 train + 1 val
    assert m["state"]["epoch"] == 1


def test_cli_errors_are_clear(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_main(SMALL + ["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert "not a directory" in str(e.value)
    with pytest.raises(SystemExit) as e:
        train_main(SMALL + ["--checkpoint", str(tmp_path / "nope.pth"), "--out", str(tmp_path / "o")])
    assert "no such file" in str(e.value)
    with pytest.raises(SystemExit) as e:
        train_main(["--model", "convnext_atto", "--method", "mufa", "--no-progress", "--epochs", "1", "--out", str(tmp_path / "o")])
    assert "not supported on timm ConvNeXt" in str(e.value)
    with pytest.raises(SystemExit) as e:
        train_main(["--help"])
    assert e.value.code == 0
    assert "--method" in capsys.readouterr().out
