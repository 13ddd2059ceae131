"""Input builders shared by the tests, the benchmark and the tools: paged decode inputs.

A paged cache as an engine holds it: pages handed out in a random order from a pool, every row
that no sequence owns (whole spare pages and the tail of each last page) poisoned with NaN by
default, block-table entries past a sequence's pages pointing at spare pages. A kernel that
reads a row it must not read then shows it in its result.
"""

from __future__ import annotations

import torch

from .ops import HEAD_DIM, PAGE_SIZE

__all__ = ["paged_inputs", "random_inputs", "varlen_seqlens", "strided_like"]


def varlen_seqlens(batch: int, seqlen: int, s_q: int = 1, generator: torch.Generator | None = None) -> list[int]:
    """Variable sequence lengths as the benchmark draws them: N(seqlen, seqlen / 2), >= s_q."""
    lens = torch.normal(float(seqlen), seqlen / 2, (batch,), generator=generator)
    return lens.round().clamp_min(s_q).int().tolist()


def paged_inputs(seqlens, *, s_q: int = 1, h_q: int = 16, block_size: int = PAGE_SIZE, dtype=torch.bfloat16,
                 device="cpu", extra_blocks: int = 3, spare_table_cols: int = 1,
                 seed: int = 0, generator: torch.Generator | None = None, poison: float | None = float("nan")):
    """Random ``(q, kv_cache, block_table, cache_seqlens)`` holding ``seqlens`` tokens per sequence.

    Shapes: q ``[batch, s_q, h_q, 576]`` and kv_cache ``[num_blocks, block_size, 1, 576]`` in
    ``dtype``, block_table ``[batch, max_pages + spare_table_cols]`` int32, cache_seqlens
    ``[batch]`` int32, all on ``device``, contiguous. num_blocks is the pages needed plus
    ``extra_blocks``; pages come from a random permutation of the pool.

    Random numbers come from ``generator`` (made on its own device, then moved to ``device``);
    without one, a generator on ``device`` seeded with ``seed`` (so a large cache is drawn on the GPU).
    ``poison``: the value of every cache row no sequence owns; None leaves them random too.
    """
    g = generator if generator is not None else torch.Generator(device).manual_seed(seed)
    gen_device = g.device
    batch = len(seqlens)
    pages = [-(-n // block_size) for n in seqlens]
    used_pages = sum(pages)
    max_blocks = max(pages + [0]) + spare_table_cols
    num_blocks = used_pages + extra_blocks
    perm = torch.randperm(num_blocks, generator=g, device=gen_device)
    block_table = torch.zeros(batch, max_blocks, dtype=torch.int32, device=gen_device)
    if poison is None:
        kv_cache = torch.randn(num_blocks, block_size, 1, HEAD_DIM, generator=g, device=gen_device)
    else:
        kv_cache = torch.full((num_blocks, block_size, 1, HEAD_DIM), poison, device=gen_device)
    start = 0
    for b, n in enumerate(seqlens):
        ids = perm[start:start + pages[b]]
        start += pages[b]
        # table entries past the sequence's pages point at pages nobody owns (block 0 if none)
        n_spare = max_blocks - pages[b]
        spare = (perm[used_pages + torch.arange(n_spare, device=gen_device) % extra_blocks] if extra_blocks
                 else torch.zeros(n_spare, dtype=perm.dtype, device=gen_device))
        block_table[b] = torch.cat([ids, spare]).int()
        if poison is not None and n:
            t = torch.arange(n, device=gen_device)
            kv_cache[ids[t // block_size], t % block_size, 0] = torch.randn(n, HEAD_DIM, generator=g, device=gen_device)
    q = torch.randn(batch, s_q, h_q, HEAD_DIM, generator=g, device=gen_device)
    cache_seqlens = torch.tensor(seqlens, dtype=torch.int32, device=gen_device)
    return (q.to(device, dtype), kv_cache.to(device, dtype), block_table.to(device), cache_seqlens.to(device))


def random_inputs(batch: int, s_q: int, h_q: int, seqlen: int, *, varlen: bool = False, dtype=torch.bfloat16,
                  device="cpu", seed: int = 0, poison: float | None = None):
    """The benchmark's inputs for one shape: ``batch`` sequences of ``seqlen`` tokens (or lengths
    from :func:`varlen_seqlens`), exactly the pages they need, table entries past them 0.

    Lengths come from a CPU generator seeded with ``seed`` (the same on every device); q and the
    cache are drawn on ``device``. Returns what :func:`paged_inputs` returns.
    """
    lens = varlen_seqlens(batch, seqlen, s_q, torch.Generator().manual_seed(seed)) if varlen else [seqlen] * batch
    return paged_inputs(lens, s_q=s_q, h_q=h_q, dtype=dtype, device=device, extra_blocks=0, spare_table_cols=0,
                        seed=seed, poison=poison)


def strided_like(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, *, pad: int = 64,
                 layers: int = 2, extra_cols: int = 3):
    """Non-contiguous views equal to the given tensors, in the layouts engines pass.

    q: a column slice of a wider projection output (rows of ``576 + pad``); kv_cache: layer 1 of a
    ``[layers, ...]`` buffer whose rows are padded by ``pad``; block_table: columns
    ``[1, 1 + max_blocks)`` of a wider table. Every stride but the last differs from a
    contiguous tensor's; ``pad`` a multiple of 8 keeps them multiples of 16 bytes (TMA).
    """
    b, s_q, h_q, d = q.shape
    wide_q = torch.full((b, s_q, h_q, d + pad), float("nan"), dtype=q.dtype, device=q.device)
    wide_q[..., :d] = q
    n, bs, hk, _ = kv_cache.shape
    buffer = torch.full((layers, n, bs, hk, d + pad), float("nan"), dtype=kv_cache.dtype, device=kv_cache.device)
    buffer[1, ..., :d] = kv_cache
    rows, cols = block_table.shape
    wide_table = torch.full((rows, cols + extra_cols), -7, dtype=block_table.dtype, device=block_table.device)
    wide_table[:, 1:1 + cols] = block_table
    return wide_q[..., :d], buffer[1, ..., :d], wide_table[:, 1:1 + cols]
