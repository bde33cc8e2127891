"""The files a job writes and the folder it writes them in: atomic writes with the mode ``open()`` would give,
one job per ``--out`` (lock), no silent restart over a checkpoint, leftovers of interrupted writes removed, room
and writability checked before the first step, a full disk reported in one line, the weights kept when the
final save fails."""
from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys

import pytest
import torch

pytest.importorskip("timm")
from safetensors.torch import load_file  # noqa: E402

from rspeft_fast import _fileio  # noqa: E402
from rspeft_fast.train import main as train_main  # noqa: E402

TINY = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--no-progress", "--device", "cpu", "--model-arg", "depth=1",
        "--method", "mufa", "--option", "rates=16", "--epochs", "1", "--embedded-per-class", "2", "--batch-size", "4",
        "--max-steps", "2", "--impl", "reference"]


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _signal_at_step(n):
    import signal

    def hook(phase, state):
        if phase == "step" and state.step == n:
            signal.raise_signal(signal.SIGTERM)

    return hook


# --------------------------------------------------------------------------------------------------
# atomic writes


def test_atomic_save_keeps_previous_file_when_the_write_fails(tmp_path):
    path = tmp_path / "ck.pt"
    _fileio.atomic_torch_save({"a": torch.ones(3)}, str(path))

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full (simulated)")

    with pytest.raises(RuntimeError, match="simulated"):
        _fileio.atomic_torch_save({"a": torch.zeros(3), "b": Boom()}, str(path))
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(3))
    assert os.listdir(tmp_path) == ["ck.pt"]  # the temporary file was removed


def test_atomic_writes_get_the_mode_open_would_give(tmp_path, umask022):
    """A new file: 0666 less the umask (0644 under 022), not mkstemp's 0600; an existing file keeps its mode."""
    new = tmp_path / "new.json"
    _fileio.atomic_write_text(new, "{}")
    with open(tmp_path / "plain.json", "w") as f:
        f.write("{}")
    assert _mode(new) == _mode(tmp_path / "plain.json") == 0o644
    os.chmod(new, 0o600)
    _fileio.atomic_write_text(new, "[]")
    assert _mode(new) == 0o600 and new.read_text() == "[]"
    os.umask(0o077)
    _fileio.atomic_torch_save({}, tmp_path / "private.pt")
    assert _mode(tmp_path / "private.pt") == 0o600


def test_job_files_get_the_umask_mode(tmp_path, umask022):
    out = tmp_path / "run"
    assert train_main(TINY + ["--out", str(out), "--ckpt-every", "1"]) == 0
    modes = {f: _mode(out / f) for f in ("checkpoint.pt", "adapters.safetensors", "metrics.json")}
    assert modes == dict.fromkeys(modes, 0o644), {k: oct(v) for k, v in modes.items()}


def _failing_writer(exc):
    """An atomic write that gets half-way through the temporary file, then fails with ``exc``."""
    def write(obj, path):
        def half(f):
            f.write(b"x" * 100)
            raise exc
        _fileio.atomic_write(path, half)
    return write


NO_SPACE = [OSError(errno.ENOSPC, "No space left on device"),
            RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 4608 vs 4503")]


@pytest.mark.parametrize("exc", NO_SPACE, ids=["ENOSPC", "inline_container"])
def test_full_disk_during_a_checkpoint_says_so_in_one_line(tmp_path, monkeypatch, exc):
    out = tmp_path / "run"
    real = _fileio.atomic_torch_save
    calls = []

    def save(obj, path):
        calls.append(path)
        (real if len(calls) == 1 else _failing_writer(exc))(obj, path)

    monkeypatch.setattr(_fileio, "atomic_torch_save", save)
    with pytest.raises(SystemExit) as e:
        train_main(TINY + ["--out", str(out), "--ckpt-every", "1"])
    path = os.path.join(str(out), "checkpoint.pt")
    assert str(e.value) == f"no space left on device writing {path}; the previous checkpoint is intact"
    assert torch.load(path, weights_only=True)["state"]["step"] == 1  # the first checkpoint, intact
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_full_disk_writing_metrics_keeps_the_previous_file(tmp_path, monkeypatch):
    """metrics.json is written atomically: a failed write leaves the previous file whole."""
    from rspeft_fast.train import engine

    out = tmp_path / "run"
    assert train_main(TINY + ["--out", str(out)]) == 0
    before = (out / "metrics.json").read_text()
    monkeypatch.setattr(engine, "atomic_write_text", lambda path, text: _failing_writer(NO_SPACE[0])(text, path))
    with pytest.raises(SystemExit, match=r"^no space left on device writing .*metrics.json; the previous metrics file is intact$"):
        train_main(TINY + ["--out", str(out), "--epochs", "2", "--seed", "1"])
    assert (out / "metrics.json").read_text() == before


def test_failed_final_save_keeps_the_weights_and_says_where(tmp_path, monkeypatch):
    import rspeft_fast.integration as integration

    out = tmp_path / "run"
    real = integration.save_adapters

    def save(model, path, *a, **k):
        if os.path.dirname(os.path.abspath(path)) == str(out):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(model, path, *a, **k)

    monkeypatch.setattr(integration, "save_adapters", save)
    with pytest.raises(SystemExit) as e:
        train_main(TINY + ["--out", str(out), "--ckpt-every", "1"])
    msg = str(e.value)
    assert "\n" not in msg and "no space left on device" in msg and "checkpoint" in msg
    fallback = msg.split("written to ")[1].split(" instead")[0]
    try:
        kept = load_file(fallback)
        ck = torch.load(out / "checkpoint.pt", weights_only=True)["trainable"]
        assert kept.keys() == ck.keys() and all(torch.equal(kept[k], ck[k]) for k in kept)
    finally:
        os.unlink(fallback)


# --------------------------------------------------------------------------------------------------
# the output folder


def test_out_must_be_creatable_writable_and_have_room(tmp_path, monkeypatch, capsys):
    from rspeft_fast.train import outdir

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match="cannot create the folder"):
        train_main(TINY + ["--out", str(blocker / "run")])

    def refuse(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    with monkeypatch.context() as m:
        m.setattr(outdir.tempfile, "mkstemp", refuse)
        with pytest.raises(SystemExit, match="not writable"):
            train_main(TINY + ["--out", str(tmp_path / "ro")])

    class Usage:
        total, used, free = 10**9, 10**9 - 4096, 4096

    monkeypatch.setattr(outdir.shutil, "disk_usage", lambda p: Usage)
    out = tmp_path / "full"
    capsys.readouterr()
    with pytest.raises(SystemExit, match=r"4\.0 KiB free on its disk, the run writes about .*checkpoint.pt"):
        train_main(TINY + ["--out", str(out), "--ckpt-every", "1"])
    assert "epoch 1" not in capsys.readouterr().out and not (out / "checkpoint.pt").exists()  # before the first step


def test_one_job_per_output_folder(tmp_path):
    """Another process holding the folder's lock: the job stops at once, naming that process."""
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"fd = os.open({str(out / '.rspeft_fast.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode())\n"
         "print('locked', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit, match=f"in use by another job \\(pid {holder.pid}\\)"):
            train_main(TINY + ["--out", str(out)])
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert train_main(TINY + ["--out", str(out)]) == 0  # released: the folder is free again
    assert not (out / ".rspeft_fast.lock").exists()


def test_no_fresh_start_over_a_checkpoint_without_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(TINY + ["--out", str(out)], hooks=[_signal_at_step(1)]) == 143
    with pytest.raises(SystemExit, match="checkpoint.pt exists.*--resume.*--overwrite"):
        train_main(TINY + ["--out", str(out)])
    assert torch.load(out / "checkpoint.pt", weights_only=True)["state"]["step"] == 1
    capsys.readouterr()
    assert train_main(TINY + ["--out", str(out), "--overwrite"]) == 0
    assert "removed the earlier run's checkpoint" in capsys.readouterr().out
    assert not (out / "checkpoint.pt").exists() and (out / "adapters.safetensors").exists()


def test_leftovers_of_interrupted_writes_are_removed_at_start(tmp_path, capsys):
    """Hidden temporaries of the job's own files go; anything else in the folder stays."""
    out = tmp_path / "run"
    out.mkdir()
    own = [".checkpoint.pt.k2j3h4.tmp", ".adapters.safetensors.a8b9.tmp", ".metrics.json.zz.tmp"]
    other = [".notes.txt.k2j3.tmp", "mine.tmp", ".checkpoint.pt.bak"]
    for f in own + other:
        (out / f).write_bytes(b"partial")
    assert train_main(TINY + ["--out", str(out)]) == 0
    left = set(os.listdir(out))
    assert not left & set(own) and set(other) <= left
    assert "removed 3 temporary file(s)" in capsys.readouterr().out
