"""The dense jobs under ``torchrun`` (2 gloo processes on CPU; DDP and ``--fsdp``) train as one process on the same
global batch: each rank reads its slice of every global batch, the decoder's BatchNorm uses the global batch's
statistics (:class:`~rspeft_fast.dense.model.DistBatchNorm2d` on CPU) and the cross-entropy's denominator is
all-reduced, so the first step's loss, the per-epoch loss, the saved adapters and decoder (running variances
included) and the test scores are one process's."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("timm")
pytest.importorskip("segmentation_models_pytorch")
from safetensors.torch import load_file  # noqa: E402

import _helpers as H  # noqa: E402  (tests/: free_port)
from rspeft_fast.dense.job import main_segment  # noqa: E402

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo")

TINY = ["--model", "convnext_atto", "--model-arg", "dims=16,32,64,128", "--model-arg", "depths=1,1,1,1",
        "--decoder-channels", "16", "--crop", "32", "--stride", "32", "--embedded-tile", "48", "--no-progress",
        "--device", "cpu", "--impl", "reference", "--lr", "1e-2", "--epochs", "1", "--max-steps", "2",
        "--embedded-size", "8", "4", "4", "--scale", "0.5", "1.5"]  # scales < 1 pad crops with ignored pixels


def test_torchrun_ddp_and_fsdp_segment_match_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    env.pop("TRITON_INTERPRET", None)
    tr = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(H.free_port()),
          "-m", "rspeft_fast"]
    for name, extra in (("ddp", []), ("fsdp", ["--fsdp"])):
        p = subprocess.run([*tr, "segment", *TINY, "--batch-size", "2", *extra, "--out", str(tmp_path / name)], env=env,
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, (name, p.stdout[-3000:], p.stderr[-3000:])
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # one process, in this one
        assert main_segment(TINY + ["--batch-size", "4", "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(n)
    runs = ("one", "ddp", "fsdp")
    m = {k: json.load(open(tmp_path / k / "metrics.json")) for k in runs}
    for run in ("ddp", "fsdp"):
        _assert_trains_as_one_process(tmp_path / run, tmp_path / "one", m[run], m["one"], run)


def _assert_trains_as_one_process(out, ref, m, mref, run):
    h1, h2 = mref["history"][0], m["history"][0]
    assert h1["steps"] == h2["steps"] == 2
    for key in ("first_loss", "train_loss"):
        torch.testing.assert_close(torch.tensor(h2[key]), torch.tensor(h1[key]), atol=1e-5, rtol=1e-5,
                                   msg=lambda s: f"{run} {key}: {s}")
    for f in ("adapters.safetensors", "decoder.safetensors"):
        a, b = load_file(out / f), load_file(ref / f)
        assert a.keys() == b.keys() and a
        for k in a:
            if ("feature_norms" in k and k.endswith(".bias")) or k.endswith("running_mean"):
                # the per-level LayerNorm's shift is removed by the next conv + BatchNorm: its gradient is 0 up to
                # rounding (~1e-9), which AdamW's normalisation turns into lr-sized steps of either sign, and the
                # BatchNorm running means absorb that shift; the model's function is compared below instead
                continue
            torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-3, msg=lambda s: f"{run} {f} {k}: {s}")
    assert any("running_var" in k for k in load_file(ref / "decoder.safetensors"))
    for key in ("miou", "oa"):  # the saved model scores the test split as one process's
        assert abs(m["test"][key] - mref["test"][key]) < 0.05, (run, m["test"], mref["test"])
    assert m["untrained"] == mref["untrained"]
    assert os.path.exists(out / "predictions.png")
