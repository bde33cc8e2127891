"""The engine's model selection and divergence handling, on a minimal job described in a few lines (the shape every
job takes: :mod:`rspeft_fast.train.engine`)."""
import argparse
import json
import math

import pytest
import torch
from torch import nn

from rspeft_fast.train.engine import Job, Settings, add_engine_args, run


class Tiny(Job):
    """A one-block ViT + MuFA on random data; ``scores`` is the validation score of each epoch (NaN: a diverged model)."""

    name = "tiny"
    selects = True

    def __init__(self, args, scores=(), nan_loss_at=None):
        super().__init__(args)
        self.scores, self.nan_loss_at, self.epoch = list(scores), nan_loss_at, 0

    def model(self, ctx):
        import timm

        import rspeft_fast as rf

        torch.manual_seed(0)
        m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, depth=1, num_classes=2)
        rf.inject(m, "mufa", impl="reference")
        return m

    def data(self, ctx, model):
        g = torch.Generator().manual_seed(1)
        return ctx.train_loader(torch.utils.data.TensorDataset(torch.randn(16, 3, 16, 16, generator=g),
                                                               torch.randint(0, 2, (16,), generator=g)))

    def objective(self, ctx, net):
        calls = {"n": 0}

        def loss_fn(batch):
            x, y = batch
            calls["n"] += 1
            loss = nn.functional.cross_entropy(net(x), y)
            if self.nan_loss_at is not None and calls["n"] >= self.nan_loss_at:
                loss = loss * float("nan")
            return loss, x.shape[0]

        return loss_fn

    def evaluate(self, ctx, net):
        self.epoch += 1
        return {"val": self.scores[self.epoch - 1]}

    def score(self, m):
        return m["val"]

    def report(self, ctx, net, state):
        return {"selected_epoch": state.extra["selected_epoch"], "history": [h["val"] for h in state.history]}


def _args(argv=()):
    p = argparse.ArgumentParser()
    add_engine_args(p, epochs=3, batch_size=8, lr=1e-2, weight_decay=0.0)
    return p.parse_args(["--no-progress", "--device", "cpu", *argv])


def _run(tmp_path, **kw):
    args = _args(["--epochs", str(len(kw.get("scores", (0, 0, 0))))])
    return run(Tiny(args, **kw), Settings.from_args(args, out=str(tmp_path)))


def test_an_epoch_with_a_nan_score_is_never_selected(tmp_path, capsys):
    assert _run(tmp_path, scores=(float("nan"), 1.0, float("nan"))) == 0
    m = json.load(open(tmp_path / "metrics.json"))
    assert m["selected_epoch"] == 2, m  # before: epoch 1 (NaN) was selected, as nothing compares above NaN
    assert "not finite" in capsys.readouterr().out


def test_no_finite_epoch_saves_nothing_and_says_so(tmp_path):
    with pytest.raises(SystemExit, match="no epoch of 2 had a finite selection score"):
        _run(tmp_path, scores=(float("nan"), float("nan")))
    assert not (tmp_path / "adapters.safetensors").exists() and not (tmp_path / "metrics.json").exists()


def test_a_diverged_run_stops_with_one_line_and_keeps_the_earlier_adapters(tmp_path):
    with pytest.raises(SystemExit) as e:
        _run(tmp_path, scores=(1.0, 2.0, 3.0), nan_loss_at=3)  # 2 steps per epoch: the first epoch completes
    msg = str(e.value)
    assert "the run diverged: non-finite loss" in msg and "adapters.safetensors" in msg, msg
    from safetensors.torch import load_file

    assert all(math.isfinite(float(t.abs().sum())) for t in load_file(tmp_path / "adapters.safetensors").values())
