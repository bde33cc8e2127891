"""The fine-tuning CLI end to end on the embedded data and on an image folder (a few steps, tiny sizes)."""
import json
import os

import pytest
import torch

timm = pytest.importorskip("timm")

import rspeft_fast as rf  # noqa: E402
from rspeft_fast.__main__ import main as dispatch  # noqa: E402
from rspeft_fast.data import CLASSES, make_textures, write_image_folder  # noqa: E402
from rspeft_fast.train import main as train_main  # noqa: E402

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
    rf.load_adapters(fresh, path, replace_head=True)  # a fresh 1000-class model: the file's head replaces it
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
    with pytest.raises(SystemExit) as e:  # an open_clip name: the error points at the retrieval job
        train_main(["--model", "ViT-B-32", "--method", "mga", "--no-progress", "--epochs", "1", "--out", str(tmp_path / "o")])
    assert "Unknown model" in str(e.value) and "python -m rspeft_fast retrieval --model ViT-B-32" in str(e.value)
    with pytest.raises(SystemExit) as e:
        train_main(["--help"])
    assert e.value.code == 0
    assert "--method" in capsys.readouterr().out


def _twelve_images(root, corrupt: int | None = None):
    """2 classes x 6 PNGs (random pixels); ``corrupt``: index of one file truncated to half its bytes."""
    from PIL import Image

    g = torch.Generator().manual_seed(3)
    paths = []
    for k, cls in enumerate(("forest", "river")):
        os.makedirs(os.path.join(root, cls), exist_ok=True)
        for i in range(6):
            px = torch.randint(0, 256, (24, 24, 3), generator=g, dtype=torch.uint8).numpy()
            p = os.path.join(root, cls, f"{i}.png")
            Image.fromarray(px).save(p)
            paths.append(p)
    if corrupt is not None:
        data = open(paths[corrupt], "rb").read()
        with open(paths[corrupt], "wb") as f:
            f.write(data[: len(data) // 2])
    return paths


def test_bad_image_stops_before_training_or_is_skipped(tmp_path, capsys):
    """One truncated PNG among 12: the job stops before the first step with one error naming the file;
    --skip-bad-images drops it with a warning and a count and trains on the other 11."""
    root = str(tmp_path / "data")
    paths = _twelve_images(root, corrupt=7)
    args = SMALL + ["--method", "bitfit", "--data", root, "--epochs", "1", "--batch-size", "4", "--val-fraction", "0.34",
                    "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as e:
        train_main(args)
    msg = str(e.value)
    assert "1 of 12" in msg and paths[7] in msg and "--skip-bad-images" in msg
    assert "epoch 1/1" not in capsys.readouterr().out  # stopped before training
    with pytest.warns(UserWarning, match=r"dropped 1 unreadable file\(s\) of 12"):
        rc = train_main(args + ["--skip-bad-images"])
    assert rc == 0
    out = capsys.readouterr().out
    n_train, n_val = [int(t) for t in out.split("data ")[1].split(":")[1].split("val")[0].replace("train /", "").split()]
    assert n_train + n_val == 11


def test_timm_transforms_follow_the_model_config(tmp_path):
    """Eval transform: the model's mean/std and crop (timm resolve_data_config); train: random crops/flips."""
    import argparse

    from rspeft_fast.train.data import timm_transforms

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
    ns = argparse.Namespace(aa="rand-m9-mstd0.5", scale=(0.5, 1.0), hflip=0.5, vflip=0.5, color_jitter=0.4, reprob=0.0)
    t_train, t_eval, cfg = timm_transforms(model, ns, 32)
    assert cfg["input_size"] == (3, 32, 32) and tuple(cfg["mean"]) == tuple(model.pretrained_cfg["mean"])
    assert "RandAugment" in repr(t_train) and "CenterCrop" in repr(t_eval)
    from PIL import Image

    im = Image.fromarray(torch.randint(0, 256, (40, 50, 3), dtype=torch.uint8).numpy())
    assert t_eval(im).shape == (3, 32, 32) and t_train(im).shape == (3, 32, 32)


def test_sampler_ranks_partition_the_global_batches():
    """W ranks with batch B read exactly the samples of one process with batch B*W, step by step."""
    from rspeft_fast.train.data import ResumableSampler

    one = ResumableSampler(23, seed=4, batch_size=6)
    one.begin_epoch(0)
    full = [i for _, i in one][: (23 // 6) * 6]
    ranks = []
    for r in range(2):
        s = ResumableSampler(23, seed=4, batch_size=3, rank=r, world=2)
        s.begin_epoch(0)
        ranks.append([i for _, i in s])
        assert len(ranks[-1]) == len(s) == 9
    merged = [i for g in range(3) for r in range(2) for i in ranks[r][g * 3:(g + 1) * 3]]
    assert merged == full[:18]
    s = ResumableSampler(23, seed=4, batch_size=3, rank=1, world=2)
    s.begin_epoch(0, start_step=2)
    assert [i for _, i in s] == ranks[1][6:]


def test_seeded_samples_make_augmentation_a_function_of_the_sample():
    """timm's RandAugment draws from python's random, RandomResizedCrop from torch: SeededSamples seeds both per
    (epoch, index), so a sample's augmentation does not depend on what ran before it (workers, resume point)."""
    import argparse
    import random

    from rspeft_fast.train.data import EmbeddedTextures, SeededSamples, timm_transforms

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
    ns = argparse.Namespace(aa="rand-m9-mstd0.5-inc1", scale=(0.08, 1.0), hflip=0.5, vflip=0.5, color_jitter=0.4, reprob=0.25)
    t_train, _, _ = timm_transforms(model, ns, 32)
    ds = SeededSamples(EmbeddedTextures("train", 2, 32, 0, t_train), seed=3)
    a = ds[(1, 5)][0]
    torch.manual_seed(123)
    random.seed(456)
    state = (torch.get_rng_state(), random.getstate())
    b = ds[(1, 5)][0]
    assert torch.equal(a, b)
    assert torch.equal(state[0], torch.get_rng_state()) and state[1] == random.getstate()  # global RNGs untouched
    assert not torch.equal(a, ds[(2, 5)][0])  # another epoch, another augmentation


def test_train_hf_model_with_grad_checkpointing(tmp_path, monkeypatch):
    """`--model hf:<model_type>` (built from a config, no download) + `--grad-checkpointing` switches the HF
    family's own checkpointing on (activation/gradient_checkpointing_enable, not timm's set_grad_checkpointing)."""
    pytest.importorskip("transformers")
    from rspeft_fast.train import cli

    seen = {}
    real = cli.build_model

    def spy(*a, **k):
        m = real(*a, **k)
        seen["ckpt"] = any(getattr(mod, "gradient_checkpointing", False) is True for mod in m.modules())
        return m

    monkeypatch.setattr(cli, "build_model", spy)
    out = str(tmp_path / "hf")
    args = ["--model", "hf:vit", "--img-size", "32", "--no-progress", "--device", "cpu", "--method", "mufa",
            "--model-arg", "hidden_size=32", "--model-arg", "num_hidden_layers=2", "--model-arg", "num_attention_heads=2",
            "--model-arg", "intermediate_size=64", "--model-arg", "patch_size=16",
            "--epochs", "1", "--embedded-per-class", "2", "--batch-size", "8", "--grad-checkpointing", "--out", out]
    assert train_main(args) == 0
    assert seen["ckpt"], "HF gradient checkpointing was not switched on"
    assert os.path.exists(os.path.join(out, "adapters.safetensors"))
    assert _metrics(out)["state"]["step"] >= 1


def test_fsdp_without_torchrun_says_what_happens(tmp_path, capsys):
    """--fsdp in one process runs FSDP2 over a one-rank group, and says so (it used to be silent); the group is
    torn down after the run."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("needs torch.distributed with gloo")
    out = str(tmp_path / "fsdp")
    assert train_main(SMALL + ["--model-arg", "depth=1", "--method", "mufa", "--impl", "reference", "--epochs", "1",
                               "--embedded-per-class", "2", "--batch-size", "8", "--max-steps", "1", "--fsdp", "--out", out]) == 0
    text = capsys.readouterr().out
    assert "--fsdp in a single process" in text and "torchrun --nproc_per_node" in text
    assert not dist.is_initialized()
    assert os.path.exists(os.path.join(out, "adapters.safetensors"))
