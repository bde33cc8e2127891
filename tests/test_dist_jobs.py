"""The jobs past one process, on 2 gloo ranks (one spawn for every case):

* DDP retrieval (the job's model, wrapping and objective, ``gather=True``): 2 ranks with batch 4 give the loss
  and the gradients of one process with batch 8 (captions of one image split across the ranks);
* FSDP2 ``fully_shard`` (the jobs' ``--fsdp`` wrapping, per-block units) of an injected vit_tiny (MuFA,
  cross-entropy) and of the tiny CLIP (MGA, HarMA's objective): the loss and the gradients equal the unsharded
  model's on the same global batch.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rspeft_fast.testing import assert_close

import _helpers as H  # noqa: E402  (tests/: free_port, gloo_group)

pytest.importorskip("open_clip")
pytest.importorskip("timm")
pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo")

WORLD, B = 2, 8  # global batch 8: 4 per rank
IDS = torch.tensor([0, 1, 2, 3, 0, 4, 5, 3])  # image ids: images 0 and 3 have a caption on each rank
CAPTIONS = ["red fields in the left half", "white houses on the right", "a blue forest", "yellow orchard rows",
            "crimson farmland in the western part", "green trees in the middle", "pale roofs", "golden planted dots"]


def _perturb(model, seed):
    """Random trainable tensors (MGA / MuFA up-projections start at zero, which would zero most gradients)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _retrieval_setup():
    from rspeft_fast.retrieval.job import build_parser, build_retrieval_model

    args = build_parser().parse_args(["--device", "cpu", "--no-progress"])
    torch.manual_seed(0)
    model, tok, _, _ = build_retrieval_model(args)
    _perturb(model, 1)
    g = torch.Generator().manual_seed(2)
    images = torch.randn(B, 3, 32, 32, generator=g)
    return args, model, images, tok(CAPTIONS)


def _retrieval_loss(net, args, images, tokens, ids, world):
    from rspeft_fast.retrieval.job import objective, retrieval_loss

    img, txt, temp = net(images, tokens)
    return retrieval_loss(img, txt, temp, ids, **objective(args), world=world)


def _vit_setup():
    import timm

    import rspeft_fast as rf

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=5)
    rf.inject(model, "mufa", impl="reference")
    _perturb(model, 3)
    g = torch.Generator().manual_seed(4)
    return model, torch.randn(B, 3, 32, 32, generator=g), torch.randint(0, 5, (B,), generator=g)


def _grads(model):
    return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
            for n, p in model.named_parameters() if p.requires_grad}


def _global_mean(loss):
    t = loss.detach().clone()
    dist.all_reduce(t)
    return t / WORLD


def _worker(rank, port, out_dir):
    from rspeft_fast.integration.families import block_modules
    from rspeft_fast.train.loop import DistInfo, wrap_model
    from rspeft_fast.retrieval.job import _clip_blocks

    info, cpu = DistInfo(rank, WORLD, rank), torch.device("cpu")
    sl = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
    res = {}
    with H.gloo_group(rank, port, WORLD):
        # DDP retrieval
        args, model, images, tokens = _retrieval_setup()
        net = wrap_model(model, info, cpu)
        assert isinstance(net, torch.nn.parallel.DistributedDataParallel)
        loss = _retrieval_loss(net, args, images[sl], tokens[sl], IDS[sl], WORLD)
        loss.backward()
        res["ddp"] = (_global_mean(loss), _grads(model))

        # FSDP2: vit_tiny + MuFA, cross-entropy
        model, x, y = _vit_setup()
        plain = copy.deepcopy(model)
        ref_loss = torch.nn.functional.cross_entropy(plain(x), y)
        ref_loss.backward()
        sharded = wrap_model(model, info, cpu, fsdp=True, shard_modules=block_modules)
        assert any(hasattr(p, "device_mesh") for p in sharded.parameters())
        loss = torch.nn.functional.cross_entropy(sharded(x[sl]), y[sl])
        loss.backward()
        res["fsdp_vit"] = (ref_loss.detach(), _grads(plain), _global_mean(loss), _grads(sharded))

        # FSDP2: tiny CLIP + MGA, HarMA's objective with gather-with-grad
        args, model, images, tokens = _retrieval_setup()
        plain = copy.deepcopy(model)
        ref_loss = _retrieval_loss(plain, args, images, tokens, IDS, 1)
        ref_loss.backward()
        sharded = wrap_model(model, info, cpu, fsdp=True, shard_modules=_clip_blocks)
        loss = _retrieval_loss(sharded, args, images[sl], tokens[sl], IDS[sl], WORLD)
        loss.backward()
        res["fsdp_clip"] = (ref_loss.detach(), _grads(plain), _global_mean(loss), _grads(sharded))
        if rank == 0:
            torch.save(res, os.path.join(out_dir, "results.pt"))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist_jobs")
    mp.spawn(_worker, args=(H.free_port(), str(out)), nprocs=WORLD, join=True)
    return torch.load(out / "results.pt", weights_only=False)


def _assert_grads_equal(got, want, what):
    assert got.keys() == want.keys() and want
    assert any(w.abs().sum() > 0 for w in want.values())
    for n in want:
        assert_close(got[n], want[n], name=f"{what}: grad of {n}")


def test_ddp_retrieval_equals_one_process(results):
    torch.set_num_threads(1)
    args, model, images, tokens = _retrieval_setup()
    loss = _retrieval_loss(model, args, images, tokens, IDS, 1)
    loss.backward()
    ddp_loss, ddp_grads = results["ddp"]
    assert_close(ddp_loss, loss.detach(), name="DDP global loss")
    _assert_grads_equal(ddp_grads, _grads(model), "DDP")
    assert "temp" in ddp_grads and ddp_grads["temp"].abs() > 0  # the learnable temperature is trained too


@pytest.mark.parametrize("case", ["fsdp_vit", "fsdp_clip"])
def test_fsdp2_equals_unsharded(results, case):
    ref_loss, ref_grads, loss, grads = results[case]
    assert_close(loss, ref_loss, name=f"{case} loss")
    _assert_grads_equal(grads, ref_grads, case)


def test_torchrun_ddp_retrieval_job_matches_one_process(tmp_path):
    """The command line under torchrun: 2 processes with --batch-size 8 train like one with 16 (the first step's
    loss, then close adapters after 3 steps); --fsdp (one process, sharding path, unshard-to-save) likewise."""
    import json
    import subprocess
    import sys

    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    env.pop("TRITON_INTERPRET", None)
    common = ["retrieval", "--no-progress", "--device", "cpu", "--embedded-scale", "0.2", "--epochs", "1", "--max-steps", "3",
              "--lr", "3e-3", "--impl", "reference"]
    tr = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(H.free_port()), "-m", "rspeft_fast"]
    runs = {"one": [sys.executable, "-m", "rspeft_fast", *common, "--batch-size", "16"],
            "ddp": [*tr, *common, "--batch-size", "8"],
            "fsdp": [sys.executable, "-m", "rspeft_fast", *common, "--batch-size", "16", "--fsdp"]}
    for name, cmd in runs.items():
        p = subprocess.run(cmd + ["--out", str(tmp_path / name)], env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, (name, p.stdout[-3000:], p.stderr[-3000:])
    m = {k: json.load(open(tmp_path / k / "metrics.json")) for k in runs}
    b = load_file(tmp_path / "one" / "adapters.safetensors")
    for run in ("ddp", "fsdp"):
        assert_close(torch.tensor(m[run]["history"][0]["first_loss"]), torch.tensor(m["one"]["history"][0]["first_loss"]),
                     name=f"{run}: first step's global loss")
        a = load_file(tmp_path / run / "adapters.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-3, msg=lambda s: f"{run} {k}: {s}")
