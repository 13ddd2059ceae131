"""Build torch-mla: pure Python everywhere, plus the Hopper CUDA extension where it can be built.

The extension ``torch_mla._C`` is built when torch has CUDA, nvcc is found, csrc/ holds sources
and the CUTLASS/CuTe headers are found (``CUTLASS_INCLUDE`` or the ``nvidia-cutlass`` wheel).
Otherwise the package installs without it and every op runs through the reference.
Set ``TORCH_MLA_NO_CUDA=1`` to skip the extension; ``TORCH_MLA_TIMELINE=1`` builds the decode
kernel with its per-page event clocks (for tools/timeline.py; slower, never for use).
"""

import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cutlass_include():
    if os.environ.get("CUTLASS_INCLUDE"):
        return os.environ["CUTLASS_INCLUDE"]
    try:
        import cutlass_library
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")
    return path if os.path.isdir(path) else None


def _extensions():
    if os.environ.get("TORCH_MLA_NO_CUDA", "0") not in ("", "0"):
        return [], {}
    sources = sorted(glob.glob("csrc/**/*.cu", recursive=True) + glob.glob("csrc/**/*.cpp", recursive=True))
    if not sources:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    cutlass = _cutlass_include()
    if torch.version.cuda is None or CUDA_HOME is None or shutil.which("nvcc", path=os.path.join(CUDA_HOME, "bin")) is None:
        print("torch-mla: no CUDA toolchain; installing without the CUDA extension")
        return [], {}
    if cutlass is None:
        print("torch-mla: CUTLASS headers not found (pip install nvidia-cutlass==4.2.0.0 or set CUTLASS_INCLUDE); "
              "installing without the CUDA extension")
        return [], {}
    includes = [os.path.join(ROOT, "csrc"), cutlass, os.path.join(CUDA_HOME, "include", "cccl")]
    # A measuring build for tools/timeline.py: the decode kernel records per-page event clocks.
    timeline = ["-DMLA_TIMELINE"] if os.environ.get("TORCH_MLA_TIMELINE", "0") not in ("", "0") else []
    ext = CUDAExtension(
        name="torch_mla._C",
        sources=sources,
        include_dirs=includes,
        extra_compile_args={
            "cxx": ["-O3"],  # the C++ standard is left to torch (C++17 up to 2.12, C++20 after)
            "nvcc": [
                "-O3", "-std=c++17",
                "-gencode=arch=compute_90a,code=sm_90a",
                "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math",
                "-DNDEBUG", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                "-lineinfo",
            ] + timeline,
        },
        py_limited_api=False,
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["torch_mla", "torch_mla.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
