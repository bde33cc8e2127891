"""The training loop of the engine (:mod:`rspeft_fast.train.engine` wires jobs to it).

:class:`Trainer` runs epochs of ``loss_fn(batch) -> (loss, n_items)`` with AdamW over the trainable
parameters (:func:`build_optim`: weight decay on matrices only, linear warm-up then cosine, stepped per
batch), autocast (:func:`autocast`), optional gradient clipping, a tqdm progress bar, per-epoch running
metrics, atomic checkpoints every N steps and on SIGINT/SIGTERM (:class:`StopRequest`), and bit-exact
resume (:mod:`rspeft_fast.train.checkpoint`); :meth:`Trainer.fit` is the epoch loop (train, evaluate, select,
checkpoint, stop on a signal). It reads its settings from :class:`~rspeft_fast.train.engine.Settings`, never
from a command line. Under ``torchrun`` (:func:`setup_distributed`) the model is wrapped in DDP, or sharded
with FSDP2 ``fully_shard`` (``fsdp``), by :func:`wrap_model`; the stop decision is all-reduced so every rank
stops after the same step, and rank 0 writes the checkpoint (with every rank's RNG states).

Phase hooks: ``settings.hooks`` are called as ``hook(phase, state)`` when a phase begins — ``"step"`` (after
each optimizer step), ``"checkpoint"`` (a checkpoint write), ``"eval"`` (the end-of-epoch evaluation),
``"final"`` (the final save) — for logging, profiling, or raising a signal at a chosen moment (the resume
tests do).
"""
from __future__ import annotations

import contextlib
import math
import os
import resource
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
from torch import nn

from .. import _fileio
from .checkpoint import FORMAT, TrainState, backbone_checksum, fresh_acc, rng_state, set_rng_state

__all__ = ["Trainer", "build_optim", "amp_dtype", "autocast", "peak_memory", "resolve_device", "StopRequest",
           "DistInfo", "setup_distributed", "wrap_model", "unwrap", "save_adapters_from", "load_adapters_into",
           "write_or_exit"]


# --------------------------------------------------------------------------------------------------
# devices, precision, memory


def resolve_device(name: str, dist: Optional["DistInfo"] = None) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist.local_rank if dist is not None and dist.world > 1 else torch.cuda.current_device())
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available here")
    return dev


def amp_dtype(amp: str, device: torch.device):
    """``--amp`` (auto | bf16 | fp16 | off) on ``device`` → the autocast dtype (None: off)."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "off"
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def autocast(amp: str, device: torch.device):
    dt = amp_dtype(amp, device)
    if dt is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dt)


def peak_memory(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (CUDA allocated)"
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return f"{rss_kib / 2**20:.2f} GiB (process RSS)"


def build_optim(model: nn.Module, *, lr: float, weight_decay: float, warmup_steps: Optional[int], total_steps: int,
                device: torch.device, betas=(0.9, 0.999)):
    """AdamW (weight decay on ≥2-D tensors only) + LambdaLR: linear warm-up (``warmup_steps``, default 5 % of
    ``total_steps``) then cosine to 0 at ``total_steps``."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=tuple(betas),
        fused=device.type == "cuda" or None,
    )
    warm = warmup_steps if warmup_steps is not None else max(1, int(0.05 * total_steps))

    def lr_at(step):  # linear warm-up then cosine to 0
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total_steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    return opt, sched


# --------------------------------------------------------------------------------------------------
# distributed


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialised_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return torch.distributed.is_available() and torch.distributed.is_initialized()


def setup_distributed(fsdp: bool = False) -> DistInfo:
    """Join the ``torchrun`` process group (``WORLD_SIZE`` > 1: gloo on CPU, nccl on CUDA). ``fsdp`` in a
    single process makes a one-rank gloo group (``fully_shard`` needs one)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local)
    if world > 1:
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend)
        return DistInfo(dist.get_rank(), dist.get_world_size(), local, True)
    if fsdp:
        store = os.path.join(tempfile.mkdtemp(prefix="rspeft_fast_pg_"), "store")
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", init_method=f"file://{store}", rank=0, world_size=1)
        return DistInfo(0, 1, 0, True)
    return DistInfo()


def wrap_model(model: nn.Module, dist: DistInfo, device: torch.device, *, fsdp: bool = False,
               shard_modules: Callable[[nn.Module], list] | None = None) -> nn.Module:
    """DDP (world > 1) or FSDP2 (``fsdp``: ``fully_shard`` on each module of ``shard_modules(model)``, e.g. the
    transformer blocks, then on the root) of the injected model; the model itself otherwise. FSDP2 shards in
    place: the returned module is ``model``, now with DTensor parameters."""
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        # fully_shard cannot shard 0-d tensors (MGA gates, the temperature, CLIP's logit_scale): they stay
        # replicated, and the trainable ones get their gradients averaged across ranks right after accumulation
        scalars = {p for p in model.parameters() if p.dim() == 0}
        for m in (shard_modules(model) if shard_modules is not None else []):
            fully_shard(m, ignored_params=scalars)
        fully_shard(model, ignored_params=scalars)
        import torch.distributed as tdist

        world = tdist.get_world_size()
        if world > 1:
            def _average(p):
                tdist.all_reduce(p.grad)
                p.grad.div_(world)

            for p in scalars:
                if p.requires_grad:
                    p.register_post_accumulate_grad_hook(_average)
        return model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def _fsdp_units(root: nn.Module) -> list:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return []
    return [m for m in root.modules() if isinstance(m, FSDPModule)]


def save_adapters_from(root: nn.Module, target: nn.Module, path: str, dist: "DistInfo") -> None:
    """``save_adapters(target)`` on rank 0, ``target`` being ``root`` or a part of it. Under FSDP2 (``root`` was
    ``fully_shard``ed) the parameters are all-gathered first (``unshard``) and resharded after: every rank must
    call this (every rank returns once the file is written)."""
    from ..integration import save_adapters

    units = _fsdp_units(root)
    for m in units:  # every unit: each block is its own all-gather group
        m.unshard()
    try:
        if dist.is_main:
            save_adapters(unwrap(target), path)
    finally:
        for m in units:
            m.reshard()
    if dist.world > 1:
        torch.distributed.barrier()


def load_adapters_into(root: nn.Module, target: nn.Module, path: str) -> None:
    """:func:`rspeft_fast.integration.load_adapters` of ``path`` into ``target`` (``root`` or a part of it), on
    every rank; FSDP2-sharded parameters take the file's full tensors as replicated values (each rank keeps its
    shard)."""
    from ..integration import load_adapters

    ctx = contextlib.nullcontext()
    if _fsdp_units(root):
        from torch.distributed.tensor.experimental import implicit_replication

        ctx = implicit_replication()
    try:
        with ctx:
            load_adapters(unwrap(target), path)
    except (OSError, ValueError, RuntimeError) as e:
        raise SystemExit(f"cannot load the selected adapters back from {path}: {e}") from None


def write_or_exit(path: str, write: Callable[[], None], what: str) -> None:
    """``write()`` (an atomic write of ``path``); a full disk stops the job with one line saying so and that the
    previous ``what`` at ``path`` (the atomic write never touched it) is intact."""
    existed = os.path.exists(path)
    try:
        write()
    except (OSError, RuntimeError) as e:
        if not _fileio.is_no_space(e):
            raise
        left = f"the previous {what} is intact" if existed else f"no earlier {what} existed"
        raise SystemExit(f"no space left on device writing {path}; {left}") from None


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel) else model


# --------------------------------------------------------------------------------------------------
# signals


class StopRequest:
    """SIGINT/SIGTERM handler: the first signal asks the loop to stop after the step in flight; a second
    one restores the default action and re-raises the signal (abort at once)."""

    def __init__(self):
        self.signum = None

    def __call__(self, signum, frame):
        if self.signum is not None:
            signal.signal(signum, signal.SIG_DFL if signum != signal.SIGINT else signal.default_int_handler)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        print(f"\nreceived {signal.Signals(signum).name}: finishing the current step and writing a checkpoint "
              "(send it again to abort without saving)", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():  # signals can only be handled there
            yield self
            return
        old = {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


# --------------------------------------------------------------------------------------------------
# the loop


def _gpu_sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class Trainer:
    """The training loop with its checkpointable state.

    ``model``: the (unwrapped) injected model whose trainable tensors a checkpoint holds; ``loss_fn(batch)
    -> (loss, n_items)`` runs the (wrapped) model's forward under autocast itself; ``settings``: the
    engine's :class:`~rspeft_fast.train.engine.Settings` (epochs, clipping, checkpoint interval, fingerprint,
    hooks, ...). :meth:`fit` runs the epochs.
    """

    def __init__(self, model, train_loader, opt, sched, scaler, settings, steps_per_epoch: int, *, device: torch.device,
                 ckpt_path: str, loss_fn: Callable, stop: StopRequest, progress=None, dist: DistInfo | None = None):
        self.model, self.loader, self.opt, self.sched, self.scaler = model, train_loader, opt, sched, scaler
        self.sampler = train_loader.sampler
        self.settings, self.steps_per_epoch, self.device, self.ckpt_path = settings, steps_per_epoch, device, ckpt_path
        self.loss_fn, self.stop, self.dist = loss_fn, stop, dist or DistInfo()
        self.progress = progress or (lambda it, **_: it)
        self.state = TrainState(epoch_acc=fresh_acc())
        # the sampler's generator state at the start of epoch ``state.epoch`` (None: the generator as it is);
        # after an epoch ends it is the state that epoch's permutation left, which the next one starts from
        self._epoch_start = None

    def phase(self, name: str) -> None:
        """Call the settings' hooks: ``hook(name, state)`` (see the module docstring)."""
        for hook in self.settings.hooks:
            hook(name, self.state)

    def _stop_now(self) -> bool:
        """Whether any rank received a signal (all-reduced under torch.distributed: all stop together)."""
        flag = self.stop.signum is not None
        if self.dist.world > 1:
            import torch.distributed as dist

            t = torch.tensor([int(self.stop.signum or 0)], device=self.device if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            if t.item() and self.stop.signum is None:
                self.stop.signum = int(t.item())
            flag = bool(t.item())
        return flag

    def _global_mean(self, loss) -> float:
        """The loss value to report: under torch.distributed the mean over the ranks (the global batch's loss
        for the jobs' objectives), else this process's."""
        if self.dist.world == 1:
            return loss.item()
        import torch.distributed as dist

        t = loss.detach().float().reshape(1).clone()
        if dist.get_backend() != "nccl":
            t = t.cpu()
        dist.all_reduce(t)
        return t.item() / self.dist.world

    # -- the epochs ------------------------------------------------------------------------------------
    def fit(self, evaluate: Callable[[], dict] | None = None, select: Callable[[dict], None] | None = None,
            on_epoch_end: Callable[[dict], None] | None = None) -> bool:
        """Train until ``settings.epochs`` are done. After each epoch: ``evaluate()`` (its metrics join the
        epoch's), ``select(metrics)`` (model selection; may save the epoch's adapters), the epoch is recorded,
        ``on_epoch_end(metrics)`` (the log line). A signal stops the run after the step in flight, or after the
        evaluation when it arrives there, with a checkpoint written: returns False then, True when done."""
        st = self.state
        while st.epoch < self.settings.epochs:
            if not self.train_epoch():
                return False
            m = self.epoch_metrics()
            self.phase("eval")
            if evaluate is not None:
                m.update(evaluate())
            m["epoch"] = st.epoch + 1
            m["peak_memory"] = peak_memory(self.device)
            if select is not None:
                select(m)
            self.end_epoch(m)
            if on_epoch_end is not None:
                on_epoch_end(m)
            if self._stop_now():  # arrived during the evaluation: the epoch is complete
                self.save_checkpoint()
                return False
        return True

    # -- one epoch -------------------------------------------------------------------------------------
    def train_epoch(self) -> bool:
        """Runs (the rest of) the epoch in flight; returns False when a signal stopped it part-way."""
        s, st, dev = self.settings, self.state, self.device
        self.sampler.begin_epoch(st.epoch, start_step=st.epoch_step, generator_state=self._epoch_start)
        self._epoch_start = self.sampler.epoch_start_state
        if st.epoch_step >= self.steps_per_epoch:
            return True
        params = [p for g in self.opt.param_groups for p in g["params"]]
        acc = st.epoch_acc
        _gpu_sync(dev)
        t0 = time.perf_counter()
        bar = self.progress(self.loader, desc=f"epoch {st.epoch + 1}/{s.epochs}", leave=False)
        for batch in bar:
            loss, n = self.loss_fn(batch)
            self.opt.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                if s.clip_grad:
                    self.scaler.unscale_(self.opt)
                    torch.nn.utils.clip_grad_norm_(params, s.clip_grad)
                self.scaler.step(self.opt)
                self.scaler.update()
            else:
                loss.backward()
                if s.clip_grad:
                    torch.nn.utils.clip_grad_norm_(params, s.clip_grad)
                self.opt.step()
            self.sched.step()
            st.step += 1
            st.epoch_step += 1
            li = self._global_mean(loss)
            if not math.isfinite(li):
                raise FloatingPointError(f"non-finite loss {li} at step {st.step}")
            acc["first_loss"] = li if acc["first_loss"] is None else acc["first_loss"]
            acc["total_loss"] += li * n
            acc["n_seen"] += n
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{li:.3f}", lr=f"{self.sched.get_last_lr()[0]:.2e}")
            done = st.epoch_step >= self.steps_per_epoch
            self.phase("step")
            stopping = self._stop_now()
            if stopping or (s.ckpt_every and st.step % s.ckpt_every == 0):
                _gpu_sync(dev)
                acc["train_s"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                self.save_checkpoint()
                if stopping or self._stop_now():  # a signal during the write: the checkpoint is current
                    return False
            if done:
                break
        _gpu_sync(dev)
        acc["train_s"] += time.perf_counter() - t0
        return True

    def resumed_text(self, path: str) -> str:
        """The one-line report of where a resume from ``path`` continues (both jobs print it)."""
        st = self.state
        if st.epoch >= self.settings.epochs:
            return (f"resumed from {path}: the run had finished all {st.epoch} epochs ({st.step} steps); nothing left "
                    "to train (pass a larger --epochs to train on)")
        return (f"resumed from {path}: epoch {st.epoch + 1} of {self.settings.epochs}, step {st.epoch_step} of "
                f"{self.steps_per_epoch} ({st.step} steps done)")

    def epoch_metrics(self) -> dict:
        acc, n = self.state.epoch_acc, self.state.epoch_acc["n_seen"]
        return {"train_loss": acc["total_loss"] / max(n, 1), "first_loss": acc["first_loss"],
                "images_per_s": n / max(acc["train_s"], 1e-9), "train_s": acc["train_s"], "steps": self.state.epoch_step}

    def end_epoch(self, metrics: dict) -> None:
        self.state.history.append(metrics)
        self.state.epoch += 1
        self.state.epoch_step = 0
        self.state.epoch_acc = fresh_acc()
        self._epoch_start = self.sampler.generator.get_state()  # where the finished epoch's permutation left it

    # -- checkpoints -----------------------------------------------------------------------------------
    def _trainable(self) -> dict:
        out = {}
        for n, p in self.model.named_parameters():
            if p.requires_grad:
                t = p.detach()
                t = t.full_tensor() if hasattr(t, "full_tensor") else t  # FSDP2: a collective on every rank
                out[n] = t.to("cpu", copy=True)
        return out

    def checkpoint(self) -> dict:
        rng = rng_state(self.device)
        if self.dist.world > 1:
            import torch.distributed as dist

            rngs = [None] * self.dist.world
            dist.all_gather_object(rngs, rng)
        else:
            rngs = [rng]
        start = self._epoch_start if self._epoch_start is not None else self.sampler.generator.get_state()
        return {
            "format": FORMAT,
            "run": dict(self.settings.fingerprint),
            "epochs": int(self.settings.epochs),
            "world": self.dist.world,
            "backbone_checksum": backbone_checksum(self.model),
            "trainable": self._trainable(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "state": asdict(self.state),
            "sampler": {"epoch": self.state.epoch, "epoch_start_state": start},
            "rng": rngs,
        }

    def save_checkpoint(self) -> None:
        self.phase("checkpoint")
        if self.settings.fsdp:  # a signal under --fsdp: no checkpoint format for sharded state yet
            raise SystemExit("--fsdp: cannot write a training checkpoint of a sharded model (not supported yet); stopping without one")
        ck = self.checkpoint()
        if self.dist.is_main:
            write_or_exit(self.ckpt_path, lambda: _fileio.atomic_torch_save(ck, self.ckpt_path), "checkpoint")
        if self.dist.world > 1:
            torch.distributed.barrier()

    def load_checkpoint(self, path: str) -> None:
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise SystemExit(f"--resume {path}: cannot read the checkpoint ({type(e).__name__}: {e})") from None
        if not isinstance(ck, dict) or ck.get("format") != FORMAT:
            raise SystemExit(f"--resume {path}: not an rspeft_fast training checkpoint"
                             + (f" of this version (format {ck.get('format')!r}, expected {FORMAT!r})"
                                if isinstance(ck, dict) and "format" in ck else ""))
        now, then = dict(self.settings.fingerprint), ck["run"]
        diff = {k: (then.get(k), now.get(k)) for k in sorted(set(now) | set(then)) if now.get(k) != then.get(k)}
        if diff:
            raise SystemExit(f"--resume {path}: the checkpoint was written by a run with other settings; differing "
                             f"(checkpoint, now): {diff}")
        if int(self.settings.epochs) < int(ck["epochs"]):
            raise SystemExit(f"--resume {path}: --epochs {self.settings.epochs} is fewer than the checkpointed run's "
                             f"{ck['epochs']} (a resume may extend --epochs, not shorten it)")
        if int(ck.get("world", 1)) != self.dist.world:
            raise SystemExit(f"--resume {path}: written by {ck.get('world', 1)} process(es), resumed with {self.dist.world}")
        if ck["backbone_checksum"] != backbone_checksum(self.model):
            raise SystemExit(f"--resume {path}: the frozen backbone weights differ from the checkpointed run's "
                             "(another --checkpoint file or library version?)")
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        saved = ck["trainable"]
        if set(saved) != set(params) or any(tuple(saved[n].shape) != tuple(params[n].shape) for n in params):
            raise SystemExit(f"--resume {path}: the checkpoint's trainable tensors do not match the model's")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        if self.scaler is not None and ck["scaler"] is not None:
            self.scaler.load_state_dict(ck["scaler"])
        self.state = TrainState(**ck["state"])
        self._epoch_start = ck["sampler"]["epoch_start_state"]
        set_rng_state(ck["rng"][self.dist.rank], self.device)
