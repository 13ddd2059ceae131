"""FlashMLA's Python interface over torch-mla: ``import torch_mla.flash_mla as flash_mla``.

FlashMLA has had two interfaces for its decode kernel, and serving engines call both:

* Since January 2026 (``deepseek-ai/FlashMLA`` 082094b and later): :func:`get_mla_metadata`
  returns ``(FlashMLASchedMeta(), None)``, an empty scheduler object that the first
  :func:`flash_mla_with_kvcache` call plans and later calls reuse (``num_splits=None``). This
  module's :func:`get_mla_metadata` is that one.
* In 2025 (and ``sgl_kernel.flash_mla``): ``get_mla_metadata`` returned the plan itself, two
  int32 tensors, which callers copy into CUDA-graph buffers. That one is
  :func:`get_mla_metadata_tensors` here, also exported as ``torch_mla.get_mla_metadata``.

The two are called with the same arguments (vLLM passes ``cache_seqlens, num_q_tokens_per_head_k,
num_heads_k, is_fp8_kvcache=...`` to both), so one function cannot tell which result its caller
expects: the import chooses. :func:`flash_mla_with_kvcache` takes either kind of plan.

An FP8 cache is torch-mla's: float8_e4m3fn rows of 576 with a per-tensor ``descale_k``, and an
e4m3 q with ``descale_q``, as vLLM's ``flash_mla_with_kvcache_fp8`` and SGLang's
``flash_mla_with_kvcache(..., descale_q=, descale_k=)`` pass them (see :func:`torch_mla.decode`).
A FlashMLA feature torch-mla does not have raises ``NotImplementedError`` naming the argument
(sparse attention; FlashMLA's own 656-byte FP8 rows with per-tile scales); ``attn_sink`` is
implemented (a scaling of ``out`` after decode). Every call ends in :func:`torch_mla.decode`,
which holds the argument rules.
"""

from __future__ import annotations

import dataclasses

import torch

from . import ops

__all__ = [
    "FlashMLASchedMeta",
    "get_mla_metadata",
    "get_mla_metadata_tensors",
    "get_mla_metadata_dense_fp8",
    "flash_mla_with_kvcache",
    "flash_mla_with_kvcache_fp8",
]

def _not_implemented(fn: str, what: str) -> None:
    raise NotImplementedError(f"{fn}: {what} is not implemented in torch-mla")


def _reject_unsupported(fn: str, topk: int | None = None, **sparse) -> None:
    if topk is not None:
        _not_implemented(fn, f"topk={topk} (sparse attention)")
    for name, value in sparse.items():
        if value is not None:
            _not_implemented(fn, f"{name} (sparse attention)")


def _check_fp8_format(fn: str, k_cache: torch.Tensor, is_fp8_kvcache: bool) -> None:
    """``is_fp8_kvcache=True`` with anything but an e4m3 cache is FlashMLA's own FP8 layout."""
    if is_fp8_kvcache and k_cache.dtype != ops.FP8:
        raise NotImplementedError(
            f"{fn}: is_fp8_kvcache=True with a k_cache of dtype {str(k_cache.dtype).removeprefix('torch.')} and head "
            f"dim {k_cache.shape[-1]}: FlashMLA's FP8 rows (656 bytes, per-tile scales inside) are not implemented in "
            "torch-mla; its FP8 cache is float8_e4m3fn rows of 576 with a per-tensor descale_k")


@dataclasses.dataclass
class FlashMLASchedMeta:
    """FlashMLA's scheduler object: empty until the first :func:`flash_mla_with_kvcache` call.

    That call records the shapes it was planned for in ``config`` and the plan in
    ``tile_scheduler_metadata`` (``[num_sm_parts, 8]`` int32) and ``num_splits`` (``[batch + 1]``
    int32). Later calls reuse the plan and raise ``ValueError`` if a shape differs. As in
    FlashMLA, reuse it only while ``cache_seqlens`` holds the same values (all layers of one
    step); make a new one each step.
    """

    @dataclasses.dataclass
    class Config:
        b: int
        s_q: int
        h_q: int
        page_block_size: int
        h_k: int
        causal: bool
        is_fp8_kvcache: bool
        topk: int | None
        extra_page_block_size: int | None
        extra_topk: int | None

    have_initialized: bool = False
    config: Config | None = None
    tile_scheduler_metadata: torch.Tensor | None = None
    num_splits: torch.Tensor | None = None


def get_mla_metadata(
    cache_seqlens: torch.Tensor | None = None,
    num_q_tokens_per_head_k: int | None = None,
    num_heads_k: int | None = None,
    num_heads_q: int | None = None,
    is_fp8_kvcache: bool = False,
    topk: int | None = None,
) -> tuple[FlashMLASchedMeta, None]:
    """FlashMLA's current ``get_mla_metadata``: ``(FlashMLASchedMeta(), None)``.

    The plan is made by the first :func:`flash_mla_with_kvcache` call, from that call's shapes
    and ``cache_seqlens``; the arguments here are accepted for the callers written for the
    earlier interface (as FlashMLA does) and do not enter the plan (an FP8 cache has the same
    plan: it depends only on the lengths). ``topk`` raises ``NotImplementedError``.
    """
    _reject_unsupported("get_mla_metadata", topk)
    return FlashMLASchedMeta(), None


def get_mla_metadata_tensors(
    cache_seqlens: torch.Tensor,
    num_q_tokens_per_head_k: int,
    num_heads_k: int,
    num_heads_q: int | None = None,
    is_fp8_kvcache: bool = False,
    topk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashMLA's 2025 ``get_mla_metadata``: the plan as ``(tile_scheduler_metadata, num_splits)``.

    Args:
        cache_seqlens: ``[batch]`` int32.
        num_q_tokens_per_head_k: ``s_q * h_q // num_heads_k`` (FlashMLA's first release called
            it ``num_heads_per_head_k``).
        num_heads_k: 1 for MLA.
        num_heads_q: accepted; FlashMLA needs it only for sparse attention.
        is_fp8_kvcache: accepted; an FP8 cache has the same plan. topk: not None raises
            ``NotImplementedError``.

    Returns ``[num_sm_parts, 8]`` int32 and ``[batch + 1]`` int32, as :func:`torch_mla.get_metadata`.
    """
    _reject_unsupported("get_mla_metadata", topk)
    return ops.get_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k)


def get_mla_metadata_dense_fp8(cache_seqlens: torch.Tensor, num_q_tokens_per_head_k: int,
                               num_heads_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's planner for :func:`flash_mla_with_kvcache_fp8`: the same plan as
    :func:`get_mla_metadata_tensors` (it depends only on the lengths)."""
    return get_mla_metadata_tensors(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, is_fp8_kvcache=True)


def _plan(sched: FlashMLASchedMeta, q: torch.Tensor, k_cache: torch.Tensor, cache_seqlens: torch.Tensor,
          causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Plan ``sched`` on its first use; check the shapes against its plan on every later one."""
    config = FlashMLASchedMeta.Config(q.shape[0], q.shape[1], q.shape[2], k_cache.shape[1], k_cache.shape[2],
                                      causal, k_cache.dtype == ops.FP8, None, None, None)
    if not sched.have_initialized:
        if sched.tile_scheduler_metadata is None and sched.num_splits is None:
            h_k = k_cache.shape[2]
            sched.tile_scheduler_metadata, sched.num_splits = ops.get_metadata(
                cache_seqlens, q.shape[1] * q.shape[2] // max(h_k, 1), h_k)
        sched.config = config
        sched.have_initialized = True
    else:
        for field in dataclasses.fields(config):
            planned, got = getattr(sched.config, field.name), getattr(config, field.name)
            if planned != got:
                raise ValueError(
                    f"flash_mla_with_kvcache: tile_scheduler_metadata was planned for {field.name}={planned}, "
                    f"got {field.name}={got}; a FlashMLASchedMeta serves one set of shapes and lengths "
                    "(make a new one with get_mla_metadata() when they change)")
    return sched.tile_scheduler_metadata, sched.num_splits


def _apply_attn_sink(out: torch.Tensor, lse: torch.Tensor, attn_sink: torch.Tensor) -> torch.Tensor:
    """``out * exp(lse) / (exp(lse) + exp(attn_sink))`` per head; 0 rows (lse +inf) stay 0."""
    if attn_sink.dim() != 1 or attn_sink.shape[0] != out.shape[2]:
        raise ValueError(f"flash_mla_with_kvcache: attn_sink must be 1-D [h_q] = [{out.shape[2]}], "
                         f"got shape {tuple(attn_sink.shape)}")
    if attn_sink.dtype != torch.float32:
        raise ValueError(f"flash_mla_with_kvcache: attn_sink must be float32, got "
                         f"{str(attn_sink.dtype).removeprefix('torch.')}")
    if attn_sink.device != out.device:
        raise ValueError(f"flash_mla_with_kvcache: attn_sink is on {attn_sink.device} but q is on {out.device}")
    # sigmoid(lse - sink) is the same ratio without overflow; NaN only where lse = sink = +inf (out is 0 there).
    factor = torch.sigmoid(lse.transpose(1, 2) - attn_sink).nan_to_num(nan=0.0)  # [b, s_q, h_q]
    return (out.float() * factor.unsqueeze(-1)).to(out.dtype)


def flash_mla_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor | None,
    cache_seqlens: torch.Tensor | None,
    head_dim_v: int,
    tile_scheduler_metadata: FlashMLASchedMeta | torch.Tensor | None,
    num_splits: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    is_fp8_kvcache: bool = False,
    indices: torch.Tensor | None = None,
    attn_sink: torch.Tensor | None = None,
    extra_k_cache: torch.Tensor | None = None,
    extra_indices_in_kvcache: torch.Tensor | None = None,
    topk_length: torch.Tensor | None = None,
    extra_topk_length: torch.Tensor | None = None,
    descale_q: torch.Tensor | None = None,
    descale_k: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashMLA's ``flash_mla_with_kvcache`` (both interfaces) over :func:`torch_mla.decode`.

    Args:
        q: ``[batch, s_q, h_q, 576]``; k_cache: ``[num_blocks, page_block_size, 1, 576]``;
            block_table: ``[batch, max_blocks_per_seq]`` int32; cache_seqlens: ``[batch]`` int32;
            head_dim_v: 512. Passed to :func:`torch_mla.decode` as they are (views included).
        descale_q, descale_k: the ``[1]`` float32 scales of an e4m3 q and of an e4m3 k_cache, as
            SGLang passes them (keywords; ``sgl_kernel.flash_mla``'s FP8 call), for
            :func:`torch_mla.decode`.
        is_fp8_kvcache: may say that k_cache is e4m3 (its dtype says it anyway); with any other
            k_cache (FlashMLA's 656-byte FP8 rows) it raises ``NotImplementedError``.
        tile_scheduler_metadata, num_splits: a :class:`FlashMLASchedMeta` from
            :func:`get_mla_metadata` with ``num_splits=None``, or the two tensors from
            :func:`get_mla_metadata_tensors`, or both None (decode plans for itself).
        softmax_scale: default ``576 ** -0.5``. causal: as in :func:`torch_mla.decode`.
        attn_sink: ``[h_q]`` float32 or None: ``out`` is scaled by
            ``exp(lse) / (exp(lse) + exp(attn_sink))`` per head (+inf gives 0, -inf no change);
            ``lse`` is unchanged.
        indices, extra_k_cache, extra_indices_in_kvcache, topk_length, extra_topk_length: sparse
            attention; anything but the default raises ``NotImplementedError``.

    Returns:
        ``out [batch, s_q, h_q, 512]`` in q's dtype (bfloat16 for an e4m3 q) and
        ``lse [batch, h_q, s_q]`` float32.
    """
    fn = "flash_mla_with_kvcache"
    _reject_unsupported(fn, None, indices=indices, extra_k_cache=extra_k_cache,
                        extra_indices_in_kvcache=extra_indices_in_kvcache, topk_length=topk_length,
                        extra_topk_length=extra_topk_length)
    _check_fp8_format(fn, k_cache, is_fp8_kvcache)
    if block_table is None or cache_seqlens is None:
        raise ValueError(f"{fn}: block_table and cache_seqlens are required (dense attention)")
    if isinstance(tile_scheduler_metadata, FlashMLASchedMeta):
        if num_splits is not None:
            raise ValueError(f"{fn}: num_splits must be None with a FlashMLASchedMeta (it holds its own plan)")
        tile_scheduler_metadata, num_splits = _plan(tile_scheduler_metadata, q, k_cache, cache_seqlens, causal)
    out, lse = ops.decode(q, k_cache, block_table, cache_seqlens, softmax_scale=softmax_scale, causal=causal,
                          head_dim_v=head_dim_v, tile_scheduler_metadata=tile_scheduler_metadata,
                          num_splits=num_splits, descale_q=descale_q, descale_k=descale_k)
    if attn_sink is not None:
        out = _apply_attn_sink(out, lse, attn_sink)
    return out, lse


def flash_mla_with_kvcache_fp8(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    tile_scheduler_metadata: torch.Tensor,
    num_splits: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    descale_q: torch.Tensor | None = None,
    descale_k: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's FP8 entry point (``vllm.v1.attention.ops.flashmla``), same arguments.

    vLLM passes an e4m3 q and k_cache with ``descale_q=layer._q_scale.reshape(1)`` and
    ``descale_k=layer._k_scale.reshape(1)``; out is bfloat16 then. It is
    :func:`flash_mla_with_kvcache` with tensor plans and these scales.
    """
    return flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                                  num_splits, softmax_scale, causal, descale_q=descale_q, descale_k=descale_k)
