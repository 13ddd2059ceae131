"""The paged latent KV cache: fixed-size blocks, a block allocator, block tables, slot mapping.

One tensor holds every layer: ``kv [n_layers, num_blocks, block_size, 1, 576]``, so ``kv[i]`` is
layer i's cache in the layout ``mla.decode`` reads (a contiguous slice). Each batch row owns a list
of blocks; ``block_table[row]`` lists them in order, ``block_id * block_size + offset`` is a token's
slot. Rows grow a block at a time as their sequences grow, so sequences of different lengths share
the pool, and a finished row gives its blocks back.

All bookkeeping lives on the host (Python lists); the device sees only ``kv`` and ``block_table``,
updated in place so that a captured CUDA graph keeps reading the same storage.

An FP8 cache (``dtype=torch.float8_e4m3fn``) holds the rows quantized with one per-tensor scale,
``kv_scale [1]`` float32 (the ``scale`` of ``mla.write_cache``, the ``descale_k`` of
``mla.decode``): 576 bytes a token instead of 1152 in bf16.
"""

from __future__ import annotations

import torch

from .ops import FP8, HEAD_DIM, PAGE_SIZE

__all__ = ["BLOCK_SIZE", "CacheFullError", "BlockAllocator", "PagedKVCache", "slot_mapping"]

BLOCK_SIZE = PAGE_SIZE  # tokens per block: the page size of the CUDA kernel


class CacheFullError(RuntimeError):
    """Not enough free blocks; the cache and the allocator are left as they were."""


class BlockAllocator:
    """Hands out block ids in ``[0, num_blocks)``; each id is held by at most one owner at a time."""

    def __init__(self, num_blocks: int):
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: pop() gives the lowest id first
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        """``n`` distinct free block ids; all or nothing (raises CacheFullError, changing nothing)."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > len(self._free):
            raise CacheFullError(
                f"KV cache full: {n} more blocks needed, {len(self._free)} of {self.num_blocks} free; "
                "make the cache larger (num_blocks) or the batch / sequences shorter"
            )
        blocks = [self._free.pop() for _ in range(n)]
        self._used.update(blocks)
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Return blocks to the pool; a block that is not allocated (or listed twice) is an error."""
        if len(set(blocks)) != len(blocks) or not self._used.issuperset(blocks):
            raise ValueError(f"freeing blocks that are not allocated (or twice): {blocks}")
        self._used.difference_update(blocks)
        self._free.extend(reversed(blocks))


class PagedKVCache:
    """The latent cache of every layer for a batch of up to ``max_batch_size`` sequences.

    Args:
        n_layers: model layers.
        num_blocks: blocks in the pool (shared by all rows).
        max_batch_size: rows of ``block_table``.
        max_seq_len: longest sequence a row may hold; ``block_table`` has
            ``ceil(max_seq_len / block_size)`` columns, a fixed shape for compiled steps.
        dtype, device: of ``kv``; ``torch.float8_e4m3fn`` makes an FP8 cache.
        kv_scale: an FP8 cache's dequantization scale (``kv_scale`` holds it as a ``[1]`` float32
            tensor; None for any other dtype). Rows are stored as ``x / kv_scale`` in e4m3,
            saturating at +-448: 1.0 (vLLM's default without calibrated scales) suits rows of
            magnitude up to a few hundred, like the RMS-normed latents.
    """

    def __init__(self, n_layers: int, num_blocks: int, max_batch_size: int, max_seq_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 block_size: int = BLOCK_SIZE, kv_scale: float = 1.0):
        if not (kv_scale > 0 and kv_scale < float("inf")):
            raise ValueError(f"kv_scale must be positive and finite, got {kv_scale}")
        self.kv_scale = torch.tensor([kv_scale], dtype=torch.float32, device=device) if dtype == FP8 else None
        self.block_size = block_size
        self.max_seq_len = max_seq_len
        self.max_blocks_per_seq = -(-max_seq_len // block_size)
        self.kv = torch.zeros(n_layers, num_blocks, block_size, 1, HEAD_DIM, dtype=dtype, device=device)
        self.block_table = torch.zeros(max_batch_size, self.max_blocks_per_seq, dtype=torch.int32, device=device)
        self.allocator = BlockAllocator(num_blocks)
        self.blocks: list[list[int]] = [[] for _ in range(max_batch_size)]  # per row, in order

    @property
    def max_batch_size(self) -> int:
        return len(self.blocks)

    def layer(self, i: int) -> torch.Tensor:
        """Layer i's cache, ``[num_blocks, block_size, 1, 576]`` (contiguous)."""
        return self.kv[i]

    def reserve(self, row: int, num_tokens: int) -> None:
        """Make room for row ``row`` to hold ``num_tokens`` tokens in all (allocating blocks as needed).

        Raises ValueError past ``max_seq_len`` and CacheFullError when the pool is short; either
        way nothing changes.
        """
        if num_tokens > self.max_seq_len:
            raise ValueError(f"row {row}: {num_tokens} tokens exceed max_seq_len {self.max_seq_len}")
        have = self.blocks[row]
        need = -(-num_tokens // self.block_size) - len(have)
        if need <= 0:
            return
        new = self.allocator.allocate(need)
        start = len(have)
        have.extend(new)
        self.block_table[row, start:start + need] = torch.tensor(new, dtype=torch.int32)

    def free(self, row: int) -> None:
        """Give row ``row``'s blocks back; the row becomes empty."""
        self.allocator.free(self.blocks[row])
        self.blocks[row] = []
        self.block_table[row].zero_()

    def reset(self) -> None:
        for row in range(self.max_batch_size):
            if self.blocks[row]:
                self.free(row)

    def slots(self, row: int, start: int, num_tokens: int) -> list[int]:
        """Slots of positions ``[start, start + num_tokens)`` of row ``row`` (blocks must be reserved)."""
        blocks, bs = self.blocks[row], self.block_size
        return [blocks[p // bs] * bs + p % bs for p in range(start, start + num_tokens)]


def slot_mapping(block_table: torch.Tensor, positions: torch.Tensor, block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """Device-side slots of ``positions [b, s]`` (int64) through ``block_table``; negative positions -> -1.

    No host sync and static shapes: this is how a compiled decode step finds where to write.
    """
    safe = positions.clamp(min=0)
    block = block_table.long().gather(1, safe // block_size)
    slots = block * block_size + safe % block_size
    return torch.where(positions >= 0, slots, -1).reshape(-1)
