"""Nothing lost on interruption, for both jobs: a SIGTERM / SIGINT at any phase of a run (a step, a checkpoint
write, the end-of-epoch evaluation, the final save), then ``--resume``, ends with bit-for-bit the adapter weights
and the per-epoch metrics of an uninterrupted run (CPU, one thread).

The signal is raised by a phase hook (``Settings.hooks``, passed through ``main(argv, hooks=...)``) at a named
phase, so every run is interrupted exactly there: no test depends on timing. The jobs run in this process
(``torch.set_num_threads(1)``); one test runs the command line in a subprocess and signals it from outside.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import timm  # noqa: F401,E402  (pinned: a missing one fails)
import open_clip  # noqa: F401,E402  (pinned: a missing one fails)
from safetensors.torch import load_file  # noqa: E402

from _helpers import signal_at  # noqa: E402
from rspeft_fast.retrieval.job import main as retrieval_main  # noqa: E402
from rspeft_fast.train import main as train_main  # noqa: E402

# classification: 8 classes x 6 images = 48 train images, batch 8: 6 steps per epoch, 2 epochs = 12 steps.
# drop_path makes the run consume the global torch RNG (train mode), so RNG restoration is exercised.
TRAIN = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--no-progress", "--device", "cpu",
         "--model-arg", "depth=2", "--model-arg", "drop_path_rate=0.2", "--method", "mufa", "--option", "rates=16,32",
         "--epochs", "2", "--embedded-per-class", "6", "--batch-size", "8", "--lr", "3e-3", "--impl", "reference"]
# retrieval: 48 images x 5 captions, batch 16, 5 steps per epoch (--max-steps), 2 epochs = 10 steps
RETRIEVAL = ["--no-progress", "--device", "cpu", "--embedded-scale", "0.2", "--epochs", "2", "--batch-size", "16",
             "--max-steps", "5", "--lr", "3e-3", "--impl", "reference", "--eval-batch-size", "64"]
JOBS = {"train": (train_main, TRAIN), "retrieval": (retrieval_main, RETRIEVAL)}
CKPT = ["--ckpt-every", "3"]
VOLATILE = {"images_per_s", "train_s", "peak_memory"}  # timings: the only history entries allowed to differ


pytestmark = pytest.mark.usefixtures("one_thread")




def _run(job, out, extra=(), hooks=()):
    main, base = JOBS[job]
    return main([*base, "--out", str(out), *extra], hooks=hooks)


def _weights(out):
    return load_file(os.path.join(out, "adapters.safetensors"))


def _metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


def _history(job, m):
    h = m["state"]["history"] if job == "train" else m["history"]
    return [{k: v for k, v in e.items() if k not in VOLATILE} for e in h]


def _outcome(job, m):
    """Everything a run reports that must not depend on interruptions."""
    out = {"history": _history(job, m)}
    if job == "train":
        out["steps"], out["epochs"] = m["state"]["step"], m["state"]["epoch"]
    else:
        out.update({k: m[k] for k in ("zero_shot", "val", "test", "selected_epoch")})
    return out


def _weights_equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run of each job: weights and reported outcome."""
    torch.set_num_threads(1)
    ref = {}
    for job in JOBS:
        out = tmp_path_factory.mktemp(f"uninterrupted-{job}")
        assert _run(job, out, CKPT) == 0
        ref[job] = (_weights(out), _outcome(job, _metrics(out)))
    return ref


# phase -> (hook occurrence, exit code of the interrupted run); "final": the outputs are complete, the exit code
# still says the run was signalled
PHASES = {"step": 4, "checkpoint": 1, "eval": 1, "final": 1}


@pytest.mark.parametrize("phase", list(PHASES))
@pytest.mark.parametrize("job", list(JOBS))
def test_signal_at_any_phase_then_resume_is_bit_exact(job, phase, tmp_path, reference, capsys):
    ref_w, ref_m = reference[job]
    out = tmp_path / "run"
    rc = _run(job, out, CKPT, hooks=[signal_at(phase, PHASES[phase])])
    text = capsys.readouterr().out
    assert rc == 128 + signal.SIGTERM, text
    assert os.path.isfile(out / "checkpoint.pt")
    assert not [f for f in os.listdir(out) if f.endswith(".tmp") or f.endswith(".lock")]  # nothing left behind
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    if phase == "final":
        assert "during the final save" in text and ck["state"]["epoch"] == 2
        assert _weights_equal(_weights(out), ref_w) and _outcome(job, _metrics(out)) == ref_m
    else:
        assert "continue with --resume" in text
        if phase == "eval":  # stopped between epochs: the checkpoint is at the start of epoch 2
            assert ck["state"]["epoch"] == 1 and ck["state"]["epoch_step"] == 0
    assert _run(job, out, ["--resume", *CKPT]) == 0
    assert "resumed from" in capsys.readouterr().out
    w, m = _weights(out), _outcome(job, _metrics(out))
    diff = {k: (w[k] - ref_w[k]).abs().max().item() for k in ref_w if k in w and not torch.equal(w[k], ref_w[k])}
    assert _weights_equal(w, ref_w), f"resumed weights differ from the uninterrupted run's: {diff}"
    assert m == ref_m, "the resumed run reports other metrics than the uninterrupted one"


def test_several_interruptions_in_one_run(tmp_path, reference):
    """SIGTERM mid-epoch 1, SIGINT at the last step of epoch 1 (before its evaluation), SIGTERM during epoch 2's
    evaluation, each followed by --resume: still the uninterrupted run's weights and metrics."""
    ref_w, ref_m = reference["train"]
    out = tmp_path / "run"
    stops = [(signal_at("step", 2), 143, 2), (signal_at("step", 4, signal.SIGINT), 130, 6), (signal_at("eval", 2), 143, 12)]
    for i, (hook, code, step) in enumerate(stops):
        assert _run("train", out, (["--resume"] if i else []) + CKPT, hooks=[hook]) == code
        assert torch.load(out / "checkpoint.pt", weights_only=True)["state"]["step"] == step
    assert _run("train", out, ["--resume", *CKPT]) == 0
    assert _weights_equal(_weights(out), ref_w) and _outcome("train", _metrics(out)) == ref_m


def test_extending_a_finished_run_does_not_depend_on_its_history(tmp_path, capsys):
    """``--resume --epochs 3`` after a finished 2-epoch run trains the same epoch 3 whether that run was ever resumed
    (here: once more after it had finished); the resumed finished run says so instead of "epoch 3 of 2"."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert _run("train", a, CKPT) == 0
    assert _run("train", b, CKPT) == 0
    capsys.readouterr()
    assert _run("train", b, ["--resume", *CKPT]) == 0
    text = capsys.readouterr().out
    assert "finished all 2 epochs" in text and "epoch 3" not in text
    for out in (a, b):
        assert _run("train", out, ["--resume", "--epochs", "3", *CKPT]) == 0
    assert _weights_equal(_weights(a), _weights(b))
    assert _outcome("train", _metrics(a)) == _outcome("train", _metrics(b))
    assert _metrics(a)["state"]["epoch"] == 3 and _metrics(a)["state"]["step"] == 18


def test_external_sigint_to_the_command_line(tmp_path, reference):
    """Ctrl-C from outside the process, at a fixed point: the child (the real command line) pauses after step 2
    until the signal has arrived; it finishes the step, writes a checkpoint and exits with 130. Resuming ends
    bit-for-bit equal."""
    ref_w, _ = reference["train"]
    out, ready = tmp_path / "run", tmp_path / "ready"
    child = textwrap.dedent(f"""
        import signal, sys, time
        import torch
        from rspeft_fast.train import main
        torch.set_num_threads(1)
        def hold(phase, state):
            if phase == "step" and state.step == 2:
                open({str(ready)!r}, "w").close()
                deadline = time.time() + 120
                while getattr(signal.getsignal(signal.SIGINT), "signum", None) is None and time.time() < deadline:
                    time.sleep(0.01)
        sys.exit(main(sys.argv[1:], hooks=[hold]))
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.Popen([sys.executable, "-c", child, *TRAIN, "--out", str(out), *CKPT], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        import time

        t0 = time.time()
        while not ready.exists() and proc.poll() is None and time.time() - t0 < 240:
            time.sleep(0.05)
        assert ready.exists(), proc.communicate()
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (stdout, stderr)
    assert "SIGINT" in stdout + stderr and "continue with --resume" in stdout
    assert torch.load(out / "checkpoint.pt", weights_only=True)["state"]["step"] == 2
    assert _run("train", out, ["--resume", *CKPT]) == 0
    assert _weights_equal(_weights(out), ref_w)


def test_resume_refuses_other_settings_and_bad_files(tmp_path):
    out = tmp_path / "run"
    assert _run("train", out, hooks=[signal_at("step", 2)]) == 143
    args = TRAIN + ["--out", str(out)]
    with pytest.raises(SystemExit, match="other settings.*lr"):
        train_main(args + ["--resume", "--lr", "1e-3"])
    with pytest.raises(SystemExit, match="other settings.*impl"):  # every option not marked as run control
        train_main(args + ["--resume", "--impl", "auto"])
    with pytest.raises(SystemExit, match="no such file"):
        train_main(args + ["--resume", str(tmp_path / "missing.pt")])
    bad = tmp_path / "bad.pt"
    bad.write_bytes((out / "checkpoint.pt").read_bytes()[:1000])
    with pytest.raises(SystemExit, match="cannot read the checkpoint"):
        train_main(args + ["--resume", str(bad)])
    with pytest.raises(SystemExit, match="positive"):
        train_main(args + ["--ckpt-every", "0"])
    with pytest.raises(SystemExit, match="other settings.*triplet_weight"):
        out2 = tmp_path / "retrieval"
        assert _run("retrieval", out2, hooks=[signal_at("step", 1)]) == 143
        retrieval_main(RETRIEVAL + ["--out", str(out2), "--resume", "--triplet-weight", "0.5"])


def test_resume_fingerprint_is_every_option_but_run_control():
    """The fingerprint is derived from the parsed options: a new option is in it unless marked as run control."""
    from rspeft_fast.retrieval.job import build_parser as retrieval_parser
    from rspeft_fast.train import Settings, build_parser

    for parser, control in ((build_parser(), {"epochs", "device", "workers", "no_progress", "out", "ckpt_every", "resume",
                                              "overwrite"}),
                            (retrieval_parser(), {"epochs", "device", "workers", "no_progress", "out", "ckpt_every", "resume",
                                                  "overwrite", "eval_batch_size", "eval_only"})):
        args = parser.parse_args([])
        fp = Settings.from_args(args, out="x").fingerprint
        dests = {a.dest for a in parser._actions if a.dest != "help"}
        assert set(fp) == dests - control, sorted(set(fp) ^ (dests - control))


def test_resume_may_extend_epochs_but_not_shorten_them(tmp_path, capsys):
    """--epochs may grow on --resume (the cosine schedule is re-targeted to the new end); fewer is refused."""
    out = tmp_path / "run"
    assert _run("train", out, hooks=[signal_at("step", 3)]) == 143
    args = list(TRAIN)
    i = args.index("--epochs")
    with pytest.raises(SystemExit, match="fewer than the checkpointed run's 2"):
        train_main(args[:i] + ["--epochs", "1"] + args[i + 2:] + ["--out", str(out), "--resume"])
    capsys.readouterr()
    assert _run("train", out, ["--resume", "--epochs", "3"]) == 0
    assert "resumed from" in capsys.readouterr().out
    m = _metrics(out)
    assert m["state"]["epoch"] == 3 and m["state"]["step"] == 18


# a BatchNorm backbone whose norm layers are tuned (bitfit: BN weight/bias train, their running statistics with them)
TRAIN_BN = ["--model", "resnet18", "--img-size", "32", "--no-progress", "--device", "cpu", "--method", "bitfit",
            "--epochs", "2", "--embedded-per-class", "6", "--batch-size", "8", "--lr", "3e-3"]


def test_batchnorm_backbone_resume_is_exact_in_evaluation_too(tmp_path):
    """resnet18 + bitfit, SIGTERM mid-epoch 1, --resume: the checkpoint carries the tuned BatchNorms' running
    statistics (before: parameters only, so the resumed run's validation accuracy differed while its weights were
    bit-exact), so weights, buffers and every epoch's validation metrics equal the uninterrupted run's."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert train_main([*TRAIN_BN, "--out", str(ref), *CKPT]) == 0
    assert train_main([*TRAIN_BN, "--out", str(run), *CKPT], hooks=[signal_at("step", 4)]) == 128 + signal.SIGTERM
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    assert any(k.endswith("running_mean") for k in ck["trainable"]), "no BatchNorm statistics in the checkpoint"
    assert train_main([*TRAIN_BN, "--out", str(run), "--resume", *CKPT]) == 0
    w_ref, w = _weights(ref), _weights(run)
    assert any(k.endswith("running_var") for k in w)  # the adapter file holds the statistics too
    assert _weights_equal(w, w_ref)
    assert _outcome("train", _metrics(run)) == _outcome("train", _metrics(ref))
