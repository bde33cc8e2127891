"""Dense models over an injected backbone (SPEC §6): multi-scale encoder, CAPM per level, UperNet decoder.

Design. The backbone is the project's injected timm model, kept whole under ``encoder.backbone`` and read
through timm's ``forward_intermediates`` — never rebuilt with ``features_only`` (which renames modules) — so
``inject`` targets, ``save_adapters`` / ``load_adapters`` files and plain timm checkpoints address the same
names as in classification. Everything after the backbone is plain PyTorch plus segmentation_models_pytorch's
``UPerNetDecoder`` and ``SegmentationHead`` (PPM with scales 1, 2, 3, 6 + FPN, BatchNorm), which we take as
they are rather than write a fifth UperNet.

* :class:`MultiScaleEncoder` — 4 levels at strides 4 / 8 / 16 / 32: a hierarchical backbone's last 4
  reductions (ConvNeXt, Swin, ResNet stages); a plain ViT's last block through a ViTDet simple pyramid
  (×4, ×2 transposed convs, identity, ½ max-pool). ``prompts=k`` adds one :class:`~rspeft_fast.modules.CAPM`
  ``(C_l, k)`` per level, applied to the level's map before the decoder. On ConvNeXt ``eqam+capm`` / ``capm``
  already put one CAPM after every stage, i.e. on every level's map: :func:`level_prompts` then adds none.
* :class:`Segmentor` — encoder → UperNet → 1×1 classifier → bilinear upsampling to the input size.
* :class:`ChangeDetector` — one encoder for both dates (one forward over the two batches stacked: shared
  weights and adapters, one gradient), per-level fusion ``|f_A − f_B|`` (default) or concatenation + 1×1
  conv, the same decoder, 2 classes.

Parameter accounting (:func:`parameter_report`): ``adapters`` = the trainable tensors of the encoder (the
injected adapters, stage prompts and level prompts; whatever the method tunes in the backbone), as a share of
the frozen backbone's own parameters (``adapters_pct_of_backbone``: UPetu's 0.73 % on ConvNeXt-B);
``decoder`` = everything trained after the backbone (ViT pyramid, change fusion, UperNet, head), reported apart.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..modules.capm import CAPM

__all__ = ["MultiScaleEncoder", "SimplePyramid", "Segmentor", "ChangeDetector", "level_prompts", "parameter_report",
           "FUSIONS", "DistBatchNorm2d", "sync_batchnorm"]

FUSIONS = ("diff", "concat")


def _has_stage_capm(backbone: nn.Module) -> bool:
    return any(isinstance(m, CAPM) for m in backbone.modules())


def level_prompts(backbone: nn.Module, requested: Optional[int]) -> int:
    """Prompts per level the encoder adds: ``requested`` (0 = none), or for ``None`` ("auto") 8 unless the
    backbone already carries CAPM after its stages (ConvNeXt with ``eqam+capm`` / ``capm``), or is a timm
    ConvNeXt (there the method decides: ``eqam`` alone means no prompts)."""
    if requested is not None:
        return int(requested)
    if _has_stage_capm(backbone) or type(backbone).__name__ == "ConvNeXt":
        return 0
    return 8


class SimplePyramid(nn.Module):
    """ViTDet's simple feature pyramid from one ``(B, C, h, w)`` map: ×4 (two 2×2 transposed convs, C/4
    channels), ×2 (one, C/2), ×1 (identity, C), ½ (2×2 max-pool, C)."""

    def __init__(self, dim: int):
        super().__init__()
        self.up4 = nn.Sequential(nn.ConvTranspose2d(dim, dim // 2, 2, 2), nn.GroupNorm(1, dim // 2), nn.GELU(),
                                 nn.ConvTranspose2d(dim // 2, dim // 4, 2, 2))
        self.up2 = nn.ConvTranspose2d(dim, dim // 2, 2, 2)
        self.down2 = nn.MaxPool2d(2, ceil_mode=True)
        self.channels = (dim // 4, dim // 2, dim, dim)

    def forward(self, f: torch.Tensor) -> list:
        return [self.up4(f), self.up2(f), f, self.down2(f)]


class MultiScaleEncoder(nn.Module):
    """An injected timm backbone → 4 feature maps ``(B, C_l, H/s_l, W/s_l)``, ``s_l`` = 4, 8, 16, 32.

    Hierarchical backbones (``feature_info`` with several reductions) give their last 4 levels of stride ≥ 4;
    plain ones (all one reduction: ViT, DeiT, Eva) give their last block through :class:`SimplePyramid`.
    ``prompts``: CAPM prompts per level (0 = none). ``channels``: the 4 levels' widths."""

    def __init__(self, backbone: nn.Module, prompts: int = 0):
        super().__init__()
        info = getattr(backbone, "feature_info", None)
        if not info or not hasattr(backbone, "forward_intermediates"):
            raise ValueError(f"{type(backbone).__name__}: the dense jobs need a timm backbone with feature_info and "
                             "forward_intermediates (ConvNeXt, Swin, ResNet, ViT, DeiT, Eva)")
        self.backbone = backbone
        reductions = [int(f["reduction"]) for f in info]
        if len(set(reductions)) > 1:
            idx = [i for i, r in enumerate(reductions) if r >= 4][-4:]
            if len(idx) < 4:
                raise ValueError(f"{type(backbone).__name__}: fewer than 4 feature levels of stride >= 4 ({reductions})")
            self.indices, self.pyramid = idx, None
            chs = [int(info[i]["num_chs"]) for i in idx]
        else:  # plain ViT: the last block, one map at the patch stride
            self.indices = [len(info) - 1]
            self.pyramid = SimplePyramid(int(info[-1]["num_chs"]))
            chs = list(self.pyramid.channels)
        self.channels = tuple(chs)
        self.prompts = nn.ModuleList([CAPM(c, int(prompts)) for c in chs]) if prompts else None

    def forward(self, x: torch.Tensor) -> list:
        feats = self.backbone.forward_intermediates(x, indices=self.indices, intermediates_only=True, norm=False)
        feats = list(feats)
        if self.pyramid is not None:
            feats = self.pyramid(feats[-1])
        if self.prompts is not None:
            feats = [p(f) for p, f in zip(self.prompts, feats)]
        return feats


def require_smp():
    """segmentation_models_pytorch (the decoders' library, the extra ``[dense]``), or one line saying how to get it."""
    try:
        import segmentation_models_pytorch as smp
    except ImportError as e:
        raise ImportError("the dense jobs' decoder needs segmentation-models-pytorch, an optional dependency: "
                          "pip install 'rspeft_fast[dense]'") from e
    return smp


class _UperHead(nn.Module):
    """smp's ``UPerNetDecoder`` (PPM + FPN at ``channels``) and a 1×1 ``SegmentationHead``, upsampled to ``size``."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 256, feature_norms: bool = True):
        super().__init__()
        require_smp()
        from segmentation_models_pytorch.base.heads import SegmentationHead
        from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder

        # smp's decoder takes [1, 1/2, 1/4, 1/8, 1/16, 1/32] and skips the first two
        self.decoder = UPerNetDecoder((0, 0) + tuple(in_channels), encoder_depth=5, decoder_channels=int(channels))
        self.head = SegmentationHead(int(channels), int(num_classes), kernel_size=1)
        if not feature_norms:  # smp normalises each level per pixel over channels: that would erase |fA - fB|'s size
            self.decoder.feature_norms = nn.ModuleList([nn.Identity() for _ in in_channels])

    def forward(self, feats: list, size) -> torch.Tensor:
        y = self.head(self.decoder([None, None] + list(feats)))
        return F.interpolate(y, size=size, mode="bilinear", align_corners=False)


class Segmentor(nn.Module):
    """``x (B, 3, H, W)`` → logits ``(B, num_classes, H, W)``: :class:`MultiScaleEncoder` + UperNet + head."""

    def __init__(self, encoder: MultiScaleEncoder, num_classes: int, decoder_channels: int = 256):
        super().__init__()
        self.encoder = encoder
        self.num_classes = int(num_classes)
        self.decode_head = _UperHead(encoder.channels, num_classes, decoder_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode_head(self.encoder(x), x.shape[-2:])


class ChangeDetector(nn.Module):
    """``(a, b)`` two dates ``(B, 3, H, W)`` → logits ``(B, 2, H, W)`` (0 unchanged, 1 changed).

    Siamese: both dates go through the one encoder in one forward (stacked along the batch). Fusion per
    level: ``"diff"`` ``|f_A − f_B|``; ``"concat"`` ``conv1x1([f_A, f_B])`` back to ``C_l`` channels."""

    def __init__(self, encoder: MultiScaleEncoder, decoder_channels: int = 256, fusion: str = "diff", num_classes: int = 2):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        self.encoder, self.fusion, self.num_classes = encoder, fusion, int(num_classes)
        self.fuse = (nn.ModuleList([nn.Conv2d(2 * c, c, 1) for c in encoder.channels]) if fusion == "concat" else None)
        # no per-pixel LayerNorm of the fused levels: how large the difference is, is the change signal
        self.decode_head = _UperHead(encoder.channels, num_classes, decoder_channels, feature_norms=False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape != b.shape:
            raise ValueError(f"ChangeDetector: the two dates differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
        n = a.shape[0]
        feats = self.encoder(torch.cat([a, b], 0))
        if self.fuse is None:
            fused = [(f[:n] - f[n:]).abs() for f in feats]
        else:
            fused = [conv(torch.cat([f[:n], f[n:]], 1)) for conv, f in zip(self.fuse, feats)]
        return self.decode_head(fused, a.shape[-2:])


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks, with the sum's gradient (every rank's output depends on every rank's input)."""

    @staticmethod
    def forward(ctx, x):
        import torch.distributed as dist

        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, g):
        import torch.distributed as dist

        g = g.contiguous().clone()
        dist.all_reduce(g)
        return g


class DistBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training statistics are those of the global batch under ``torch.distributed`` (any
    backend, gloo on CPU included, where ``nn.SyncBatchNorm`` refuses to run): per-channel sums, sums of squares
    and the pixel count all-reduced with autograd (a sum whose backward is the sum of the gradients), so the
    forward, the gradients and the running statistics equal one process's on the concatenated batch. Outside a
    process group, or in eval mode, it is ``BatchNorm2d``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        c = x.shape[1]
        xf = x.float()
        local = torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), xf.new_full((1,), x.numel() // c)])
        stats = _AllReduceSum.apply(local)
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1).clamp_min(1)), alpha=m)
        y = (xf - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Global-batch BatchNorm for DDP, in place: on CUDA ``nn.SyncBatchNorm`` (its fused kernels), elsewhere
    :class:`DistBatchNorm2d`; parameters and running statistics carried over. Returns ``module``."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            new = DistBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            setattr(module, name, new)
        else:
            sync_batchnorm(child, device)
    return module


def parameter_report(model: nn.Module) -> dict:
    """``{"adapters", "adapters_pct_of_backbone", "backbone", "decoder"}`` of a :class:`Segmentor` /
    :class:`ChangeDetector`: trainable encoder tensors vs the backbone's own (non-adapter) parameters, and
    the trainable parameters after the backbone (pyramid, fusion, UperNet, head)."""
    from ..integration import trainable_parameters

    enc = model.encoder
    tp = trainable_parameters(enc.backbone)
    prompts = sum(p.numel() for p in enc.prompts.parameters() if p.requires_grad) if enc.prompts is not None else 0
    adapters = tp.trainable + prompts
    enc_ids = {id(p) for p in enc.backbone.parameters()} | ({id(p) for p in enc.prompts.parameters()} if enc.prompts is not None else set())
    decoder = sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in enc_ids)
    return {"adapters": int(adapters), "adapters_pct_of_backbone": 100.0 * adapters / max(tp.backbone, 1),
            "backbone": int(tp.backbone), "decoder": int(decoder)}


def create_encoder(model: str, method: str, options: Optional[dict] = None, *, prompts: Optional[int] = None,
                   pretrained: bool = False, checkpoint: Optional[str] = None, img_size: Optional[int] = None,
                   model_args: Optional[dict] = None) -> MultiScaleEncoder:
    """A timm backbone by name (no head; weights from ``pretrained`` / ``checkpoint`` as for classification),
    frozen with ``method`` injected (:func:`rspeft_fast.inject`), wrapped in a :class:`MultiScaleEncoder` with
    :func:`level_prompts` prompts per level. ``img_size`` is the input size of the families that fix it at
    creation (ViT, Swin: the training crop; the sliding window feeds that size). Raises ``ValueError`` with a
    one-line message (:class:`~rspeft_fast.integration.models.ModelBuildError` for the model)."""
    from ..integration import config_for, inject
    from ..integration.models import create_classifier

    backbone = create_classifier(model, num_classes=0, pretrained=pretrained, checkpoint=checkpoint, img_size=img_size,
                                 model_args=model_args)
    inject(backbone, config_for(method, **dict(options or {})))
    return MultiScaleEncoder(backbone, level_prompts(backbone, prompts))
