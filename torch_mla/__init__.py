"""torch-mla: Multi-head Latent Attention (MLA) decoding as PyTorch custom ops.

``import torch_mla`` defines ``torch.ops.mla.decode``, ``torch.ops.mla.get_metadata`` and
``torch.ops.mla.write_cache`` with their fake impls and CPU (reference) impls (and
``quantize_fp8`` / ``dequantize_fp8``, the FP8 cache's two conversions), then loads the
compiled CUDA extension ``torch_mla._C`` when it was built. Without it, CUDA tensors run through
the same pure-PyTorch reference (correct, about 100x slower): the first such call warns, and
with ``TORCH_MLA_REQUIRE_CUDA_KERNEL=1`` every such call raises instead.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings

from . import flash_mla, ops, reference
from .flash_mla import flash_mla_with_kvcache
from .flash_mla import get_mla_metadata_tensors as get_mla_metadata
from .ops import decode, dequantize_fp8, get_metadata, quantize_fp8, quantize_rows_fp8, write_cache

__version__ = "0.1.0"

# Written by setup.py into the installed package when the build left the extension out.
_SKIP_FILE = os.path.join(os.path.dirname(__file__), "_cuda_build_skipped.txt")
_BUILD_HINT = ("to build it: on a machine with the CUDA toolkit (nvcc) and a CUDA build of torch, "
               "`pip install nvidia-cutlass==4.2.0.0 ninja`, then reinstall torch-mla from source with "
               "`pip install --no-build-isolation .` (or `-e .`)")


def _load_extension() -> str | None:
    try:
        importlib.import_module(f"{__name__}._C")  # registers TORCH_LIBRARY_IMPL(mla, CUDA, ...)
    except ImportError as e:  # CPU-only install, the build skipped it, or it does not load
        if isinstance(e, ModuleNotFoundError) and e.name == f"{__name__}._C" and os.path.exists(_SKIP_FILE):
            with open(_SKIP_FILE) as f:
                return f"the build skipped it: {f.read().strip()}"
        return f"importing torch_mla._C failed: {e}"
    return None


_CUDA_KERNEL_ERROR = _load_extension()
_warned = False


def has_cuda_kernel() -> bool:
    """True when the compiled Hopper kernel serves CUDA tensors (else the reference does)."""
    return _CUDA_KERNEL_ERROR is None


def cuda_kernel_error() -> str | None:
    """Why the compiled CUDA kernel is absent (the import error, or why the build skipped it);
    None when it is loaded."""
    return _CUDA_KERNEL_ERROR


def _kernel_missing() -> None:
    """Run by every CUDA call served by the reference: warn once, or raise when required."""
    global _warned
    msg = (f"torch-mla: the CUDA kernel is not loaded ({_CUDA_KERNEL_ERROR}), so CUDA tensors run through "
           f"the pure-PyTorch reference, about 100x slower; {_BUILD_HINT}")
    if os.environ.get("TORCH_MLA_REQUIRE_CUDA_KERNEL", "0") not in ("", "0"):
        raise RuntimeError(msg + " (TORCH_MLA_REQUIRE_CUDA_KERNEL is set, so this is an error)")
    if not _warned:
        _warned = True
        warnings.warn(msg + "; TORCH_MLA_REQUIRE_CUDA_KERNEL=1 makes this an error", RuntimeWarning, stacklevel=3)


def _cuda_fallback(impl):
    @functools.wraps(impl)
    def run(*args, **kwargs):
        _kernel_missing()
        return impl(*args, **kwargs)
    return run


# The CUDA-key impls when the extension is absent: the CPU impls of ops.py, behind the warning.
_CUDA_FALLBACKS = {
    "decode": _cuda_fallback(ops._decode_impl),
    "get_metadata": _cuda_fallback(ops._get_metadata_impl),
    "write_cache": _cuda_fallback(ops._write_cache_impl),
}
if _CUDA_KERNEL_ERROR is not None:
    for _name, _impl in _CUDA_FALLBACKS.items():
        ops.lib.impl(_name, _impl, "CUDA")


__all__ = [
    "decode",
    "get_metadata",
    "write_cache",
    "quantize_fp8",
    "quantize_rows_fp8",
    "dequantize_fp8",
    "flash_mla",
    "flash_mla_with_kvcache",
    "get_mla_metadata",
    "has_cuda_kernel",
    "cuda_kernel_error",
    "ops",
    "reference",
]
