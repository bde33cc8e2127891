"""Build for rspeft_fast.

The native extension ``rspeft_fast._C`` is built with ``torch.utils.cpp_extension``:

* C++ sources (``csrc/**/*.cpp``) always;
* CUDA sources (``csrc/**/*.cu``) too when the installed torch was built with CUDA and ``nvcc`` is
  found (``CUDA_HOME`` or ``/usr/local/cuda``), for ``TORCH_CUDA_ARCH_LIST`` (default ``"9.0"``).

Environment variables:

* ``RSPEFT_FAST_CPU_ONLY=1``   force the C++-only build even where CUDA is available;
* ``RSPEFT_FAST_FORCE_CUDA=1`` build the CUDA sources even if torch reports no CUDA runtime;
* ``TORCH_CUDA_ARCH_LIST``     CUDA architectures (default ``9.0``: H100/H200);
* ``MAX_JOBS``                 parallel compile jobs for ninja.

The extension is compiled against torch's C++ API, which is not stable from one torch release to the next, so
it must run with the torch it was built with. The supported install builds against the torch already installed:

    pip install torch==2.14.1 torchvision           # (or the torch you run with)
    pip install --no-build-isolation .              # or -e . for development

and the built package then requires exactly that torch version (``install_requires`` names ``torch==<the build
torch>``), so a later ``pip install`` can neither replace torch under it nor install the wheel beside another
torch. A build-isolated install (plain ``pip install .``) compiles against whatever torch pip puts in the
isolated build environment (the newest) and pins that one: pip then replaces the installed torch with it. The
native library is stripped (``-s``) on Linux.

Dependencies: the core (adapters, ``inject``, ``load_adapters``, ``python -m rspeft_fast train``) needs torch,
timm, torchvision, Pillow, numpy, safetensors and tqdm; the extras ``[open_clip]`` (alias ``[clip]``: open_clip
CLIP models, the retrieval job) and ``[transformers]`` (alias ``[hf]``: Hugging Face backbones) stay optional, and
their imports fail with one line naming the extra.

The Triton kernels live in the top-level ``kernels/`` folder and are installed as
``rspeft_fast.kernels`` (never as a top-level ``kernels`` module).
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _cuda_library_dirs(cuda_home: str) -> list[str]:
    """A link directory holding ``libcudart.so``, added when torch's own choice would not find it.

    torch.utils.cpp_extension links ``-lcudart`` from ``CUDA_HOME/lib64`` (``lib`` only when ``lib64`` is
    missing); toolkits unpacked from the ``nvidia-*`` wheels keep an empty ``lib64`` and the library in
    ``lib``, and where ``CUDA_HOME`` is not set torch guesses it from ``which nvcc`` (``/usr/local`` for a
    ``/usr/local/bin/nvcc`` wrapper). Either way the link fails with ``cannot find -lcudart``.
    """
    homes = [cuda_home, os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "", "/usr/local/cuda"]
    for home in homes:
        for sub in ("lib64", "lib"):
            d = os.path.join(home, sub) if home else ""
            if d and os.path.exists(os.path.join(d, "libcudart.so")):
                return [d]
    return []


def _torch_requirement() -> str:
    """``torch==<the torch this build compiles against>`` (public version: 2.14.1+cu130 → 2.14.1)."""
    import torch

    return "torch==" + torch.__version__.split("+")[0]


def _extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    cpp = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cu = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    with_cuda = (
        not _truthy("RSPEFT_FAST_CPU_ONLY")
        and bool(cu)
        and CUDA_HOME is not None
        and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
        and (torch.version.cuda is not None or _truthy("RSPEFT_FAST_FORCE_CUDA"))
    )
    cxx_flags = ["-O3"]  # the C++ standard is the one torch.utils.cpp_extension picks for the installed torch
    link_flags = ["-s"] if sys.platform.startswith("linux") else []  # strip the symbols (a third of the size)
    include_dirs = [os.path.join(ROOT, "csrc")]
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        return [
            CUDAExtension(
                "rspeft_fast._C",
                cpp + cu,
                include_dirs=include_dirs,
                library_dirs=_cuda_library_dirs(CUDA_HOME),
                define_macros=[("RSPEFT_WITH_CUDA", "1")],
                extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math"]},
                extra_link_args=link_flags,
            )
        ]
    return [
        CppExtension(
            "rspeft_fast._C",
            cpp,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    ]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(
    name="rspeft_fast",
    version="0.1.0",
    description="Fused Triton/CUDA parameter-efficient fine-tuning adapters for remote-sensing foundation models",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license_expression="Apache-2.0",  # SPDX (metadata 2.4; setuptools >= 77)
    license_files=["LICENSE"],
    python_requires=">=3.11",  # CI runs 3.11, the GPU machine 3.12
    packages=find_packages(include=["rspeft_fast", "rspeft_fast.*"]) + ["rspeft_fast.kernels"],
    package_dir={"rspeft_fast.kernels": "kernels"},
    package_data={"rspeft_fast": ["py.typed"]},
    ext_modules=_extensions(),
    cmdclass=_cmdclass(),
    # torch: exactly the one the extension is compiled against (see the docstring); the sources support torch 2.11
    # with its Triton 3.6 and later (the GPU machine this project borrows: torch 2.11 / Triton 3.6 / Python 3.12;
    # CI: torch 2.14 / Triton 3.8 / Python 3.11; the Triton kernels are AOT-compiled under Triton 3.6, 3.8 and 3.9
    # for every arch: tests/test_aot.py, benchmarks/results/aot-2026-12-01/). Triton comes with torch on Linux; it
    # is named so that an older one is never kept. Older torch/Triton releases are not checked and not claimed.
    # timm (integration/_blocks.py, the train job), torchvision and Pillow (image data) are imported by the core.
    install_requires=[
        _torch_requirement(),
        "triton>=3.6; platform_system == 'Linux'",
        "timm>=1.0",
        "torchvision",
        "Pillow",
        "numpy",
        "safetensors>=0.4",
        "tqdm",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "timm": ["timm>=1.0"],  # in the core now (install_requires); kept so that rspeft_fast[timm] still resolves
        "open_clip": ["open-clip-torch>=2.24"],
        "clip": ["open-clip-torch>=2.24"],  # alias of [open_clip]
        "transformers": ["transformers>=5.0"],  # HF backbones: CLIPModel, ViT, Dinov2, DINOv3ViT, Swin, ConvNext
        "hf": ["transformers>=5.0"],  # alias of [transformers]
        "dense": ["segmentation-models-pytorch>=0.6"],  # segment / change: smp's UPerNet decoder, head and losses
        "test": ["pytest", "pytest-benchmark", "hypothesis", "open-clip-torch>=2.24"],
        "bench": ["pytest-benchmark", "matplotlib"],
    },
    zip_safe=False,
)
