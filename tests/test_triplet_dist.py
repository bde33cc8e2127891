"""gather=True under torch.distributed (gloo, 2 CPU processes) against the single-process loss and
gradients on the concatenated batch: the ranks' losses sum to the global loss, each rank's gradient
is the global gradient of its shard."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from rspeft_fast.reference.triplet import weighted_triplet_ref
from rspeft_fast.testing import assert_close

import _helpers as H  # noqa: E402  (tests/: free_port, gloo_group)

WORLD = 2
B_LOCAL, D = 23, 16
CASES = [(impl, mv, use_ids) for impl in ("cpu", "reference") for mv in (False, True) for use_ids in (False, True)]

# A torch build without distributed/gloo is a platform limit (skip); a missing rspeft_fast._C is a broken
# build and fails (the "cpu" cases below raise naming the rebuild command).
pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)


def global_batch(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    n = WORLD * B_LOCAL
    img = F.normalize(torch.randn(n, D, generator=g, dtype=dtype), dim=-1)
    txt = F.normalize(torch.randn(n, D, generator=g, dtype=dtype) + 0.3 * img, dim=-1)
    ids = torch.randint(0, n // 3, (n,), generator=g)
    return img, txt, ids


def _worker(rank, port, out_dir):
    with H.gloo_group(rank, port, WORLD):
        from rspeft_fast.ops.triplet import weighted_triplet_loss

        img, txt, ids = global_batch()
        sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        results = {}
        for impl, mv, use_ids in CASES:
            a = img[sl].clone().requires_grad_()
            b = txt[sl].clone().requires_grad_()
            loss = weighted_triplet_loss(a, b, max_violation=mv, ids=ids[sl] if use_ids else None, impl=impl, gather=True,
                                         chunk_elems=200)
            loss.backward()
            results[(impl, mv, use_ids)] = (loss.detach(), a.grad, b.grad)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("triplet_dist")
    mp.spawn(_worker, args=(H.free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("impl,mv,use_ids", CASES)
def test_gather_matches_global(dist_results, impl, mv, use_ids):
    img, txt, ids = global_batch()
    a, b = img.clone().requires_grad_(), txt.clone().requires_grad_()
    loss = weighted_triplet_ref(a, b, max_violation=mv, ids=ids if use_ids else None)
    loss.backward()
    per_rank = [r[(impl, mv, use_ids)] for r in dist_results]
    total = sum(r[0] for r in per_rank)
    assert_close(total, loss.detach(), atol=1e-12, rtol=1e-10, name="sum of rank losses")
    assert all(0 < float(r[0]) < float(loss.detach()) for r in per_rank)  # each rank did a real share
    assert_close(torch.cat([r[1] for r in per_rank]), a.grad, atol=1e-12, rtol=1e-10, name="grad_img shards")
    assert_close(torch.cat([r[2] for r in per_rank]), b.grad, atol=1e-12, rtol=1e-10, name="grad_txt shards")
