"""Package metadata (setup.py read without building): what the core imports is required, the optional
integrations are extras under their own names, the license, py.typed, a stripped native library, the torch pin."""
from __future__ import annotations

import os
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def dist():
    from setuptools import distutils  # noqa: F401  (setuptools' bundled distutils)
    from distutils.core import run_setup

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        return run_setup(os.path.join(ROOT, "setup.py"), stop_after="init")
    finally:
        os.chdir(cwd)


def _names(reqs):
    import re

    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower(): r for r in reqs}


def test_core_requirements_cover_what_the_core_imports(dist):
    import torch

    req = _names(dist.install_requires)
    # timm: integration/_blocks.py (inject, load_adapters) and the train job; torchvision, Pillow: image data
    for name in ("torch", "timm", "torchvision", "pillow", "numpy", "safetensors", "tqdm"):
        assert name in req, name
    assert req["torch"] == "torch==" + torch.__version__.split("+")[0]  # the torch the extension is compiled against
    assert "open-clip-torch" not in req and "transformers" not in req


def test_optional_integrations_are_extras_with_aliases(dist):
    ex = dist.extras_require
    assert ex["open_clip"] == ex["clip"] and _names(ex["open_clip"]).keys() == {"open-clip-torch"}
    assert ex["transformers"] == ex["hf"] and _names(ex["transformers"]).keys() == {"transformers"}


def test_license_py_typed_and_stripped_library(dist):
    assert dist.metadata.license_expression == "Apache-2.0"
    assert "LICENSE" in dist.metadata.license_files
    with open(os.path.join(ROOT, "LICENSE")) as f:
        text = f.read()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert dist.package_data["rspeft_fast"] == ["py.typed"] and os.path.isfile(os.path.join(ROOT, "rspeft_fast", "py.typed"))
    (ext,) = dist.ext_modules
    assert ext.name == "rspeft_fast._C"
    if sys.platform.startswith("linux"):
        assert "-s" in ext.extra_link_args


def test_build_requirements():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        build = tomllib.load(f)["build-system"]["requires"]
    assert "setuptools>=77" in build
