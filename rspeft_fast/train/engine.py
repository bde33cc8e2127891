"""The engine's one entry point: :func:`run` a :class:`Job` under :class:`Settings`.

A job is a description — its model, data, objective and metrics — and the engine does everything else: the
process group (DDP / FSDP2 under ``torchrun``), seeding, the output folder (lock, leftovers, room, no silent
restart over a checkpoint), wrapping, AdamW + warm-up/cosine, checkpoints and bit-exact ``--resume``,
SIGINT/SIGTERM, the epoch loop (train → evaluate → select → log), the final save and an atomic
``metrics.json``. A new job (say semantic segmentation) is written without copying a line of another::

    from rspeft_fast.train.engine import Job, Settings, add_engine_args, run

    class Segmentation(Job):
        name = "segment"

        def model(self, ctx):                      # the injected model (frozen backbone + adapters)
            model = build_segmenter(self.args)
            inject(model, "mufa", impl=self.args.impl)
            return model

        def data(self, ctx, model):                # the training loader (resumable order, seeded augmentation)
            self.val = val_loader(self.args)
            return ctx.train_loader(train_set(self.args))

        def objective(self, ctx, net):             # batch -> (loss, items in the batch)
            def loss(batch):
                x, y = (t.to(ctx.device) for t in batch)
                with ctx.autocast():
                    return F.cross_entropy(net(x), y), x.shape[0]
            return loss

        def evaluate(self, ctx, net):              # per-epoch metrics (joined to the epoch's record)
            return {"val_miou": mean_iou(net, self.val, ctx)}

        selects = True                             # optional: keep the best epoch's adapters
        def score(self, m):
            return m["val_miou"]

    def main(argv=None, *, hooks=()):
        p = argparse.ArgumentParser(prog="python -m rspeft_fast segment")
        p.add_argument("--model", ...)             # the job's own options: all of them are in the resume
        add_engine_args(p, epochs=10, batch_size=8, lr=1e-3, weight_decay=0.01)   # fingerprint unless
        args = p.parse_args(argv)                                                   # marked with control()
        return run(Segmentation(args), Settings.from_args(args, out=args.out or "runs/segment", hooks=hooks))

Optional further methods: ``describe`` (the start line), ``epoch_line``, ``start`` (before the first step, e.g.
zero-shot metrics kept in ``state.extra``), ``report`` (``metrics.json`` contents), ``adapters`` (the part of the
model whose adapters are saved), ``shard_modules`` (FSDP2 units), ``betas``, ``trains`` (False: evaluate only).

The resume fingerprint is derived, not listed: every option the job's parser defines is in it, except those
marked as run control with :func:`control` where they are defined (``--epochs``, which may grow, ``--out``,
``--workers``, the checkpoint interval, ...). ``Settings.hooks`` observe phases (:mod:`~rspeft_fast.train.loop`).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from .._fileio import atomic_write_text, is_no_space
from .checkpoint import run_fingerprint
from .data import ResumableSampler, SeededSamples
from .loop import (DistInfo, StopRequest, Trainer, amp_dtype, autocast, build_optim, load_adapters_into, resolve_device,
                   save_adapters_from, setup_distributed, wrap_model, write_or_exit)
from .outdir import OutputFolder

__all__ = ["Job", "Settings", "Context", "run", "add_engine_args", "control", "parse_option", "method_options",
           "CHECKPOINT", "ADAPTERS", "METRICS"]

CHECKPOINT, ADAPTERS, METRICS = "checkpoint.pt", "adapters.safetensors", "metrics.json"


# --------------------------------------------------------------------------------------------------
# settings and the command-line options every job shares


def control(parser: argparse.ArgumentParser, *actions: argparse.Action):
    """Mark options (the actions ``add_argument`` returned) as run control: they steer a run without shaping its
    training trajectory, so a resume may change them and they stay out of the fingerprint."""
    have = tuple(parser.get_default("_control") or ())
    parser.set_defaults(_control=have + tuple(a.dest for a in actions))
    return actions[0] if len(actions) == 1 else actions


def add_engine_args(p: argparse.ArgumentParser, *, epochs: int, batch_size: int, lr: float, weight_decay: float,
                    out_help: str = "output folder") -> None:
    """The training-engine options every job shares."""
    control(p, p.add_argument("--epochs", type=int, default=epochs))
    p.add_argument("--batch-size", type=int, default=batch_size, help="per process (default %(default)s)")
    p.add_argument("--lr", type=float, default=lr, help="peak learning rate (default %(default)s)")
    p.add_argument("--weight-decay", type=float, default=weight_decay)
    p.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps (default: 5%% of all steps)")
    p.add_argument("--clip-grad", type=float, default=None, metavar="NORM", help="clip the gradient norm (default: off)")
    control(p, p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N"))
    p.add_argument("--impl", default="auto", choices=["auto", "reference", "triton"], help="adapter kernels (default %(default)s)")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"], help="autocast: auto = bf16 on CUDA, off on CPU")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute the backbone blocks in the backward (less memory)")
    p.add_argument("--fsdp", action="store_true",
                   help="shard the injected model with FSDP2 fully_shard over the torchrun processes (one process: a one-rank group)")
    control(p, p.add_argument("--workers", type=int, default=0, help="DataLoader workers (default %(default)s)"))
    p.add_argument("--skip-bad-images", action="store_true", help="drop unreadable images (with a warning) instead of stopping")
    p.add_argument("--max-steps", type=int, default=None, help="stop each epoch after this many steps (smoke tests)")
    p.add_argument("--seed", type=int, default=0)
    control(p, p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar"))
    control(p, p.add_argument("--out", default=None, help=out_help))
    control(p, p.add_argument("--ckpt-every", type=int, default=None, metavar="N",
                              help="write an atomic checkpoint (OUT/checkpoint.pt) every N optimizer steps and at the end; "
                                   "one is always written on SIGINT/SIGTERM"))
    control(p, p.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                              help="resume from PATH (default OUT/checkpoint.pt; bare --resume starts afresh if it does not exist)"))
    control(p, p.add_argument("--overwrite", action="store_true",
                              help="start afresh even though OUT holds an earlier run's checkpoint (it is removed)"))


def parse_option(s: str):
    """``key=value`` → ``(key, value string)`` (``-`` in keys → ``_``); the value is coerced for the method by
    :func:`rspeft_fast.integration.config.coerce_options` (``rates=8,16,32`` → ``(8, 16, 32)``, ``"4"`` → 4, ...)."""
    if "=" not in s:
        raise argparse.ArgumentTypeError(f"--option expects key=value, got {s!r}")
    k, v = s.split("=", 1)
    return k.replace("-", "_"), v


def method_options(method: str, options) -> dict:
    """``--option`` pairs coerced for ``method`` (one-line ``SystemExit`` naming a bad option)."""
    from ..integration.config import OptionError, coerce_options

    try:
        return coerce_options(method, dict(options))
    except OptionError as e:
        raise SystemExit(f"--option: {e}") from None


@dataclass(frozen=True)
class Settings:
    """What the engine needs to know of a run (no command line: :meth:`from_args` reads one)."""

    out: str
    epochs: int = 1
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: Optional[int] = None
    clip_grad: Optional[float] = None
    device: str = "auto"
    amp: str = "auto"
    fsdp: bool = False
    max_steps: Optional[int] = None
    seed: int = 0
    progress: bool = True
    ckpt_every: Optional[int] = None
    resume: Optional[str] = None  # None: start afresh; "": OUT/checkpoint.pt if it exists; else a path
    overwrite: bool = False
    fingerprint: dict = field(default_factory=dict)  # option → JSON string: a resume must match it
    hooks: tuple = ()  # hook(phase, state), see rspeft_fast.train.loop

    @classmethod
    def from_args(cls, args: argparse.Namespace, *, out: str, hooks=()) -> "Settings":
        """The engine's settings from a job's parsed options (:func:`add_engine_args` plus the job's own); the
        fingerprint is every option not marked with :func:`control`."""
        skip = set(getattr(args, "_control", ()))
        options = {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in skip}
        return cls(out=out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                   warmup_steps=args.warmup_steps, clip_grad=args.clip_grad, device=args.device, amp=args.amp,
                   fsdp=args.fsdp, max_steps=args.max_steps, seed=args.seed, progress=not args.no_progress,
                   ckpt_every=args.ckpt_every, resume=args.resume, overwrite=args.overwrite,
                   fingerprint=run_fingerprint(options), hooks=tuple(hooks))


@dataclass
class Context:
    """What a job's methods get from the engine."""

    settings: Settings
    args: argparse.Namespace  # the job's parsed options
    dist: DistInfo
    device: torch.device
    progress: Callable
    log: Callable[[str], None]

    def autocast(self):
        return autocast(self.settings.amp, self.device)

    def train_loader(self, dataset, *, workers: Optional[int] = None) -> torch.utils.data.DataLoader:
        """The training DataLoader of ``dataset`` the engine can checkpoint: a :class:`ResumableSampler` order and
        per-sample seeded augmentation (:class:`SeededSamples`); under torch.distributed each rank reads its slice
        of every global batch."""
        s, d = self.settings, self.dist
        sampler = ResumableSampler(len(dataset), s.seed, s.batch_size, d.rank, d.world)
        return torch.utils.data.DataLoader(
            SeededSamples(dataset, s.seed), batch_size=s.batch_size, sampler=sampler,
            drop_last=d.world > 1 or len(dataset) > s.batch_size,
            num_workers=getattr(self.args, "workers", 0) if workers is None else workers,
            generator=torch.Generator().manual_seed(s.seed),  # seeds the workers only (never the global RNG)
            pin_memory=self.device.type == "cuda")


class Job:
    """A job's description (override ``model``, ``data``, ``objective``, ``evaluate``; see the module docstring)."""

    name = "job"
    betas = (0.9, 0.999)
    selects = False  # True: keep the adapters of the epoch with the best score(metrics), reload them at the end

    def __init__(self, args: argparse.Namespace):
        self.args = args

    @property
    def trains(self) -> bool:
        return True

    def model(self, ctx: Context) -> nn.Module:
        raise NotImplementedError

    def data(self, ctx: Context, model: nn.Module):
        """The training DataLoader (:meth:`Context.train_loader`); None when the job does not train."""
        raise NotImplementedError

    def objective(self, ctx: Context, net: nn.Module) -> Callable:
        """``loss_fn(batch) -> (loss, n_items)`` on the wrapped model ``net``."""
        raise NotImplementedError

    def evaluate(self, ctx: Context, net: nn.Module) -> dict:
        return {}

    def score(self, metrics: dict) -> float:
        raise NotImplementedError

    def adapters(self, model: nn.Module) -> nn.Module:
        return model

    def shard_modules(self, model: nn.Module) -> list:
        return []

    def describe(self, ctx: Context, model: nn.Module) -> str:
        from ..integration import trainable_parameters

        return f"{self.name}: {trainable_parameters(model)} | device {ctx.device}"

    def epoch_line(self, m: dict, epochs: int) -> str:
        return f"epoch {m['epoch']}/{epochs}  train_loss {m['train_loss']:.4f}  peak mem {m['peak_memory']}"

    def start(self, ctx: Context, net: nn.Module, state) -> None:
        pass

    def report(self, ctx: Context, net: nn.Module, state) -> dict:
        """The contents of ``metrics.json`` (the engine adds ``args`` and ``resumed_from``)."""
        from dataclasses import asdict

        return {"state": None if state is None else asdict(state)}


# --------------------------------------------------------------------------------------------------
# the run


def _progress(settings: Settings, dist: DistInfo):
    if not settings.progress or not dist.is_main:
        def progress(it, **_):
            return it
        return progress
    from tqdm.auto import tqdm

    return tqdm


def _resume_path(settings: Settings, ckpt_path: str, log) -> Optional[str]:
    if settings.resume is None:
        return None
    path = settings.resume or ckpt_path
    if not os.path.isfile(path):
        if settings.resume:
            raise SystemExit(f"--resume {settings.resume}: no such file")
        log(f"--resume: no checkpoint at {path} yet; starting afresh")
        return None
    return path


def _seed_ranks(seed: int, dist: DistInfo) -> None:
    if dist.world > 1:  # per-rank random streams (dropout, drop-path, mixup) once the model is built
        torch.manual_seed(seed + dist.rank)
        random.seed(seed + dist.rank)
    try:  # timm's Mixup draws from numpy
        import numpy as np

        np.random.seed(seed + dist.rank)
    except ImportError:  # pragma: no cover
        pass


def _expected_sizes(model: nn.Module) -> dict:
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {CHECKPOINT: 3 * trainable + (1 << 20),  # the tensors and AdamW's two moments, plus the rest
            ADAPTERS: trainable + (64 << 10), METRICS: 1 << 20}


def run(job: Job, settings: Settings) -> int:
    """Run ``job``: train it (or only evaluate, ``job.trains`` False) and write ``OUT/adapters.safetensors`` and
    ``OUT/metrics.json``. Returns the exit code: 0, or 128 + the signal number after SIGINT / SIGTERM."""
    s = settings
    if s.ckpt_every is not None and s.ckpt_every <= 0:
        raise SystemExit(f"--ckpt-every must be a positive number of steps, got {s.ckpt_every}")
    if s.fsdp and job.trains and (s.ckpt_every or s.resume is not None):
        raise SystemExit("--fsdp: training checkpoints (--ckpt-every, --resume) are not supported with FSDP2 sharding yet; "
                         "use DDP (torchrun without --fsdp) for resumable runs")
    dist = setup_distributed(s.fsdp)
    try:
        return _run(job, s, dist)
    finally:
        if dist.initialised_here and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _run(job: Job, s: Settings, dist: DistInfo) -> int:
    def log(text: str) -> None:
        if dist.is_main:
            print(text, flush=True)

    if s.fsdp and dist.world == 1:
        log("--fsdp in a single process (not under torchrun): FSDP2 runs over a one-rank group, nothing is sharded "
            "(same results, no memory saved); launch with torchrun --nproc_per_node N to shard over N processes")
    torch.manual_seed(s.seed)  # the same on every rank: the model is built identically everywhere
    random.seed(s.seed)
    device = resolve_device(s.device, dist)
    ckpt_path = os.path.join(s.out, CHECKPOINT)
    with OutputFolder(s.out, (CHECKPOINT, ADAPTERS, METRICS), log, active=dist.is_main) as folder:
        resume_from = _resume_path(s, ckpt_path, log) if job.trains else None
        if job.trains:
            folder.refuse_existing_checkpoint(ckpt_path, resuming=s.resume is not None, overwrite=s.overwrite)
        ctx = Context(s, job.args, dist, device, _progress(s, dist), log)
        model = job.model(ctx)
        _seed_ranks(s.seed, dist)
        loader = job.data(ctx, model)
        model.to(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        net = wrap_model(model, dist, device, fsdp=s.fsdp, shard_modules=job.shard_modules)
        if not job.trains:
            log(job.describe(ctx, model))
            _write_metrics(s.out, job.report(ctx, net, None), job, None, dist)
            return 0
        return _train(job, ctx, s, model, net, loader, folder, ckpt_path, resume_from)


def _train(job, ctx, s, model, net, loader, folder, ckpt_path, resume_from) -> int:
    dist, device, log = ctx.dist, ctx.device, ctx.log
    steps_per_epoch = len(loader) if s.max_steps is None else min(len(loader), s.max_steps)
    opt, sched = build_optim(model, lr=s.lr, weight_decay=s.weight_decay, warmup_steps=s.warmup_steps,
                             total_steps=max(1, steps_per_epoch * s.epochs), device=device, betas=job.betas)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype(s.amp, device) == torch.float16 else None
    stop = StopRequest()
    trainer = Trainer(model, loader, opt, sched, scaler, s, steps_per_epoch, device=device, ckpt_path=ckpt_path,
                      loss_fn=job.objective(ctx, net), stop=stop, progress=ctx.progress, dist=dist)
    if resume_from is not None:
        trainer.load_checkpoint(resume_from)
    folder.check_room(_expected_sizes(model))
    state = trainer.state
    log(job.describe(ctx, model))
    job.start(ctx, net, state)
    if resume_from is not None:
        log(trainer.resumed_text(resume_from))
    adapters_path = os.path.join(s.out, ADAPTERS)
    target = job.adapters(model)

    def save_selected():
        write_or_exit(adapters_path, lambda: save_adapters_from(model, target, adapters_path, dist), "adapter file")

    def select(m: dict) -> None:
        score, best = job.score(m), state.extra.get("best_score")
        if best is None or score > best:
            state.extra["best_score"], state.extra["selected_epoch"] = score, m["epoch"]
            save_selected()

    with stop.installed():
        done = trainer.fit(evaluate=lambda: job.evaluate(ctx, net), select=select if job.selects else None,
                           on_epoch_end=lambda m: log(job.epoch_line(m, s.epochs)))
        if not done:
            log(f"stopped by {signal.Signals(stop.signum).name} at epoch {state.epoch + 1}, step {state.epoch_step}; "
                f"checkpoint written to {ckpt_path} (continue with --resume)")
            return 128 + int(stop.signum)
        trainer.phase("final")
        if s.ckpt_every:
            trainer.save_checkpoint()
        if not job.selects:
            _final_adapters(job, model, target, adapters_path, ckpt_path if s.ckpt_every else None, dist)
        elif "selected_epoch" in state.extra:
            load_adapters_into(model, target, adapters_path)
        else:  # no epoch ran (--epochs 0): the starting model
            state.extra["best_score"], state.extra["selected_epoch"] = None, 0
            save_selected()
        _write_metrics(s.out, job.report(ctx, net, state), job, resume_from, dist)
    if stop.signum is not None:
        log(f"received {signal.Signals(stop.signum).name} during the final save: finished it; the run is complete "
            f"and its outputs are in {s.out}")
        return 128 + int(stop.signum)
    return 0


def _final_adapters(job, model, target, path, ckpt_path, dist) -> None:
    """Save the trained adapters; when ``path`` cannot be written, keep them in the temporary folder and say where."""
    try:
        save_adapters_from(model, target, path, dist)
        return
    except (OSError, RuntimeError) as e:
        why = "no space left on device" if is_no_space(e) else f"{type(e).__name__}: {e}"
    fallback = os.path.join(tempfile.gettempdir(), f"rspeft_fast-{job.name}-{os.getpid()}-{ADAPTERS}")
    kept = f"; the checkpoint {ckpt_path} holds the finished run too" if ckpt_path and os.path.exists(ckpt_path) else ""
    try:
        save_adapters_from(model, target, fallback, DistInfo())
    except (OSError, RuntimeError) as e2:
        raise SystemExit(f"cannot write {path} ({why}), nor {fallback} ({type(e2).__name__}: {e2}); "
                         + (kept[2:] if kept else "the trained adapter weights are lost")) from None
    raise SystemExit(f"cannot write {path} ({why}); the trained adapter weights were written to {fallback} instead{kept}")


def _write_metrics(out: str, report: dict, job: Job, resume_from, dist: DistInfo) -> None:
    if not dist.is_main:
        return
    args = {k: v for k, v in vars(job.args).items() if not k.startswith("_")}
    text = json.dumps({**report, "args": args, "resumed_from": resume_from}, indent=1, default=str)
    path = os.path.join(out, METRICS)
    write_or_exit(path, lambda: atomic_write_text(path, text), "metrics file")

