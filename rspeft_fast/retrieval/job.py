"""Image-text retrieval fine-tuning and evaluation (HarMA): ``python -m rspeft_fast retrieval [--data ...] ...``

The protocol (SPEC §5):

1. an open_clip model (``--model``; ``--checkpoint FILE`` for open_clip / OpenAI / GeoRSCLIP / RemoteCLIP weights,
   see :mod:`rspeft_fast.retrieval.model`), frozen, with ``inject(model, "mga", ...)`` in both towers (BiShare in
   the text tower; ``--share-image-tower`` shares it into the image tower as the HarMA paper describes), or
   ``--method lora`` (the common PEFT baseline: LoRA on the attentions' packed q/k/v projections, ``--option``
   for LoRAConfig's, peft's option names included);
2. zero-shot evaluation of the starting model on the test split (the injected model at initialisation is the
   backbone exactly: MGA's up-projections start at zero);
3. training with HarMA's objective ``contrastive_loss(ids, learnable τ, unclamped) + w · weighted_triplet_loss(margin
   0.2, γ 2)`` (``--triplet-weight`` w = 1) with HarMA's diagonal-only triplet mask (other captions of the same image
   count as negatives; ``--triplet-ids`` excludes them instead), captions cut at 30 words, MGA attending over the
   text padding as HarMA's does (``--option text_padding_mask=true`` masks it), HarMA's optimiser and schedule
   (``--recipe harma``, the default: AdamW wd 0.04 by HarMA's name rule, betas 0.9/0.98, eps 1e-8, linear warm-up
   over 10 % of the steps then linear decay, per iteration; ``--recipe engine``: the engine's warm-up + cosine) and,
   on real data, HarMA's image transforms (``--transforms``); all of it is :data:`~rspeft_fast.retrieval.recipe.
   HARMA_RECIPE`. On the engine (:mod:`rspeft_fast.train.engine`: autocast, checkpoints, ``--resume``, DDP with
   gather-with-grad under ``torchrun``, ``--fsdp``, ``--grad-checkpointing``);
4. after each epoch, evaluation on the validation split; the epoch with the best validation mR is selected
   (never the test split; the engine's selection; an epoch with NaN similarities is never selected) and its
   adapters kept (``OUT/adapters.safetensors``). Recall@K ranks ties as HarMA's evaluator does (``--ties argsort``,
   ``np.argsort(row)[::-1]``); ``--ties pessimistic`` counts a tie against the model;
5. the selected epoch's test metrics, once, at the end.

This module is the job's description (:class:`Retrieval`): model, data, objective, metrics and selection score.

``OUT/metrics.json`` = ``{"model", "zero_shot", "val", "test", "selected_epoch", ...}``, each split with the recall
keys of :func:`rspeft_fast.retrieval.recall_at_k` plus ``n_images`` and ``n_captions``; ``--eval-only`` evaluates
the injected (optionally ``--adapters FILE``) model on the test split and writes ``test`` (and ``zero_shot``, the
same). Outputs are adapter files, never whole models.

Without ``--data``: the embedded captioned scene set (:mod:`rspeft_fast.data.scenes`) and the CPU-sized CLIP
:data:`~rspeft_fast.retrieval.model.TINY_CLIP`.

Distributed: each rank reads its slice of every global batch (:class:`~rspeft_fast.train.data.ResumableSampler`),
both loss terms all-gather the features with gradients; the contrastive term is a per-rank mean (DDP's gradient
averaging gives the global gradient) and the triplet term a per-rank share of a sum, so it is multiplied by the
world size before DDP averages it: N processes with batch B train exactly as one with batch N·B.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import torch

from ..train.engine import Job, Settings, add_engine_args, control, method_options, parse_option, run
from .model import TINY_CLIP, RetrievalModel, create_clip
from .readers import FORMATS, CaptionSplit, DataError, read_split
from .recipe import HARMA_RECIPE, harma_lr_lambda, harma_param_groups

__all__ = ["main", "build_parser", "retrieval_loss", "objective", "evaluate_split", "build_retrieval_model", "Retrieval"]

# MGA sizes per model when --option does not say; any other model: MGAConfig's width rule (see --option's help)
_MGA_DEFAULTS = {TINY_CLIP: {"hidden": 64, "heads": 4}}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m rspeft_fast retrieval",
        description="Fine-tune an open_clip dual encoder with HarMA's MGA adapters for image-text retrieval, "
                    "select on the validation split, report Recall@1/5/10 and mR on the test split.",
    )
    p.add_argument("--model", default=TINY_CLIP, help="open_clip model name, e.g. ViT-B-32, ViT-B-32-quickgelu, ViT-L-14 (default %(default)s: a CPU-sized CLIP)")
    p.add_argument("--checkpoint", default=None, help="backbone weights (open_clip, OpenAI, GeoRSCLIP or RemoteCLIP state dict)")
    p.add_argument("--pretrained", default=None, help="an open_clip pretrained tag (downloads; needs the network)")
    p.add_argument("--method", default="mga", choices=("mga", "lora"),
                   help="the adapters: HarMA's MGA (default) or LoRA (LoRAConfig; default the packed q/k/v projection "
                        "of every attention in both towers, e.g. --option r=8 --option lora_alpha=16 --option "
                        "modules='^(in_proj|out_proj)$')")
    p.add_argument("--option", action="append", type=parse_option, default=[], metavar="KEY=VALUE",
                   help="option of --method's config (MGAConfig, LoRAConfig), e.g. --option hidden=128 --option heads=8 (repeatable). Default sizes "
                        "follow the model's width W (the wider tower): hidden = W/6 rounded down to a multiple of 16 "
                        "(16-128), heads = hidden/16 -- HarMA's 128/8 on ViT-B-32 and ViT-L-14; the embedded job's tiny "
                        "CLIP (W 128) uses hidden=64, heads=4 (the rule's 16/1 learns 8.2 test mR there, 64/4 9.8)")
    p.add_argument("--share-image-tower", action="store_true", help="the image adapters use the text tower's BiShare modules (HarMA paper)")
    p.add_argument("--data", default=None, help="HarMA json PREFIX, Karpathy json, precomp folder or GeoRSCLIP csv; default: embedded scene set")
    p.add_argument("--images", default=None, help="image root folder (paths in --data are relative to it)")
    p.add_argument("--format", default="auto", choices=FORMATS, help="data format (default %(default)s: detected)")
    p.add_argument("--encoding", default="utf-8", help="text encoding of csv / txt data (default %(default)s)")
    p.add_argument("--max-words", type=int, default=HARMA_RECIPE.max_words,
                   help="truncate cleaned captions to this many words (default %(default)s, HarMA's; 0 = no limit)")
    p.add_argument("--transforms", default=None, choices=("harma", "open_clip"),
                   help="image transforms (default: harma with --data, open_clip's on the embedded 32-px set)")
    p.add_argument("--recipe", default="harma", choices=("harma", "engine"),
                   help="optimiser and schedule: harma = HarMA's AdamW groups + linear warm-up 10%% / linear decay "
                        "(default); engine = the engine's AdamW + warm-up / cosine")
    p.add_argument("--ties", default=HARMA_RECIPE.ties, choices=("argsort", "pessimistic"),
                   help="Recall@K tie rule (default %(default)s: ranks as HarMA's evaluator, np.argsort(row)[::-1])")
    p.add_argument("--embedded-scale", type=float, default=1.0, help="embedded set size factor (1 = 240/60/60 images, 5 captions each)")
    p.add_argument("--triplet-weight", type=float, default=1.0, help="weight of the weighted triplet term (HarMA: 1)")
    p.add_argument("--margin", type=float, default=0.2)
    p.add_argument("--gamma", type=float, default=2.0)
    p.add_argument("--max-violation", action="store_true", help="hard-negative mining in the triplet term")
    p.add_argument("--triplet-diagonal-only", dest="triplet_diagonal_only", action="store_true",
                   default=HARMA_RECIPE.triplet_diagonal_only,
                   help="HarMA's mask (default): only the pair itself is a positive in the triplet term (other captions "
                        "of the same image count as negatives)")
    p.add_argument("--triplet-ids", dest="triplet_diagonal_only", action="store_false",
                   help="the triplet term never counts another caption of the same image as a negative (an option)")
    add_engine_args(p, epochs=10, batch_size=32, lr=2e-3, weight_decay=0.04, out_help="output folder (default runs/retrieval-<model>)")
    control(p, p.add_argument("--eval-batch-size", type=int, default=256))
    control(p, p.add_argument("--eval-only", action="store_true", help="evaluate the injected model (with --adapters) on the test split only"))
    p.add_argument("--adapters", default=None, help="adapter file to start from (save_adapters format)")
    return p


# --------------------------------------------------------------------------------------------------
# model


def build_retrieval_model(args) -> tuple:
    """``(RetrievalModel, tokenizer, train transform, eval transform)``: the open_clip model, injected (and
    ``--adapters`` loaded), with the learnable temperature."""
    from ..integration import inject, load_adapters
    from ..integration.config import config_for

    transforms = args.transforms or (HARMA_RECIPE.transforms if args.data else "open_clip")
    try:
        clip, tok, t_train, t_eval = create_clip(args.model, args.checkpoint, args.pretrained, transforms=transforms)
    except ImportError as e:
        raise SystemExit(str(e)) from None
    method = args.method
    if method == "mga":
        opts = {**_MGA_DEFAULTS.get(args.model, {}), **method_options("mga", args.option)}
        opts.setdefault("text_padding_mask", HARMA_RECIPE.text_padding_mask)  # HarMA's MSA attends over the padding
        if args.share_image_tower:
            opts["share_across_towers"] = True
    else:
        if args.share_image_tower:
            raise SystemExit("--share-image-tower shares MGA's BiShare modules; it does not apply to --method lora")
        opts = method_options(method, args.option)
    opts.setdefault("impl", args.impl)
    try:
        cfg = config_for(method, **opts)
        inject(clip, cfg)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"cannot inject {method} into {args.model!r}: {e}") from None
    if args.adapters:
        try:
            load_adapters(clip, args.adapters)
        except (OSError, ValueError, RuntimeError) as e:
            raise SystemExit(f"--adapters {args.adapters}: {e}") from None
    if args.grad_checkpointing:
        clip.set_grad_checkpointing(True)
    return RetrievalModel(clip), tok, t_train, t_eval


def _clip_blocks(model):
    from ..integration._blocks import ClipBlock

    return [m for m in model.modules() if ClipBlock is not None and isinstance(m, ClipBlock)]


# --------------------------------------------------------------------------------------------------
# data


class _Images(torch.utils.data.Dataset):
    """Images of a split through a transform: ``uint8 (N, 3, H, W)`` tensors (embedded set) or file paths."""

    def __init__(self, source, transform):
        self.source, self.transform = source, transform

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        from PIL import Image

        s = self.source[i]
        if isinstance(s, torch.Tensor):
            return self.transform(Image.fromarray(s.permute(1, 2, 0).numpy()))
        with Image.open(s) as im:
            return self.transform(im.convert("RGB"))


class _Pairs(torch.utils.data.Dataset):
    """One item per caption: ``(image, tokens, image id)``."""

    def __init__(self, images: _Images, tokens: torch.Tensor, txt_to_img):
        self.images, self.tokens, self.t2i = images, tokens, list(txt_to_img)

    def __len__(self):
        return len(self.t2i)

    def __getitem__(self, j):
        i = self.t2i[j]
        return self.images[i], self.tokens[j], i


def _embedded(args, size: int) -> dict:
    from ..data.scenes import CaptionedScenes

    out = {}
    for split in ("train", "val", "test"):
        s = CaptionedScenes.split(split, size=size, seed=args.seed, scale=args.embedded_scale)
        out[split] = CaptionSplit(list(s.images), s.captions, s.txt_to_img, source=f"embedded scenes ({split})")
    return out


def _drop_images(split: CaptionSplit, keep: set) -> CaptionSplit:
    remap = {old: new for new, old in enumerate(i for i in range(split.n_images) if i in keep)}
    caps = [(c, remap[i]) for c, i in zip(split.captions, split.txt_to_img) if i in remap]
    return CaptionSplit([p for i, p in enumerate(split.images) if i in keep], [c for c, _ in caps], [i for _, i in caps], split.source)


def load_splits(args, size: int, progress=None, splits=("train", "val", "test")) -> dict:
    """The splits as :class:`CaptionSplit`; every image file checked up front (unreadable ones listed or dropped)."""
    from ..train.data import check_images

    if args.data is None:
        return {k: v for k, v in _embedded(args, size).items() if k in splits}
    try:
        out = {s: read_split(args.data, s, args.format, args.images, args.encoding, args.max_words or None)
               for s in splits}
    except DataError as e:  # its message names the file
        raise SystemExit(str(e)) from None
    every = [(s, i) for s in splits for i in range(out[s].n_images)]
    ok = set(check_images([out[s].images[i] for s, i in every], workers=args.workers, skip_bad=args.skip_bad_images,
                          what=f"images of {args.data}", progress=progress))
    for s in splits:
        keep = {i for n, (s2, i) in enumerate(every) if s2 == s and n in ok}
        if len(keep) < out[s].n_images:
            out[s] = _drop_images(out[s], keep)
        if out[s].n_images == 0:
            raise SystemExit(f"--data {args.data}: no readable images in the {s} split")
    return out


# --------------------------------------------------------------------------------------------------
# objective and evaluation


def retrieval_loss(img, txt, temperature, ids, *, triplet_weight: float = 1.0, margin: float = 0.2, gamma: float = 2.0,
                   max_violation: bool = False, diagonal_only: bool = False, triplet_impl: str = "auto", world: int = 1):
    """HarMA's objective on one rank's batch: ``contrastive_loss(ids, τ) + triplet_weight · weighted_triplet_loss``
    (``img``, ``txt`` ``(B, E)`` L2-normalised, ``ids (B,)`` image ids; ``diagonal_only``: the triplet term without
    ids, HarMA's own mask). Under ``world`` > 1 both terms gather with gradients and the triplet term (a per-rank
    share of a sum) is multiplied by ``world`` (see the module docstring), so DDP's averaging gives the gradient
    of the whole global batch. Returns the scalar to backpropagate."""
    from ..ops.contrastive import contrastive_loss
    from ..ops.triplet import weighted_triplet_loss

    gather = world > 1
    loss = contrastive_loss(img, txt, ids=ids, temperature=temperature, gather=gather)
    if triplet_weight:
        trip = weighted_triplet_loss(img, txt, margin, gamma, max_violation, None if diagonal_only else ids, triplet_impl, gather)
        loss = loss + triplet_weight * world * trip
    return loss


def objective(args) -> dict:
    """The keyword arguments of :func:`retrieval_loss` that the command line sets."""
    return {"triplet_weight": args.triplet_weight, "margin": args.margin, "gamma": args.gamma,
            "max_violation": args.max_violation, "diagonal_only": args.triplet_diagonal_only,
            "triplet_impl": "reference" if args.impl == "reference" else "auto"}


@torch.no_grad()
def embed(model: RetrievalModel, images: _Images, tokens: torch.Tensor, ctx):
    """L2-normalised embeddings of every image and caption, in batches of ``--eval-batch-size``:
    ``(img (N_img, E), txt (N_txt, E))`` fp32. ``ctx``: the engine's :class:`~rspeft_fast.train.engine.Context`."""
    model.eval()
    dev, bs = ctx.device, ctx.args.eval_batch_size
    loader = torch.utils.data.DataLoader(images, batch_size=bs, shuffle=False, num_workers=ctx.args.workers)
    img = []
    for x in ctx.progress(loader, desc="embedding images", leave=False):
        with ctx.autocast():  # through forward(), so a DDP / FSDP2 wrapper runs its hooks (FSDP2 all-gathers there)
            img.append(model(x.to(dev, non_blocking=True), None)[0].float())
    txt = []
    for a in range(0, tokens.shape[0], bs):
        with ctx.autocast():
            txt.append(model(None, tokens[a:a + bs].to(dev))[1].float())
    return torch.cat(img), torch.cat(txt)


def evaluate_split(model, images: _Images, tokens: torch.Tensor, txt_to_img, ctx) -> dict:
    """Recall@1/5/10 and mR (:func:`recall_at_k`) of a split, with ``n_images`` and ``n_captions``."""
    from .metrics import recall_at_k

    img, txt = embed(model, images, tokens, ctx)
    m = recall_at_k(img @ txt.t(), torch.as_tensor(txt_to_img, device=img.device), ties=ctx.args.ties)
    m["n_images"], m["n_captions"] = int(img.shape[0]), int(txt.shape[0])
    return m


def _fmt(m: dict) -> str:
    return (f"mR {m['r_mean']:.2f} | i2t R@1/5/10 {m['txt_r1']:.1f}/{m['txt_r5']:.1f}/{m['txt_r10']:.1f} | "
            f"t2i R@1/5/10 {m['img_r1']:.1f}/{m['img_r5']:.1f}/{m['img_r10']:.1f}")


# --------------------------------------------------------------------------------------------------
# the job


class Retrieval(Job):
    """HarMA's retrieval fine-tuning: contrastive + weighted triplet loss on caption pairs, validation mR per
    epoch, the best validation epoch selected, its test metrics at the end (zero-shot test metrics first)."""

    name = "retrieval"
    betas = (0.9, 0.98)
    selects = True

    @property
    def trains(self) -> bool:
        return not self.args.eval_only

    def model(self, ctx):
        self._model, self.tok, self.t_train, self.t_eval = build_retrieval_model(self.args)
        return self._model

    def data(self, ctx, model):
        a = self.args
        vis = model.clip.visual.image_size
        self.size = int(vis[0] if isinstance(vis, (tuple, list)) else vis)
        self.splits = load_splits(a, self.size, ctx.progress, ("train", "val", "test") if self.trains else ("test",))
        self.tokens = {k: self.tok(v.captions) for k, v in self.splits.items()}
        self.images = {k: _Images(v.images, self.t_eval) for k, v in self.splits.items()}
        if not self.trains:
            return None
        train = self.splits["train"]
        return ctx.train_loader(_Pairs(_Images(train.images, self.t_train), self.tokens["train"], train.txt_to_img))

    def objective(self, ctx, net):
        obj, world = objective(self.args), ctx.dist.world

        def loss_fn(batch):
            x, t, ids = batch
            x, t, ids = x.to(ctx.device, non_blocking=True), t.to(ctx.device, non_blocking=True), ids.to(ctx.device)
            net.train()
            with ctx.autocast():
                img, txt, temp = net(x, t)
            return retrieval_loss(img, txt, temp, ids, **obj, world=world), x.shape[0]

        return loss_fn

    def _eval(self, ctx, net, split: str) -> dict:
        return evaluate_split(net, self.images[split], self.tokens[split], self.splits[split].txt_to_img, ctx)

    def evaluate(self, ctx, net):
        return {"val": self._eval(ctx, net, "val"), "temperature": float(self._model.temperature().detach())}

    def score(self, m):
        from .metrics import selectable

        return m["val"]["r_mean"] if selectable(m["val"]) else float("nan")  # NaN: never selected (engine)

    def optimizer(self, model, settings, total_steps, device):
        if self.args.recipe != "harma":
            return None
        opt = torch.optim.AdamW(harma_param_groups(model.named_parameters(), settings.weight_decay), lr=settings.lr,
                                betas=HARMA_RECIPE.betas, eps=HARMA_RECIPE.eps,
                                fused=True if device.type == "cuda" else None)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, harma_lr_lambda(total_steps))

    def adapters(self, model):
        return model.clip

    def shard_modules(self, model):
        return _clip_blocks(model)

    def describe(self, ctx, model):
        from ..integration import trainable_parameters

        a, d = self.args, ctx.dist
        return (f"model {a.model} + {a.method} | {trainable_parameters(model.clip)} | device {ctx.device} | img {self.size} | "
                f"data {a.data or 'embedded scene set'}: "
                + ", ".join(f"{k} {v.n_images} images / {v.n_captions} captions" for k, v in self.splits.items())
                + (f" | {d.world} processes" if d.world > 1 else ""))

    def epoch_line(self, m, epochs):
        return (f"epoch {m['epoch']}/{epochs}  loss {m['train_loss']:.4f}  val {_fmt(m['val'])}  τ {m['temperature']:.4f}  "
                f"{m['images_per_s']:.1f} pairs/s  peak mem {m['peak_memory']}")

    def start(self, ctx, net, state):
        if "zero_shot" not in state.extra:  # a resumed run has it from the checkpoint
            state.extra["zero_shot"] = self._eval(ctx, net, "test")
            ctx.log(f"zero-shot test: {_fmt(state.extra['zero_shot'])}")

    def report(self, ctx, net, state):
        a = self.args
        test = self._eval(ctx, net, "test")
        if state is None:  # --eval-only
            ctx.log(f"test: {_fmt(test)}")
            return {"model": a.model, "adapters": a.adapters, "checkpoint": a.checkpoint, "zero_shot": test, "test": test}
        sel = state.extra["selected_epoch"]
        val = state.history[sel - 1]["val"] if sel else self._eval(ctx, net, "val")
        zs = state.extra["zero_shot"]
        ctx.log(f"selected epoch {sel} (best validation mR {val['r_mean']:.2f}); test: {_fmt(test)} "
                f"(zero-shot mR {zs['r_mean']:.2f})")
        ctx.log(f"saved the selected epoch's adapter weights to {os.path.join(ctx.settings.out, 'adapters.safetensors')}")
        return {"model": a.model, "zero_shot": zs, "val": val, "test": test, "selected_epoch": sel, "history": state.history}


def main(argv: Optional[list] = None, *, hooks=()) -> int:
    """``python -m rspeft_fast retrieval ...``; ``hooks``: phase hooks (:class:`~rspeft_fast.train.engine.Settings`)."""
    args = build_parser().parse_args(argv)
    out = args.out or os.path.join("runs", f"retrieval-{args.model}")
    return run(Retrieval(args), Settings.from_args(args, out=out, hooks=hooks))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
