"""The op contract of torch-mla: schemas, argument rules, fake impls and Python wrappers.

Every fact about the ops' arguments lives here once:

* the schemas of ``torch.ops.mla.decode``, ``torch.ops.mla.get_metadata`` and
  ``torch.ops.mla.write_cache``;
* the argument rules and their error messages (``check_decode_args`` and friends), used by the
  fake (meta) impls under ``torch.compile`` and by the CPU impls. The CUDA impls in ``csrc/``
  test bare predicates of the same rules and, when one fails, call the function here for the
  message, so every path raises the same ValueError; in debug mode they call the value checks
  here too (``check_decode_values``, ``check_write_cache_values``);
* the shapes of every output (the fake impls);
* the documented Python wrappers users call.

Numerics live in ``reference.py``; the kernels live in ``csrc/``.

Every op is inference-only: called with grad mode enabled on an input that requires grad it
raises, instead of returning a result that silently has no gradient.

FP8 (float8_e4m3fn) KV cache. A cache of the same ``[num_blocks, block_size, 1, 576]`` rows in
e4m3 (576 bytes a token instead of 1152) holds ``quantize(x) = e4m3(clamp(x / scale, -448, 448))``
(x converted to float32, divided by the float32 ``scale``, rounded to nearest even; values
beyond e4m3's largest finite +-448, infinities included, saturate to +-448; NaN stays NaN), and
is read as ``dequantize(c) = float32(c) * scale``. Scales are float32 tensors of one element,
shape ``[1]`` (per tensor, as vLLM and SGLang pass ``descale_q`` / ``descale_k`` to their FP8
FlashMLA) or ``[]``, on the device of the data, so that a CUDA graph can replay with them and no
host sync reads them; they must be positive and finite (a value rule, checked where values are).

* ``write_cache`` into an e4m3 cache quantizes ``[kv_c | k_pe]`` (bf16, fp16 or fp32) with its
  ``scale``; a bf16/fp16/fp32 cache takes no scale.
* ``decode`` reads an e4m3 ``kv_cache`` with ``descale_k`` (the same scale). q is e4m3 with
  ``descale_q`` (its own scale; the cache must be e4m3 too), or bf16, fp16 (fp32 on the CPU),
  which the op quantizes row by row (:func:`quantize_rows_fp8`: each 576-dim query row of one
  sequence, position and head gets the scale ``amax / 448``, so the row's largest magnitude is
  e4m3's largest, and no scale is needed from the caller). It computes the attention over the
  dequantized q and cache: ``out`` and ``lse`` are what float64 attention over ``dequantize(q8)``
  and ``dequantize(kv_cache)`` gives, within the bounds of :func:`fp8_error_bounds`:

  - each score ``s_j`` may be off by ``delta = FP8_SCORE_RTOL * M``, where ``M`` is the row's
    score magnitude, ``softmax_scale`` times the largest ``sum_i |q_i| |k_ji|`` over the keys it
    sees (``reference.fp8_error_terms`` computes it). So ``lse`` is within ``FP8_LSE_ATOL +
    delta``, and each probability within a factor ``exp(+-2 delta)``;
  - ``out`` is within ``FP8_OUT_RTOL`` of the row's largest ``|out|`` plus ``expm1(2 delta)``
    times ``sum_j p_j |v_j|``.

  Why: the products of e4m3 values are exact, but FP8 tensor cores add them to their
  accumulator aligned to about 14 bits of its magnitude, so an accumulation chain loses more the
  longer it runs (one chain over all 576 dims put scores of same-signed products off by up to
  1.5%). The CUDA kernel adds S's k-steps of 32 in chains of two, the chains in fp32. A k-step's
  products are aligned to the largest of them and the accumulator, each losing less than 2^-14
  of it, so a chain loses less than ``2 * 32 * 2^-14 = 2^-8`` of its ``sum |q_i k_ji|``, and a
  score less than ``FP8_SCORE_RTOL = 2^-8`` of M. Products of either sign cancel their
  truncations: on random data the kernel's errors are far inside the bound (docs/api.md gives the
  measured figures). ``FP8_OUT_RTOL`` leaves room for a kernel that computes P·V on FP8 tensor
  cores (P as two e4m3 terms, about 2^-8 relative; one term, 2^-4, put ``out`` up to 3.5% off on
  random data); the CUDA kernel computes P·V in fp16 (V widened exactly, P one fp16 term,
  2^-11). The CPU reference computes in float32 and stays within one rounding of ``out`` to its
  dtype. ``out`` is in q's dtype, and bfloat16 for an e4m3 q (as vLLM's FP8 FlashMLA gives);
  ``lse`` is float32.
"""

from __future__ import annotations

import math
import os

import torch

from . import reference

__all__ = [
    "FP8",
    "FP8_MAX",
    "FP8_OUT_RTOL",
    "FP8_LSE_ATOL",
    "FP8_SCORE_RTOL",
    "fp8_error_bounds",
    "HEAD_DIM",
    "HEAD_DIM_V",
    "ROPE_DIM",
    "METADATA_SIZE",
    "PAGE_SIZE",
    "decode",
    "get_metadata",
    "write_cache",
    "quantize_fp8",
    "quantize_rows_fp8",
    "dequantize_fp8",
    "debug_mode",
]

HEAD_DIM = 576  # latent (kv_lora_rank = 512) + decoupled RoPE (64) dims of every q and cache row
HEAD_DIM_V = 512  # V is the first 512 dims of the same cache row
ROPE_DIM = HEAD_DIM - HEAD_DIM_V
METADATA_SIZE = 8  # int32 words per scheduler partition in tile_scheduler_metadata
PAGE_SIZE = 64  # tokens per KV page (block_size) the CUDA kernel takes
TILE_ROWS = 64  # query rows (s_q * h_q) per CUDA thread block: one wgmma M
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
FP8 = torch.float8_e4m3fn  # the FP8 cache (and query) dtype
FP8_MAX = reference.FP8_MAX  # 448: larger magnitudes saturate when quantized
FP8_OUT_RTOL = 2e-2  # decode's bound on out over FP8 inputs, relative to each row's largest |out|
FP8_LSE_ATOL = 1e-2  # decode's bound on lse over FP8 inputs, absolute
FP8_SCORE_RTOL = 2 ** -8  # decode's bound on a score's error over FP8 inputs, relative to the row's M


def fp8_error_bounds(out: torch.Tensor, abs_out: torch.Tensor,
                     score_magnitude: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """decode's error bounds over FP8 inputs (module docstring), from the exact attention's
    ``out`` ``[..., s_q, h_q, dv]``, its ``abs_out`` (the same probabilities times ``|v|``) and the
    rows' score magnitudes ``M`` ``[..., h_q, s_q]``: ``(out_bound, lse_bound)``, absolute, of
    out's and lse's shapes. A score may be off by ``delta = FP8_SCORE_RTOL * M``, lse by as much,
    a probability by a factor of up to ``exp(+-2 delta)``."""
    delta = FP8_SCORE_RTOL * score_magnitude
    row_max = out.abs().amax(dim=-1, keepdim=True)
    out_bound = FP8_OUT_RTOL * row_max + torch.expm1(2 * delta).transpose(-1, -2)[..., None] * abs_out
    return out_bound, FP8_LSE_ATOL + delta


lib = torch.library.Library("mla", "DEF")
lib.define(
    "decode(Tensor q, Tensor kv_cache, Tensor block_table, Tensor cache_seqlens, "
    "int head_dim_v=512, float? softmax_scale=None, bool causal=False, "
    "Tensor? tile_scheduler_metadata=None, Tensor? num_splits=None, Tensor? descale_q=None, "
    "Tensor? descale_k=None) -> (Tensor out, Tensor lse)"
)
lib.define(
    "get_metadata(Tensor cache_seqlens, int num_q_tokens_per_head_k, int num_heads_k) "
    "-> (Tensor tile_scheduler_metadata, Tensor num_splits)"
)
lib.define("write_cache(Tensor kv_c, Tensor k_pe, Tensor(a!) kv_cache, Tensor slot_mapping, Tensor? scale=None) -> ()")


def debug_mode() -> bool:
    """True when ``TORCH_MLA_DEBUG`` is set to a non-empty value other than ``0``.

    In debug mode the values that only the device knows (sequence lengths against the block
    table, block ids in range, slots) are also checked on CUDA, at the cost of a host sync, in
    every grad mode (``torch.inference_mode`` included) but not inside CUDA-graph capture,
    where a sync is illegal. The compiled extension reads this once, when it loads. On the CPU
    the values are always checked: there they cost no sync.
    """
    return os.environ.get("TORCH_MLA_DEBUG", "0") not in ("", "0")


# --------------------------------------------------------------------------------------------
# Argument rules. One function per op; each message names the argument and what was expected.
# --------------------------------------------------------------------------------------------


def _fail(op: str, msg: str) -> None:
    raise ValueError(f"mla.{op}: {msg}")


def _check_no_grad(op: str, **tensors: torch.Tensor | None) -> None:
    if not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        if t is not None and t.requires_grad:
            _fail(
                op,
                f"{name} requires grad, but mla ops are inference-only and have no backward; "
                "call them under torch.no_grad() or torch.inference_mode()",
            )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_rank(op: str, name: str, t: torch.Tensor, rank: int, layout: str) -> None:
    if t.dim() != rank:
        _fail(op, f"{name} must be {rank}-D {layout}, got shape {tuple(t.shape)}")


def _check_dtype(op: str, name: str, t: torch.Tensor, expected: torch.dtype | tuple) -> None:
    allowed = expected if isinstance(expected, tuple) else (expected,)
    if t.dtype not in allowed:
        names = " or ".join(_dtype_name(d) for d in allowed)
        _fail(op, f"{name} must be {names}, got {_dtype_name(t.dtype)}")


def _check_contiguous(op: str, name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        _fail(op, f"{name} must be contiguous, got strides {tuple(t.stride())}")


def _check_unit_last_stride(op: str, name: str, t: torch.Tensor) -> None:
    # Other strides are free (a slice of a larger buffer); a size-1 dim's stride never matters.
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        _fail(op, f"{name} must have unit stride in its last dim, got strides {tuple(t.stride())}")


def _check_devices(op: str, first: str, **tensors: torch.Tensor | None) -> None:
    device = tensors[first].device
    for name, t in tensors.items():
        if t is not None and t.device != device:
            _fail(op, f"{name} is on {t.device} but {first} is on {device}; all tensors must share one device")


def _check_size(op: str, name: str, dim: str, got, expected) -> None:
    if got != expected:
        _fail(op, f"{name} must have {dim} {expected}, got {got}")


def _check_scale(op: str, name: str, scale: torch.Tensor) -> None:
    """A dequantization scale: float32, one element, shape [1] (per tensor) or []."""
    if scale.dim() > 1 or scale.numel() != 1:
        _fail(op, f"{name} must hold one float32 value, shape [1] (per tensor) or [], got shape {tuple(scale.shape)}")
    _check_dtype(op, name, scale, torch.float32)


def _check_scale_pairing(op: str, data: str, t: torch.Tensor, name: str, scale: torch.Tensor | None) -> None:
    """An e4m3 tensor comes with its scale; any other dtype takes none."""
    if t.dtype == FP8 and scale is None:
        _fail(op, f"{data} is float8_e4m3fn, so {name} (its float32 dequantization scale, shape [1]) is required")
    if t.dtype != FP8 and scale is not None:
        _fail(op, f"{name} is given but {data} is {_dtype_name(t.dtype)}: {name} is the scale of a "
                  f"float8_e4m3fn {data} only")
    if scale is not None:
        _check_scale(op, name, scale)


def _check_scale_value(op: str, name: str, scale: torch.Tensor | None) -> None:
    """Reads the scale (a host sync on CUDA)."""
    if scale is None:
        return
    value = float(scale.to("cpu", torch.float32).reshape(()))
    if not (value > 0 and math.isfinite(value)):
        _fail(op, f"{name} must be positive and finite, got {value}")


def check_decode_args(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    softmax_scale: float | None,
    tile_scheduler_metadata: torch.Tensor | None,
    num_splits: torch.Tensor | None,
    descale_q: torch.Tensor | None = None,
    descale_k: torch.Tensor | None = None,
) -> None:
    """Shape, dtype, device and layout rules of ``mla.decode``; no device value is read.

    Layout: q, kv_cache and block_table need a unit stride in their last dim only (q may be a
    slice of a larger projection output, kv_cache one layer of a larger buffer or with padded
    rows, block_table a column slice); cache_seqlens and the metadata must be contiguous.
    """
    op = "decode"
    _check_devices(
        op, "q", q=q, kv_cache=kv_cache, block_table=block_table, cache_seqlens=cache_seqlens,
        tile_scheduler_metadata=tile_scheduler_metadata, num_splits=num_splits, descale_q=descale_q,
        descale_k=descale_k,
    )
    _check_rank(op, "q", q, 4, f"[batch, s_q, h_q, {HEAD_DIM}]")
    _check_rank(op, "kv_cache", kv_cache, 4, f"[num_blocks, block_size, 1, {HEAD_DIM}]")
    _check_rank(op, "block_table", block_table, 2, "[batch, max_blocks_per_seq]")
    _check_rank(op, "cache_seqlens", cache_seqlens, 1, "[batch]")
    _check_dtype(op, "q", q, _DTYPES + (FP8,))
    if q.dtype == FP8 and kv_cache.dtype != FP8:
        _fail(op, f"q is float8_e4m3fn, so kv_cache must be float8_e4m3fn too, got {_dtype_name(kv_cache.dtype)}")
    _check_dtype(op, "kv_cache", kv_cache, (q.dtype, FP8))
    _check_scale_pairing(op, "q", q, "descale_q", descale_q)
    _check_scale_pairing(op, "kv_cache", kv_cache, "descale_k", descale_k)
    _check_dtype(op, "block_table", block_table, torch.int32)
    _check_dtype(op, "cache_seqlens", cache_seqlens, torch.int32)
    _check_size(op, "q", "head dim (size -1)", q.shape[3], HEAD_DIM)
    _check_size(op, "kv_cache", "head dim (size -1)", kv_cache.shape[3], HEAD_DIM)
    _check_size(op, "kv_cache", "num_heads_k (size 2)", kv_cache.shape[2], 1)
    _check_size(op, "head_dim_v", "value", head_dim_v, HEAD_DIM_V)
    if q.shape[1] < 1:
        _fail(op, f"q must have s_q (size 1) >= 1, got {q.shape[1]}")
    if q.shape[2] < 1:
        _fail(op, f"q must have h_q (size 2) >= 1, got {q.shape[2]}")
    if kv_cache.shape[1] < 1:
        _fail(op, f"kv_cache must have block_size (size 1) >= 1, got {kv_cache.shape[1]}")
    batch = q.shape[0]
    _check_size(op, "block_table", "batch (size 0) equal to q's", block_table.shape[0], batch)
    _check_size(op, "cache_seqlens", "batch (size 0) equal to q's", cache_seqlens.shape[0], batch)
    for name, t in (("q", q), ("kv_cache", kv_cache), ("block_table", block_table)):
        _check_unit_last_stride(op, name, t)
    _check_contiguous(op, "cache_seqlens", cache_seqlens)
    if softmax_scale is not None and not (softmax_scale > 0 and math.isfinite(softmax_scale)):
        _fail(op, f"softmax_scale must be a positive finite number, got {softmax_scale}")
    if (tile_scheduler_metadata is None) != (num_splits is None):
        _fail(op, "tile_scheduler_metadata and num_splits must be given together (both from mla.get_metadata) or both omitted")
    if tile_scheduler_metadata is not None:
        _check_rank(op, "tile_scheduler_metadata", tile_scheduler_metadata, 2, f"[num_sm_parts, {METADATA_SIZE}]")
        _check_dtype(op, "tile_scheduler_metadata", tile_scheduler_metadata, torch.int32)
        _check_size(op, "tile_scheduler_metadata", "size -1", tile_scheduler_metadata.shape[1], METADATA_SIZE)
        _check_rank(op, "num_splits", num_splits, 1, "[batch + 1]")
        _check_dtype(op, "num_splits", num_splits, torch.int32)
        _check_size(op, "num_splits", "size 0 (batch + 1)", num_splits.shape[0], batch + 1)
        _check_contiguous(op, "tile_scheduler_metadata", tile_scheduler_metadata)
        _check_contiguous(op, "num_splits", num_splits)
    _check_no_grad(op, q=q, kv_cache=kv_cache, descale_q=descale_q, descale_k=descale_k)


def check_decode_values(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                        cache_seqlens: torch.Tensor, causal: bool, descale_q: torch.Tensor | None = None,
                        descale_k: torch.Tensor | None = None) -> None:
    """Rules on the values of ``cache_seqlens``, ``block_table`` and the scales (reads them: a host
    sync on CUDA)."""
    op = "decode"
    _check_scale_value(op, "descale_q", descale_q)
    _check_scale_value(op, "descale_k", descale_k)
    if q.shape[0] == 0:
        return
    num_blocks, block_size = kv_cache.shape[0], kv_cache.shape[1]
    capacity = block_table.shape[1] * block_size
    seqlens = cache_seqlens.to("cpu", torch.int64)
    if bool((seqlens < 0).any()) or bool((seqlens > capacity).any()):
        _fail(op, f"cache_seqlens must lie in [0, {capacity}] (max_blocks_per_seq * block_size), got {seqlens.tolist()}")
    s_q = q.shape[1]
    if causal and s_q > 1 and bool(((seqlens > 0) & (seqlens < s_q)).any()):
        _fail(op, f"with causal=True every non-empty sequence needs cache_seqlens >= s_q ({s_q}), got {seqlens.tolist()}")
    used = torch.arange(block_table.shape[1]) < ((seqlens + block_size - 1) // block_size)[:, None]
    ids = block_table.to("cpu", torch.int64)[used]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_blocks):
        _fail(op, f"block_table holds block ids outside [0, {num_blocks}) within cache_seqlens")


def check_get_metadata_args(cache_seqlens: torch.Tensor, num_q_tokens_per_head_k: int, num_heads_k: int) -> None:
    op = "get_metadata"
    _check_rank(op, "cache_seqlens", cache_seqlens, 1, "[batch]")
    _check_dtype(op, "cache_seqlens", cache_seqlens, torch.int32)
    _check_contiguous(op, "cache_seqlens", cache_seqlens)
    if num_q_tokens_per_head_k < 1:
        _fail(op, f"num_q_tokens_per_head_k must be >= 1 (s_q * h_q // num_heads_k), got {num_q_tokens_per_head_k}")
    _check_size(op, "num_heads_k", "value", num_heads_k, 1)


def check_write_cache_args(kv_c: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor, scale: torch.Tensor | None = None) -> None:
    op = "write_cache"
    _check_devices(op, "kv_cache", kv_cache=kv_cache, kv_c=kv_c, k_pe=k_pe, slot_mapping=slot_mapping, scale=scale)
    _check_rank(op, "kv_c", kv_c, 2, f"[num_tokens, {HEAD_DIM_V}]")
    _check_rank(op, "k_pe", k_pe, 2, f"[num_tokens, {ROPE_DIM}]")
    _check_rank(op, "kv_cache", kv_cache, 4, f"[num_blocks, block_size, 1, {HEAD_DIM}]")
    _check_rank(op, "slot_mapping", slot_mapping, 1, "[num_tokens]")
    _check_dtype(op, "kv_cache", kv_cache, _DTYPES + (FP8,))
    if kv_cache.dtype == FP8:  # quantized on write, from any float dtype
        _check_dtype(op, "kv_c", kv_c, _DTYPES)
        _check_dtype(op, "k_pe", k_pe, kv_c.dtype)
    else:
        _check_dtype(op, "kv_c", kv_c, kv_cache.dtype)
        _check_dtype(op, "k_pe", k_pe, kv_cache.dtype)
    _check_scale_pairing(op, "kv_cache", kv_cache, "scale", scale)
    _check_dtype(op, "slot_mapping", slot_mapping, (torch.int32, torch.int64))
    _check_size(op, "kv_c", "size -1", kv_c.shape[1], HEAD_DIM_V)
    _check_size(op, "k_pe", "size -1", k_pe.shape[1], ROPE_DIM)
    _check_size(op, "kv_cache", "head dim (size -1)", kv_cache.shape[3], HEAD_DIM)
    _check_size(op, "kv_cache", "num_heads_k (size 2)", kv_cache.shape[2], 1)
    _check_size(op, "k_pe", "num_tokens (size 0) equal to kv_c's", k_pe.shape[0], kv_c.shape[0])
    _check_size(op, "slot_mapping", "num_tokens (size 0) equal to kv_c's", slot_mapping.shape[0], kv_c.shape[0])
    for name, t in (("kv_c", kv_c), ("k_pe", k_pe), ("kv_cache", kv_cache)):
        _check_unit_last_stride(op, name, t)
    _check_contiguous(op, "slot_mapping", slot_mapping)
    _check_no_grad(op, kv_c=kv_c, k_pe=k_pe, kv_cache=kv_cache, scale=scale)


def check_write_cache_values(kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                             scale: torch.Tensor | None = None) -> None:
    """Slots in range and distinct, the scale positive and finite (reads them: a host sync on CUDA)."""
    _check_scale_value("write_cache", "scale", scale)
    num_slots = kv_cache.shape[0] * kv_cache.shape[1]
    slots = slot_mapping.to("cpu", torch.int64)
    slots = slots[slots >= 0]
    if slots.numel() and int(slots.max()) >= num_slots:
        _fail("write_cache", f"slot_mapping holds slot {int(slots.max())} outside [0, {num_slots}) (num_blocks * block_size); negative slots are skipped")
    if slots.unique().numel() != slots.numel():
        _fail("write_cache", "slot_mapping holds a slot twice; each token needs its own slot")


def num_sm_parts(device: torch.device, num_q_tokens_per_head_k: int, num_heads_k: int) -> int:
    """Rows of ``tile_scheduler_metadata``: the number of persistent CTAs the CUDA kernel runs.

    Each 64-row query tile of each KV head gets an equal share of the SMs. On the CPU there is
    one partition (the CPU impl does not split).
    """
    if device.type != "cuda":
        return 1
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count
    q_tiles = -(-num_q_tokens_per_head_k // TILE_ROWS)
    return max(1, sm_count // num_heads_k // q_tiles)


# --------------------------------------------------------------------------------------------
# Fake (meta) impls: shapes only, symbolic sizes welcome.
# --------------------------------------------------------------------------------------------


def decode_out_dtype(q_dtype: torch.dtype) -> torch.dtype:
    """dtype of decode's ``out``: q's, and bfloat16 for an e4m3 q (as vLLM's FP8 FlashMLA)."""
    return torch.bfloat16 if q_dtype == FP8 else q_dtype


@torch.library.register_fake("mla::decode")
def _decode_fake(q, kv_cache, block_table, cache_seqlens, head_dim_v=HEAD_DIM_V, softmax_scale=None,
                 causal=False, tile_scheduler_metadata=None, num_splits=None, descale_q=None, descale_k=None):
    check_decode_args(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale,
                      tile_scheduler_metadata, num_splits, descale_q, descale_k)
    b, s_q, h_q, _ = q.shape
    out = q.new_empty((b, s_q, h_q, head_dim_v), dtype=decode_out_dtype(q.dtype))
    lse = q.new_empty((b, h_q, s_q), dtype=torch.float32)
    return out, lse


@torch.library.register_fake("mla::get_metadata")
def _get_metadata_fake(cache_seqlens, num_q_tokens_per_head_k, num_heads_k):
    check_get_metadata_args(cache_seqlens, num_q_tokens_per_head_k, num_heads_k)
    parts = num_sm_parts(cache_seqlens.device, num_q_tokens_per_head_k, num_heads_k)
    metadata = cache_seqlens.new_empty((parts, METADATA_SIZE))
    splits = cache_seqlens.new_empty((cache_seqlens.shape[0] + 1,))
    return metadata, splits


@torch.library.register_fake("mla::write_cache")
def _write_cache_fake(kv_c, k_pe, kv_cache, slot_mapping, scale=None):
    check_write_cache_args(kv_c, k_pe, kv_cache, slot_mapping, scale)


# --------------------------------------------------------------------------------------------
# CPU impls: validate, then the pure-PyTorch reference. Also serve CUDA tensors when the
# compiled extension is absent (see __init__.py), with value checks only in debug mode there.
# --------------------------------------------------------------------------------------------


def _checks_values(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" or debug_mode()


def _decode_impl(q, kv_cache, block_table, cache_seqlens, head_dim_v=HEAD_DIM_V, softmax_scale=None,
                 causal=False, tile_scheduler_metadata=None, num_splits=None, descale_q=None, descale_k=None):
    check_decode_args(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale,
                      tile_scheduler_metadata, num_splits, descale_q, descale_k)
    if _checks_values(q):
        check_decode_values(q, kv_cache, block_table, cache_seqlens, causal, descale_q, descale_k)
    scale = HEAD_DIM ** -0.5 if softmax_scale is None else softmax_scale
    return reference.decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, scale, causal,
                            decode_out_dtype(q.dtype), descale_q, descale_k)


def _get_metadata_impl(cache_seqlens, num_q_tokens_per_head_k, num_heads_k):
    check_get_metadata_args(cache_seqlens, num_q_tokens_per_head_k, num_heads_k)
    parts = num_sm_parts(cache_seqlens.device, num_q_tokens_per_head_k, num_heads_k)
    return reference.get_metadata(cache_seqlens, parts, METADATA_SIZE)


def _write_cache_impl(kv_c, k_pe, kv_cache, slot_mapping, scale=None):
    check_write_cache_args(kv_c, k_pe, kv_cache, slot_mapping, scale)
    if _checks_values(kv_cache):
        check_write_cache_values(kv_cache, slot_mapping, scale)
    reference.write_cache(kv_c, k_pe, kv_cache, slot_mapping, scale)


def _register_reference(dispatch_key: str) -> None:
    lib.impl("decode", _decode_impl, dispatch_key)
    lib.impl("get_metadata", _get_metadata_impl, dispatch_key)
    lib.impl("write_cache", _write_cache_impl, dispatch_key)


_register_reference("CPU")


# --------------------------------------------------------------------------------------------
# Python wrappers: the documented API.
# --------------------------------------------------------------------------------------------


def decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    causal: bool = False,
    head_dim_v: int = HEAD_DIM_V,
    tile_scheduler_metadata: torch.Tensor | None = None,
    num_splits: torch.Tensor | None = None,
    descale_q: torch.Tensor | None = None,
    descale_k: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MLA decode attention over a paged latent KV cache (absorbed / MQA form).

    Layout: q, kv_cache and block_table need only a unit stride in their last dim. The CUDA
    kernel reads a sequence's ``s_q * h_q`` query rows with one row stride, so with s_q > 1 and
    h_q > 1 it also needs ``q.stride(1) == h_q * q.stride(2)``; it loads q and kv_cache by TMA,
    so their strides must be multiples of 16 bytes and their data 16-byte aligned.

    Args:
        q: ``[batch, s_q, h_q, 576]`` bf16 or fp16 (fp32 on the CPU), or float8_e4m3fn with
            ``descale_q``. The first 512 dims are the query in the latent space (W_UK absorbed),
            the last 64 its RoPE part.
        kv_cache: ``[num_blocks, block_size, 1, 576]``, q's dtype or float8_e4m3fn (an FP8 cache,
            with ``descale_k``; the only choice for an e4m3 q). Each row holds a token's latent
            ``c_kv`` (512) then its RoPE key ``k_pe`` (64); V is the first 512 dims. The CUDA
            kernel needs ``block_size == 64``. Over an FP8 cache a bf16/fp16/fp32 q is quantized
            row by row (:func:`quantize_rows_fp8`).
        block_table: ``[batch, max_blocks_per_seq]`` int32: block ids of each sequence, in order.
            Entries past a sequence's length are never read.
        cache_seqlens: ``[batch]`` int32, contiguous: number of cached tokens of each sequence,
            the new ones included. 0 marks an empty (padding) sequence: its out is 0, its lse +inf.
        softmax_scale: multiplies q·k before the softmax; default ``576 ** -0.5``.
        causal: with ``s_q > 1``, query row i of a sequence of length L sees keys
            ``[0, L - s_q + i]`` (speculative / multi-token decoding); otherwise all L keys.
        head_dim_v: must be 512.
        tile_scheduler_metadata, num_splits: the split-KV plan from :func:`get_metadata`, made
            once per step and shared by all layers; omitted, decode plans internally.
        descale_q, descale_k: ``[1]`` (or ``[]``) float32 on q's device, positive: the
            dequantization scales of an e4m3 q and of an e4m3 kv_cache (``value = e4m3 * scale``,
            see the module docstring); required with an e4m3 tensor, refused with any other.

    Returns:
        ``out``: ``[batch, s_q, h_q, 512]`` in q's dtype (bfloat16 for an e4m3 q), the attention
        output in latent space. ``lse``: ``[batch, h_q, s_q]`` float32, natural log of the softmax
        denominator of the scaled scores. Over FP8 inputs both are the attention over the
        dequantized values, within :func:`fp8_error_bounds` (module docstring).
    """
    return torch.ops.mla.decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale,
                                causal, tile_scheduler_metadata, num_splits, descale_q, descale_k)


def get_metadata(cache_seqlens: torch.Tensor, num_q_tokens_per_head_k: int,
                 num_heads_k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The split-KV work plan of one decode step, computed on the device with no host sync.

    Args:
        cache_seqlens: ``[batch]`` int32, as passed to :func:`decode`.
        num_q_tokens_per_head_k: ``s_q * h_q // num_heads_k``.
        num_heads_k: KV heads; MLA has 1.

    Returns:
        ``tile_scheduler_metadata``: ``[num_sm_parts, 8]`` int32, each row the stretch of
        (sequence, KV position) work one persistent CTA takes; ``num_splits``: ``[batch + 1]``
        int32, the cumulative number of splits of each sequence. Computed once per step, it is
        valid for every layer (it depends only on the lengths) and can be captured in a CUDA graph.
        On the CPU the plan is trivial (one part, one split per sequence): the CPU impl does not split.
    """
    return torch.ops.mla.get_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k)


def write_cache(kv_c: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor,
                slot_mapping: torch.Tensor, *, scale: torch.Tensor | None = None) -> None:
    """Write new tokens' latent and RoPE key parts into their paged cache slots, in place.

    Args:
        kv_c: ``[num_tokens, 512]``, the compressed latent ``c_kv``: kv_cache's dtype, or for an
            FP8 cache bf16, fp16 or fp32.
        k_pe: ``[num_tokens, 64]``, the RoPE key (already rotated), kv_c's dtype.
        kv_cache: ``[num_blocks, block_size, 1, 576]``, mutated: row ``slot % block_size`` of
            block ``slot // block_size`` becomes ``[kv_c[t] | k_pe[t]]`` for ``slot =
            slot_mapping[t]``. Like kv_c and k_pe it needs only a unit stride in its last dim
            (one layer of a larger buffer, padded rows), so it can be the cache decode reads.
        slot_mapping: ``[num_tokens]`` int32 or int64, contiguous, ``block_id * block_size +
            offset``; a negative slot skips the token (padding). Slots must be distinct.
        scale: for a float8_e4m3fn kv_cache (and only then), its ``[1]`` float32 dequantization
            scale, the ``descale_k`` decode reads it with: rows are stored as
            :func:`quantize_fp8` of ``[kv_c | k_pe]``, saturating at +-448, NaN kept.
    """
    torch.ops.mla.write_cache(kv_c, k_pe, kv_cache, slot_mapping, scale)


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x`` (bf16, fp16 or fp32, any shape) as float8_e4m3fn with dequantization scale ``scale``.

    ``e4m3(clamp(float32(x) / scale, -448, 448))``, rounded to nearest even: what
    :func:`write_cache` stores in an FP8 cache, and how to make an e4m3 q for :func:`decode`.
    ``scale``: ``[1]`` or ``[]`` float32 on x's device, positive and finite.
    """
    op = "quantize_fp8"
    _check_devices(op, "x", x=x, scale=scale)
    _check_dtype(op, "x", x, _DTYPES)
    _check_scale(op, "scale", scale)
    if _checks_values(scale):
        _check_scale_value(op, "scale", scale)
    return reference.quantize_fp8(x, scale)


def quantize_rows_fp8(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``q`` (bf16, fp16 or fp32, any shape) as float8_e4m3fn with one scale per row (last dim):
    what :func:`decode` does to a bf16/fp16/fp32 q over an FP8 cache.

    ``scale = amax / 448`` in float32 (amax: the row's largest magnitude, NaN ignored; 1 for a
    row of zeros) and ``q8 = quantize_fp8(q, scale)``. Returns ``(q8, scale)``, scale of shape
    ``q.shape[:-1] + (1,)``.
    """
    op = "quantize_rows_fp8"
    _check_dtype(op, "q", q, _DTYPES)
    return reference.quantize_rows_fp8(q)


def dequantize_fp8(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values a float8_e4m3fn ``x`` (an FP8 cache, any shape) stands for: ``float32(x) * scale``,
    in ``dtype`` (bf16, fp16 or fp32): what :func:`decode` reads, for inspection."""
    op = "dequantize_fp8"
    _check_devices(op, "x", x=x, scale=scale)
    _check_dtype(op, "x", x, FP8)
    _check_scale(op, "scale", scale)
    if dtype not in _DTYPES:
        _fail(op, f"dtype must be bfloat16 or float16 or float32, got {dtype}")
    return reference.dequantize_fp8(x, scale).to(dtype)

