"""Option values validated and coerced once (``integration.config.coerce_options``): API, configs and CLI alike."""
import pytest
import torch

from rspeft_fast.integration import MuFAConfig, OptionError, coerce_options, config_for


@pytest.mark.parametrize("value,want", [(16, (16,)), ("16", (16,)), ("32", (32,)), ("8,16,32", (8, 16, 32)),
                                        ([8, 16], (8, 16)), ((8, 16), (8, 16)), ("(8, 16)", (8, 16)),
                                        ("[8,16]", (8, 16))])
def test_rates_mean_what_they_say(value, want):
    assert coerce_options("mufa", {"rates": value}) == {"rates": want}
    assert config_for("adaptformer", rates=value).rates == want
    assert MuFAConfig(rates=value).rates == want


@pytest.mark.parametrize("method,opts,want", [
    ("lora", {"rank": "16", "alpha": "4"}, {"rank": 16, "alpha": 4.0}),
    ("vpt", {"deep": "true", "num_tokens": 5.0}, {"deep": True, "num_tokens": 5}),
    ("vpt", {"deep": "0"}, {"deep": False}),
    ("mufa", {"num_classes": "none", "scale": "0.5"}, {"num_classes": None, "scale": 0.5}),
    ("eqam", {"hidden": "8", "bits": "4"}, {"hidden": 8, "bits": 4}),
    ("mga", {"hidden": 64, "heads": "4", "towers": "text"}, {"hidden": 64, "heads": 4, "towers": "text"}),
])
def test_values_coerced(method, opts, want):
    assert coerce_options(method, opts) == want


@pytest.mark.parametrize("method,opts,named", [
    ("mufa", {"rates": "abc"}, "rates"),
    ("mufa", {"rates": "8,x"}, "rates"),
    ("mufa", {"rates": True}, "rates"),
    ("mufa", {"rates": 0}, "rates"),
    ("mufa", {"scale": "big"}, "scale"),
    ("mufa", {"placement": 3}, "placement"),
    ("mufa", {"placement": "sideways"}, "placement"),
    ("lora", {"rank": "1.5"}, "rank"),
    ("vpt", {"deep": "maybe"}, "deep"),
    ("eqam", {"bits": 9}, "bits"),
    ("mufa", {"no_such_option": 1}, "no_such_option"),
    ("mufa", {"target": 123}, "target"),
    ("lora", {"target": 1.5}, "target"),
    ("mga", {"heads": 0}, "heads"),
])
def test_nonsense_raises_one_line_naming_the_option(method, opts, named):
    with pytest.raises(OptionError) as ei:
        coerce_options(method, opts)
    msg = str(ei.value)
    assert named in msg and "\n" not in msg, msg
    assert isinstance(ei.value, ValueError) and isinstance(ei.value, TypeError)


def test_inject_coerces_the_same_way():
    timm = pytest.importorskip("timm")
    import rspeft_fast as rf

    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, depth=2, img_size=32)
    rf.inject(m, "mufa", rates="32")  # used to build rates=(3, 2)
    assert m.rspeft_config.rates == (32,)
    adapters = [a for a in m.modules() if isinstance(a, rf.MuFAAdapter)]
    assert adapters and all(a.rates == (32,) and a.sizes == (192 // 32,) for a in adapters)
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    with pytest.raises(OptionError, match="rates"):
        rf.inject(timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32), "mufa", rates="x")


def test_inject_refuses_a_target_that_is_no_pattern_with_option_error():
    timm = pytest.importorskip("timm")
    import rspeft_fast as rf

    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32)
    with pytest.raises(OptionError, match="target=123"):  # was re's own TypeError
        rf.inject(m, "mufa", target=123)


def _mga_share(name, **kw):
    import timm

    import rspeft_fast as rf

    with torch.device("meta"):
        m = timm.create_model(name, pretrained=False, num_classes=0, **kw)
    rf.inject(m, "mga", train_head=False, **{k: v for k, v in kw.items() if k in ("hidden", "heads")})
    return m.rspeft_config, rf.trainable_parameters(m).percent


@pytest.mark.parametrize("name,width,hidden,heads", [("vit_tiny_patch16_224", 192, 32, 2), ("vit_small_patch16_224", 384, 64, 4),
                                                     ("vit_base_patch16_224", 768, 128, 8), ("vit_large_patch16_224", 1024, 128, 8)])
def test_mga_sizes_follow_the_model_width(name, width, hidden, heads):
    """MGAConfig's rule: hidden = width / 6 in multiples of 16 (16..128), heads = hidden / 16; HarMA's 128 / 8 on
    ViT-B; every ViT tunes a few percent (the fixed 128 / 8 tuned 25 % of ViT-Ti)."""
    pytest.importorskip("timm")
    cfg, percent = _mga_share(name)
    assert (cfg.hidden, cfg.heads) == (hidden, heads)  # the sizes chosen are stored (and so saved)
    assert 2.0 < percent < 4.5, percent


def test_mga_given_sizes_are_kept():
    pytest.importorskip("timm")
    from rspeft_fast.integration.methods.mga import default_sizes

    assert default_sizes(192, hidden=64) == (64, 4) and default_sizes(192, hidden=40) == (40, 1)
    assert default_sizes(192, heads=4) == (32, 4) and default_sizes(64) == (16, 1)
