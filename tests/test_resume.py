"""Nothing lost on interruption: the training CLI's atomic checkpoints, SIGINT/SIGTERM handling and --resume.

A run killed mid-epoch (SIGTERM from a hidden test hook, or from outside) and resumed ends with bit-for-bit
the adapter weights of an uninterrupted run (CPU). Every run is a subprocess with the same environment
(one thread), so the float operations are identical.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("timm")
from safetensors.torch import load_file  # noqa: E402

from rspeft_fast.train import atomic_torch_save  # noqa: E402

# 8 classes x 6 images = 48 train images, batch 8: 6 steps per epoch, 2 epochs = 12 steps.
# drop_path makes the run consume the global torch RNG (train mode), so RNG restoration is exercised.
BASE = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--no-progress", "--device", "cpu",
        "--model-arg", "depth=2", "--model-arg", "drop_path_rate=0.2", "--method", "mufa", "--option", "rates=16,32",
        "--epochs", "2", "--embedded-per-class", "6", "--batch-size", "8", "--lr", "3e-3", "--impl", "reference"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
ENV.pop("TRITON_INTERPRET", None)


def _run(args, out, check=True, **kw):
    p = subprocess.run([sys.executable, "-m", "rspeft_fast", "train", *BASE, "--out", str(out), *args], env=ENV,
                       capture_output=True, text=True, timeout=300, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"rc={p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def _weights(out):
    return load_file(os.path.join(out, "adapters.safetensors"))


def _assert_bit_equal(a, b):
    assert a.keys() == b.keys()
    diff = {k: (a[k] - b[k]).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
    assert not diff, f"resumed weights differ from the uninterrupted run's: {diff}"


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    _run([], out)
    import json

    with open(os.path.join(out, "metrics.json")) as f:
        return _weights(out), json.load(f)


def _metrics(out):
    import json

    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


def test_sigterm_then_resume_is_bit_exact(tmp_path, reference_run):
    """Three interruptions in one run: mid-epoch 1 (checkpoint written on the signal only), at the last step
    of epoch 1 (before its evaluation; periodic checkpoints too) and mid-epoch 2; then resumed to the end."""
    ref_w, ref_m = reference_run
    out = tmp_path / "run"
    for i, (stop_at, extra) in enumerate([(4, []), (6, ["--ckpt-every", "2"]), (9, ["--ckpt-every", "2"])]):
        p = _run((["--resume"] if i else []) + ["--stop-after-steps", str(stop_at), *extra], out, check=False)
        assert p.returncode == 128 + signal.SIGTERM, (p.returncode, p.stdout, p.stderr)
        assert "SIGTERM" in p.stdout + p.stderr and "--resume" in p.stdout
        assert ("resumed from" in p.stdout) == bool(i)
        assert os.path.isfile(out / "checkpoint.pt") and not os.path.exists(out / "adapters.safetensors")
        assert not [f for f in os.listdir(out) if f.endswith(".tmp")]  # no temporary file left behind
        ck = torch.load(out / "checkpoint.pt", weights_only=True)
        assert ck["state"]["step"] == stop_at and ck["state"]["epoch"] == (stop_at - 1) // 6

    _run(["--resume", "--ckpt-every", "2"], out)
    _assert_bit_equal(_weights(out), ref_w)
    m = _metrics(out)
    assert m["state"]["step"] == ref_m["state"]["step"] == 12
    # the per-epoch metrics (accumulated across the interruptions) match too
    assert [h["train_loss"] for h in m["state"]["history"]] == [h["train_loss"] for h in ref_m["state"]["history"]]
    assert [h["val_acc"] for h in m["state"]["history"]] == [h["val_acc"] for h in ref_m["state"]["history"]]


def test_external_sigint_then_resume(tmp_path, reference_run):
    """SIGINT (Ctrl-C) from outside at an arbitrary moment: the step in flight finishes, a checkpoint is
    written, the exit code is 130; resuming still ends bit-for-bit equal."""
    ref_w, _ = reference_run
    out = tmp_path / "run"
    ck = out / "checkpoint.pt"
    proc = subprocess.Popen([sys.executable, "-m", "rspeft_fast", "train", *BASE, "--out", str(out), "--ckpt-every", "1"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while time.time() - t0 < 120 and not ck.exists() and proc.poll() is None:  # training is under way
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    if proc.returncode == 0:  # pragma: no cover - the run finished before the signal landed
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 130, (proc.returncode, stdout, stderr)
    assert "SIGINT" in stdout + stderr
    _run(["--resume", "--ckpt-every", "1"], out)
    _assert_bit_equal(_weights(out), ref_w)


def test_resume_refuses_other_settings_and_bad_files(tmp_path):
    from rspeft_fast.train import main as train_main

    out = tmp_path / "run"
    p = _run(["--stop-after-steps", "2"], out, check=False)
    assert p.returncode == 143
    args = BASE + ["--out", str(out)]
    with pytest.raises(SystemExit, match="other settings.*lr"):
        train_main(args + ["--resume", "--lr", "1e-3"])
    with pytest.raises(SystemExit, match="no such file"):
        train_main(args + ["--resume", str(tmp_path / "missing.pt")])
    bad = tmp_path / "bad.pt"
    bad.write_bytes((out / "checkpoint.pt").read_bytes()[:1000])
    with pytest.raises(SystemExit, match="cannot read the checkpoint"):
        train_main(args + ["--resume", str(bad)])
    with pytest.raises(SystemExit, match="positive"):
        train_main(args + ["--ckpt-every", "0"])


def test_atomic_save_keeps_previous_file_when_the_write_fails(tmp_path):
    path = tmp_path / "ck.pt"
    atomic_torch_save({"a": torch.ones(3)}, str(path))

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full (simulated)")

    with pytest.raises(RuntimeError, match="simulated"):
        atomic_torch_save({"a": torch.zeros(3), "b": Boom()}, str(path))
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(3))
    assert os.listdir(tmp_path) == ["ck.pt"]  # the temporary file was removed


def test_resume_may_extend_epochs_but_not_shorten_them(tmp_path):
    """--epochs may grow on --resume (the cosine schedule is re-targeted to the new end); fewer is refused."""
    from rspeft_fast.train import main as train_main

    out = tmp_path / "run"
    p = _run(["--stop-after-steps", "3"], out, check=False)
    assert p.returncode == 143
    args = list(BASE)
    i = args.index("--epochs")
    with pytest.raises(SystemExit, match="fewer than the checkpointed run's 2"):
        train_main(args[:i] + ["--epochs", "1"] + args[i + 2:] + ["--out", str(out), "--resume"])
    p = _run(["--resume", "--epochs", "3"], out, check=False)
    assert p.returncode == 0, (p.stdout, p.stderr)
    m = _metrics(out)
    assert m["state"]["epoch"] == 3 and m["state"]["step"] == 18 and "resumed from" in p.stdout


# --------------------------------------------------------------------------------------------------
# the retrieval job on the same engine

RET = ["--no-progress", "--device", "cpu", "--embedded-scale", "0.2", "--epochs", "2", "--batch-size", "16", "--lr", "3e-3",
       "--impl", "reference"]


def _run_retrieval(args, out, check=True):
    p = subprocess.run([sys.executable, "-m", "rspeft_fast", "retrieval", *RET, "--out", str(out), *args], env=ENV,
                       capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"rc={p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def test_retrieval_sigterm_then_resume_is_bit_exact(tmp_path):
    """48 images x 5 captions, batch 16: 15 steps per epoch; interrupted mid-epoch 2 (step 20), resumed: the selected
    adapters, the per-epoch losses and every reported metric equal the uninterrupted run's."""
    ref = tmp_path / "uninterrupted"
    _run_retrieval([], ref)
    out = tmp_path / "run"
    p = _run_retrieval(["--stop-after-steps", "20", "--ckpt-every", "7"], out, check=False)
    assert p.returncode == 143, (p.stdout, p.stderr)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["state"]["step"] == 20
    p = _run_retrieval(["--resume", "--ckpt-every", "7"], out)
    assert "resumed from" in p.stdout and "zero-shot test:" not in p.stdout  # the zero-shot result comes from the checkpoint
    _assert_bit_equal(_weights(out), _weights(ref))
    a, b = _metrics(out), _metrics(ref)
    for k in ("zero_shot", "val", "test", "selected_epoch", "model"):
        assert a[k] == b[k], k
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    with pytest.raises(SystemExit, match="other settings.*triplet_weight"):
        from rspeft_fast.retrieval.job import main as retrieval_main

        retrieval_main(RET + ["--out", str(out), "--resume", "--triplet-weight", "0.5"])
