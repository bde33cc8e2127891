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

Install with ``pip install --no-build-isolation -e .`` after torch is installed.
The Triton kernels live in the top-level ``kernels/`` folder and are installed as
``rspeft_fast.kernels`` (never as a top-level ``kernels`` module).
"""
import glob
import os

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
            )
        ]
    return [
        CppExtension(
            "rspeft_fast._C",
            cpp,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
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
    python_requires=">=3.11",  # CI runs 3.11, the GPU machine 3.12
    packages=find_packages(include=["rspeft_fast", "rspeft_fast.*"]) + ["rspeft_fast.kernels"],
    package_dir={"rspeft_fast.kernels": "kernels"},
    ext_modules=_extensions(),
    cmdclass=_cmdclass(),
    # The oldest versions supported: torch 2.11 with its Triton 3.6 (the GPU machine this project borrows:
    # torch 2.11 / Triton 3.6 / Python 3.12). Checked: CI runs torch 2.14 / Triton 3.8 / Python 3.11 (numerics
    # through the interpreter); the Triton kernels are AOT-compiled under Triton 3.6, 3.8 and 3.9 for every arch
    # (tests/test_aot.py, benchmarks/results/aot-2026-12-01/). Triton comes with torch on Linux; it is named so
    # that an older one is never kept. Older torch/Triton releases are not checked and not claimed.
    install_requires=[
        "torch>=2.11",
        "triton>=3.6; platform_system == 'Linux'",
        "numpy",
        "safetensors>=0.4",
        "tqdm",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "timm": ["timm>=1.0"],
        "clip": ["open-clip-torch>=2.24"],
        "hf": ["transformers>=5.0"],  # HF backbones: CLIPModel, ViT, Dinov2, DINOv3ViT, Swin, ConvNext (integration/families.py)
        "test": ["pytest", "pytest-benchmark", "hypothesis", "timm>=1.0", "open-clip-torch>=2.24"],
        "bench": ["pytest-benchmark", "matplotlib"],
    },
    zip_safe=False,
)
