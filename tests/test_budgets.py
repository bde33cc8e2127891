"""Tuned-parameter budgets of the papers' defaults (SPEC §1): EQAM + CAPM on ConvNeXt-B is UPetu's 0.73 %."""
import pytest
import torch

timm = pytest.importorskip("timm")

import rspeft_fast as rf  # noqa: E402
from rspeft_fast.integration import OptionError, config_for  # noqa: E402


def test_eqam_capm_default_is_upetu_budget_on_convnext_base():
    """UPetu reports 0.73 % of ConvNeXt-B's parameters tuned for EQAM + CAPM: the default (16-channel EQAM
    bottleneck in every block, 8 prompts per stage, 55-class head, SPEC §1) reproduces it within 0.05."""
    torch.manual_seed(0)
    m = timm.create_model("convnext_base", pretrained=False, num_classes=55)
    rf.inject(m, "eqam+capm")
    tp = rf.trainable_parameters(m)
    assert abs(tp.percent - 0.73) < 0.05, tp
    widths = {mod.hidden for mod in m.modules() if isinstance(mod, rf.EQAM)}
    assert widths == {16}, widths
    assert sum(isinstance(mod, rf.EQAM) for mod in m.modules()) == 36  # every ConvNeXt-B block (3+3+27+3)


def test_eqam_reduction_option_keeps_the_wide_variant():
    """``reduction=4`` (d/4 channels) is available: eight times the budget; EQAM's own rule (hidden or reduction,
    not both) reaches ``inject`` as an OptionError naming the options."""
    cfg = config_for("eqam+capm", reduction=4)
    assert cfg.hidden is None and cfg.reduction == 4
    m = timm.create_model("convnext_atto", pretrained=False, num_classes=10)
    rf.inject(m, cfg)
    dims = {(mod.dim, mod.hidden) for mod in m.modules() if isinstance(mod, rf.EQAM)}
    assert dims and all(h == d // 4 for d, h in dims), dims
    with pytest.raises(OptionError, match="hidden=16, reduction=4.*not both"):
        rf.inject(timm.create_model("convnext_atto", pretrained=False), "eqam", hidden=16, reduction=4)
