"""torch-mla: Multi-head Latent Attention (MLA) decoding as PyTorch custom ops.

``import torch_mla`` defines ``torch.ops.mla.decode``, ``torch.ops.mla.get_metadata`` and
``torch.ops.mla.write_cache`` with their fake impls and CPU (reference) impls, then loads the
compiled CUDA extension ``torch_mla._C`` when it was built. Without it, CUDA tensors run through
the same pure-PyTorch reference (correct, not fast).
"""

from __future__ import annotations

from . import flash_mla, ops, reference
from .flash_mla import flash_mla_with_kvcache
from .flash_mla import get_mla_metadata_tensors as get_mla_metadata
from .ops import decode, get_metadata, write_cache

try:
    from . import _C  # noqa: F401  registers TORCH_LIBRARY_IMPL(mla, CUDA, ...)

    _CUDA_KERNEL_ERROR: str | None = None
    if ops.debug_mode():
        ops.register_debug_checks("AutogradCUDA")
except ImportError as e:  # CPU-only install, or the extension was not built
    _CUDA_KERNEL_ERROR = str(e)
    ops._register_reference("CUDA")


def has_cuda_kernel() -> bool:
    """True when the compiled Hopper kernel serves CUDA tensors (else the reference does)."""
    return _CUDA_KERNEL_ERROR is None


__all__ = [
    "decode",
    "get_metadata",
    "write_cache",
    "flash_mla",
    "flash_mla_with_kvcache",
    "get_mla_metadata",
    "has_cuda_kernel",
    "ops",
    "reference",
]
__version__ = "0.1.0"
