"""FLOPs and bytes of the dense jobs' training step at SPEC §2's shapes (NOTES.md, "Dense jobs"), on CPU, no GPU.

    PYTHONPATH=. python benchmarks/dense_cost.py            # segment 8 x 512², change 8 pairs x 256²

The step's model (ConvNeXt-B + ``eqam+capm`` or frozen, :class:`~rspeft_fast.dense.model.Segmentor` /
:class:`~rspeft_fast.dense.model.ChangeDetector`, UperNet 256) runs on fake tensors (``FakeTensorMode``: shapes only,
no arithmetic) under ``FlopCounterMode``: forward FLOPs per module, backward FLOPs in total. Bytes: the inputs and
outputs of every leaf module in bf16 (an unfused eager forward's activation traffic); the adapters' elements
``Σ_blocks tokens · d`` analytically (their fused kernels read ``x`` and write the output once forward).
"""
from __future__ import annotations

import json
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode


def _leaf_bytes(model, prefix_groups):
    acc = {g: 0 for g in prefix_groups}
    hooks = []

    def hook_for(name):
        group = next((g for g, p in prefix_groups.items() if name.startswith(p)), None)

        def h(m, i, o):
            if group is not None:
                outs = (o,) if torch.is_tensor(o) else tuple(o)
                acc[group] += 2 * sum(t.numel() for t in (*i, *outs) if torch.is_tensor(t))
        return h

    for n, m in model.named_modules():
        if not list(m.children()):
            hooks.append(m.register_forward_hook(hook_for(n)))
    return acc, hooks


def step_cost(kind: str, batch: int, img: int, adapters: bool) -> dict:
    import timm
    from torch._subclasses.fake_tensor import FakeTensorMode

    import rspeft_fast
    from rspeft_fast.dense.model import ChangeDetector, MultiScaleEncoder, Segmentor, level_prompts

    bb = timm.create_model("convnext_base", pretrained=False, num_classes=0)
    if adapters:
        rspeft_fast.inject(bb, "eqam+capm", impl="reference")
    else:
        bb.requires_grad_(False)
    change = kind == "change"
    model = ChangeDetector(MultiScaleEncoder(bb, level_prompts(bb, None)), 256) if change else \
        Segmentor(MultiScaleEncoder(bb, level_prompts(bb, None)), 6, 256)
    enc_images = batch * (2 if change else 1)
    # adapter elements: every block's tokens x channels (ConvNeXt-B: depths 3/3/27/3, dims 128..1024, strides 4..32)
    elems = sum(dep * enc_images * (img // s) ** 2 * d for dep, d, s in zip((3, 3, 27, 3), (128, 256, 512, 1024), (4, 8, 16, 32)))
    capm = sum(enc_images * (img // s) ** 2 * d for d, s in zip((128, 256, 512, 1024), (4, 8, 16, 32)))
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        xs = [torch.randn(batch, 3, img, img, requires_grad=not adapters) for _ in range(2 if change else 1)]
        target = torch.randint(0, 2 if change else 6, (batch, img, img))
    acc, hooks = _leaf_bytes(model, {"backbone": "encoder.backbone", "decoder": "decode_head"})
    fwd, bwd = FlopCounterMode(display=False), FlopCounterMode(display=False)
    with mode, fwd:
        loss = torch.nn.functional.cross_entropy(model(*xs), target)
    for h in hooks:
        h.remove()
    with mode, bwd:
        loss.backward()
    per_module = {k: sum(v.values()) for k, v in fwd.get_flop_counts().items()}
    dec = per_module.get(f"{type(model).__name__}.decode_head", 0)
    return {"kind": kind, "batch": batch, "img": img, "adapters": adapters, "flops_fwd": fwd.get_total_flops(),
            "flops_bwd": bwd.get_total_flops(), "decoder_flops_fwd": dec, "backbone_flops_fwd": fwd.get_total_flops() - dec,
            "bytes_fwd_bf16": acc, "adapter_elements": elems, "capm_elements": capm}


def main(argv=None) -> int:
    out = [step_cost(k, b, i, a) for k, b, i in (("segment", 8, 512), ("change", 8, 256)) for a in (True, False)]
    json.dump(out, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
