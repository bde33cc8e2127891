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
