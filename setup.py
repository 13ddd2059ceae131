"""Build torch-mla: pure Python everywhere, plus the Hopper CUDA extension where it can be built.

The extension ``torch_mla._C`` is built when torch has CUDA, nvcc is found, csrc/ holds sources
and the CUTLASS/CuTe headers are found (``CUTLASS_INCLUDE`` or the ``nvidia-cutlass`` wheel).
Otherwise the package installs without it, every op runs through the reference, and the reason
goes to ``torch_mla/_cuda_build_skipped.txt``, installed with the package so that the first CUDA
call can say why the kernel is missing. Set ``TORCH_MLA_NO_CUDA=1`` to skip the extension;
``TORCH_MLA_TIMELINE=1`` builds the decode kernel with its per-page event clocks (for
tools/lab/timeline.py; slower, never for use).
"""

import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
SKIP_FILE = os.path.join(ROOT, "torch_mla", "_cuda_build_skipped.txt")


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
    """(ext_modules, cmdclass, None), or ([], {}, why the CUDA extension is left out)."""
    if os.environ.get("TORCH_MLA_NO_CUDA", "0") not in ("", "0"):
        return [], {}, "TORCH_MLA_NO_CUDA was set"
    sources = sorted(glob.glob("csrc/**/*.cu", recursive=True) + glob.glob("csrc/**/*.cpp", recursive=True))
    if not sources:
        return [], {}, "csrc/ holds no CUDA sources"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as e:
        return [], {}, f"torch could not be imported ({e}); build with `pip install --no-build-isolation`"
    if torch.version.cuda is None:
        return [], {}, f"torch {torch.__version__} is a CPU-only build"
    if CUDA_HOME is None or shutil.which("nvcc", path=os.path.join(CUDA_HOME, "bin")) is None:
        return [], {}, "no CUDA toolkit was found (nvcc under CUDA_HOME)"
    cutlass = _cutlass_include()
    if cutlass is None:
        return [], {}, "the CUTLASS headers were not found (pip install nvidia-cutlass==4.2.0.0 or set CUTLASS_INCLUDE)"
    includes = [os.path.join(ROOT, "csrc"), cutlass, os.path.join(CUDA_HOME, "include", "cccl")]
    # A measuring build for tools/lab/timeline.py: the decode kernel records per-page event clocks.
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
    return [ext], {"build_ext": BuildExtension}, None


ext_modules, cmdclass, skipped = _extensions()
if skipped:
    print(f"torch-mla: installing without the CUDA extension: {skipped}")
    with open(SKIP_FILE, "w") as f:
        f.write(skipped + "\n")
elif os.path.exists(SKIP_FILE):
    os.remove(SKIP_FILE)

setup(
    packages=find_packages(include=["torch_mla", "torch_mla.*"]),
    package_data={"torch_mla": ["py.typed", os.path.basename(SKIP_FILE)]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
