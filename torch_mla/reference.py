"""Pure-PyTorch implementations of the mla ops: the CPU kernels and the numerics of record.

These functions assume their arguments passed the rules in ``ops.py``; they compute in float32
with float32 accumulation and are vectorised (pages are gathered with one indexing op, no Python
loop per token or per sequence), so they can drive a small model on the CPU.
"""

from __future__ import annotations

import torch

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448, e4m3's largest finite magnitude


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``e4m3(clamp(float32(x) / scale, -448, 448))``, nearest even; clamp keeps NaN as NaN."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def dequantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``float32(x) * scale``: the value an e4m3 tensor stands for, in float32."""
    return x.float() * scale


def quantize_rows_fp8(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row (last dim) of ``q`` as e4m3 with its own scale: ``scale = amax / 448`` (amax of the
    row's finite and infinite magnitudes, NaN ignored; 1 for a row of zeros), ``quantize_fp8(q,
    scale)``. Returns ``(q8, scale)``, scale float32 of shape ``q.shape[:-1] + (1,)``."""
    mag = q.float().abs()
    amax = torch.where(mag.isnan(), torch.zeros((), device=q.device), mag).amax(dim=-1, keepdim=True)
    # A division by a tensor, not by the number 448: PyTorch's CUDA division by a Python scalar
    # multiplies by its rounded reciprocal, a scale one ulp off in most rows, and then q / scale
    # rounds the other way wherever it is an exact tie (bf16 rows have them).
    scale = torch.where(amax > 0, amax / torch.full_like(amax, FP8_MAX), torch.ones((), device=q.device))
    return quantize_fp8(q, scale), scale


def _used_columns(block_table: torch.Tensor, cache_seqlens: torch.Tensor, block_size: int) -> int:
    """Block-table columns the longest sequence reaches, so that the cost follows the lengths, not
    the table's width. That needs the lengths on the host: read them only where it is free (CPU
    tensors, not tracing); on CUDA and under torch.compile the whole width, with no sync."""
    width = block_table.shape[1]
    if cache_seqlens.device.type != "cpu" or torch.compiler.is_compiling() or cache_seqlens.numel() == 0:
        return width
    return min(width, -(-int(cache_seqlens.max()) // block_size))


def _gather_pages(kv_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
                  descale_k: torch.Tensor | None = None):
    """Gather each sequence's pages into ``[batch, max_len, d]`` float32 (dequantized with
    ``descale_k`` for an e4m3 cache), zero past its length.

    ``max_len`` is the longest sequence rounded up to whole blocks on the CPU (the table's whole
    width on CUDA and under tracing).

    Block ids past a sequence's length are never dereferenced (they are replaced by block 0), and
    rows past the length are zeroed, so whatever unused pages or slots hold (NaN included) cannot
    reach the result.
    """
    block_size = kv_cache.shape[1]
    block_table = block_table[:, : _used_columns(block_table, cache_seqlens, block_size)]
    batch, max_blocks = block_table.shape
    seqlens = cache_seqlens.long()
    used_blocks = (seqlens + block_size - 1) // block_size
    block_used = torch.arange(max_blocks, device=block_table.device) < used_blocks[:, None]
    safe_table = torch.where(block_used, block_table, torch.zeros_like(block_table)).long()
    if kv_cache.shape[0] == 0:  # no pages at all: every sequence is empty
        kv = torch.zeros(batch, max_blocks * block_size, kv_cache.shape[-1], device=kv_cache.device)
    else:
        kv = kv_cache[safe_table].reshape(batch, max_blocks * block_size, kv_cache.shape[-1]).float()
    if descale_k is not None:
        kv = dequantize_fp8(kv, descale_k)
    positions = torch.arange(max_blocks * block_size, device=kv.device)
    valid = positions < seqlens[:, None]
    kv = torch.where(valid[..., None], kv, torch.zeros((), dtype=torch.float32, device=kv.device))
    return kv, positions, seqlens


def _operands(q, kv_cache, block_table, cache_seqlens, causal, descale_q, descale_k):
    """float32 q ``[batch, s_q, h_q, d]``, the gathered keys ``[batch, max_len, d]`` and which key
    each query row sees, ``[batch, s_q, 1, max_len]``. e4m3 inputs are dequantized (a
    bf16/fp16/fp32 q over an e4m3 cache quantized row by row first)."""
    batch, s_q, h_q, _ = q.shape
    kv, positions, seqlens = _gather_pages(kv_cache, block_table, cache_seqlens, descale_k)
    if descale_q is not None:
        qf = dequantize_fp8(q, descale_q)
    elif descale_k is not None:  # a bf16/fp16/fp32 q over an e4m3 cache: quantized row by row
        qf = dequantize_fp8(*quantize_rows_fp8(q))
    else:
        qf = q.float()
    # Last key each query row may see: L - 1 for all rows, or L - s_q + i when causal.
    last = (seqlens - 1)[:, None].expand(batch, s_q)
    if causal:
        last = last - (s_q - 1) + torch.arange(s_q, device=q.device)[None, :]
    visible = positions[None, None, :] <= last[:, :, None]  # [batch, s_q, max_len]
    return qf, kv, visible[:, :, None, :]


def _scores(qf, kv, visible, softmax_scale):
    """Every query row's scaled scores over its sequence's keys, ``[batch, s_q, h_q, max_len]``,
    -inf where the row does not see the key."""
    scores = torch.einsum("bshd,btd->bsht", qf, kv) * softmax_scale
    return scores.masked_fill(~visible, float("-inf"))


def decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
           head_dim_v: int, softmax_scale: float, causal: bool, out_dtype: torch.dtype | None = None,
           descale_q: torch.Tensor | None = None,
           descale_k: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every query row over its sequence's cached rows; see ``ops.decode``.

    e4m3 inputs are dequantized (``descale_q``, ``descale_k``) to float32 first; ``out`` is
    returned in ``out_dtype`` (default q's dtype)."""
    qf, kv, visible = _operands(q, kv_cache, block_table, cache_seqlens, causal, descale_q, descale_k)
    scores = _scores(qf, kv, visible, softmax_scale)
    lse = torch.logsumexp(scores, dim=-1)  # [batch, s_q, h_q]; -inf for a row that sees nothing
    empty = torch.isneginf(lse)
    probs = torch.exp(scores - torch.where(empty, 0.0, lse)[..., None])
    out = torch.einsum("bsht,btv->bshv", probs, kv[..., :head_dim_v])
    lse = torch.where(empty, float("inf"), lse)  # FlashMLA's convention for an empty row
    return out.to(q.dtype if out_dtype is None else out_dtype), lse.transpose(1, 2).contiguous()


def fp8_error_terms(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
                    head_dim_v: int, softmax_scale: float, causal: bool, descale_q: torch.Tensor | None = None,
                    descale_k: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``ops.fp8_error_bounds`` states decode's FP8 error against: each row's score magnitude
    M ``[batch, h_q, s_q]`` (``softmax_scale`` times the largest ``sum_i |q_i| |k_i|`` over the keys
    it sees, dequantized; 0 for none) and ``abs_out`` ``[batch, s_q, h_q, head_dim_v]`` (its
    probabilities times ``|v|``), float32."""
    qf, kv, visible = _operands(q, kv_cache, block_table, cache_seqlens, causal, descale_q, descale_k)
    scores = _scores(qf, kv, visible, softmax_scale)
    mags = _scores(qf.abs(), kv.abs(), visible, softmax_scale)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # (a row that sees nothing: all -inf)
    abs_out = torch.einsum("bsht,btv->bshv", probs, kv[..., :head_dim_v].abs())
    return mags.amax(dim=-1).clamp_min(0).transpose(1, 2).contiguous(), abs_out


def get_metadata(cache_seqlens: torch.Tensor, num_sm_parts: int, metadata_size: int):
    """The CPU plan: nothing is split, so each sequence has exactly one split."""
    batch = cache_seqlens.shape[0]
    metadata = torch.zeros((num_sm_parts, metadata_size), dtype=torch.int32, device=cache_seqlens.device)
    num_splits = torch.arange(batch + 1, dtype=torch.int32, device=cache_seqlens.device)
    return metadata, num_splits


def write_cache(kv_c: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                scale: torch.Tensor | None = None) -> None:
    """``kv_cache[slot // block_size, slot % block_size, 0] = [kv_c | k_pe]`` for each slot >= 0,
    quantized with ``scale`` into an e4m3 cache.

    Indexes the 4-D cache (no flattening view), so a strided cache is written in place.
    """
    block_size = kv_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    rows = torch.cat([kv_c[keep], k_pe[keep]], dim=-1)
    rows = rows.to(kv_cache.dtype) if scale is None else quantize_fp8(rows, scale)
    kv_cache[slots // block_size, slots % block_size, 0] = rows
