"""BatchNorm backbones (timm ResNet): a frozen BatchNorm keeps its running statistics in training, a tuned one's
statistics are saved with it, so the model trained in memory and the one reloaded from its adapter file agree."""
import copy

import pytest
import torch

timm = pytest.importorskip("timm")
pytest.importorskip("safetensors")

import rspeft_fast as rf  # noqa: E402
from rspeft_fast.integration import trainable_state_dict  # noqa: E402
from safetensors import safe_open  # noqa: E402

# (method, options): every method a ResNet takes; layernorm on layer4 only leaves frozen and tuned BatchNorms side by side
CASES = [("linear", {}), ("bitfit", {}), ("layernorm", {}), ("full", {}), ("layernorm", {"target": r"layer4.*"})]
CLASSES = 4


def _resnet():
    torch.manual_seed(0)  # the same "pretrained" backbone every time
    return timm.create_model("resnet18", pretrained=False, num_classes=CLASSES)


def _bns(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}


def _frozen_bns(model):
    return {n: m for n, m in _bns(model).items() if not any(p.requires_grad for p in m.parameters())}


def _stats(mods):
    return {n: (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for n, m in mods.items()}


def _same_stats(a, b):
    return a.keys() == b.keys() and all(all(torch.equal(x, y) for x, y in zip(a[k], b[k])) for k in a)


def _train(model, steps=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for _ in range(steps):
        x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, CLASSES, (8,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _eval(model, x, y):
    model.eval()
    with torch.no_grad():
        logits = model(x)
    return logits, (logits.argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("method,opts", CASES, ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v.values())))
def test_reloaded_model_equals_the_trained_one_and_frozen_stats_stay(tmp_path, method, opts):
    model = rf.inject(_resnet(), method, **opts)
    frozen = _frozen_bns(model)
    tuned = {n: m for n, m in _bns(model).items() if n not in frozen}
    assert bool(frozen) == (method == "linear" or bool(opts)) and bool(tuned) == (method != "linear")
    before, before_tuned = _stats(frozen), _stats(tuned)

    _train(model)
    assert all(not m.training for m in frozen.values()) and all(m.training for m in tuned.values())
    assert _same_stats(before, _stats(frozen)), "a frozen BatchNorm's running statistics moved in training"
    if tuned:  # a tuned BatchNorm trains as usual: its statistics are part of what the file must hold
        assert not _same_stats(before_tuned, _stats(tuned))

    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, CLASSES, (16,), generator=g)
    logits, acc = _eval(model, x, y)
    path = tmp_path / f"{method}.safetensors"
    rf.save_adapters(model, path)
    reloaded = rf.load_adapters(_resnet(), path)
    logits2, acc2 = _eval(reloaded, x, y)
    assert acc2 == acc and torch.equal(logits2, logits)

    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    if method == "full":  # the whole state dict, buffers included (122 entries for resnet18)
        assert keys == set(model.state_dict()) and len(keys) == 122
    for n in tuned:
        assert {f"{n}.running_mean", f"{n}.running_var", f"{n}.num_batches_tracked"} <= keys
    for n in frozen:
        assert f"{n}.running_mean" not in keys


def test_frozen_batchnorm_stays_frozen_through_wrappers_copies_and_state_dicts():
    model = rf.inject(_resnet(), "linear")
    before = _stats(_bns(model))
    x = torch.randn(4, 3, 32, 32)

    wrapper = torch.nn.Sequential(model)  # train() reaches the BatchNorms from any parent (DDP's .module alike)
    wrapper.train()
    assert model.training and not any(m.training for m in _bns(model).values())
    wrapper(x)

    twin = copy.deepcopy(model)
    twin.load_state_dict(model.state_dict())  # keys unchanged, class swap kept
    twin.train()
    twin(x)
    assert _same_stats(before, _stats(_bns(model))) and _same_stats(before, _stats(_bns(twin)))

    # unfrozen by hand after inject: trains from the next model.train() on, and is saved with its statistics
    bn = model.bn1
    bn.requires_grad_(True)
    model.train()
    assert bn.training
    model(x)
    assert not torch.equal(bn.running_mean, before["bn1"][0])
    assert {"bn1.weight", "bn1.running_mean", "bn1.num_batches_tracked"} <= set(trainable_state_dict(model))


def test_frozen_batchnorm_stays_frozen_under_ddp(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = rf.inject(_resnet(), "layernorm", target=r"layer4.*")  # BatchNorms of layer4 tuned, the rest frozen
        frozen, tuned = _frozen_bns(model), {n for n in _bns(model) if n not in _frozen_bns(model)}
        assert frozen and tuned and all(n.startswith("layer4") for n in tuned)
        before = _stats(frozen)
        ddp = DDP(model)
        _train(ddp, steps=2)
        assert _same_stats(before, _stats(frozen))
        sd = trainable_state_dict(ddp)  # the wrapper's names
        assert "module.layer4.0.bn1.running_var" in sd and "module.bn1.running_var" not in sd
    finally:
        dist.destroy_process_group()


def test_trainable_state_dict_is_what_training_changes():
    model = rf.inject(_resnet(), "bitfit")
    sd = trainable_state_dict(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} <= set(sd)
    assert "bn1.running_mean" in sd and "conv1.weight" not in sd
    with torch.no_grad():  # the same storage: copying into it restores a checkpoint
        sd["bn1.running_mean"].fill_(3.0)
        sd["bn1.bias"].fill_(2.0)
    assert torch.all(model.bn1.running_mean == 3.0) and torch.all(model.bn1.bias == 2.0)
    full = rf.inject(_resnet(), "full")
    assert set(trainable_state_dict(full)) == set(full.state_dict())
