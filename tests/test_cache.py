"""The paged latent cache: the allocator never hands a block out twice, a full cache is a clear
error that changes nothing, block tables and slots agree with the blocks each row owns."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from torch_mla.cache import BLOCK_SIZE, BlockAllocator, CacheFullError, PagedKVCache, slot_mapping

# A program: ("alloc", n) or ("free", k) = free the k-th live allocation (mod their count).
programs = st.lists(st.one_of(st.tuples(st.just("alloc"), st.integers(0, 7)),
                              st.tuples(st.just("free"), st.integers(0, 100))), max_size=60)


@given(num_blocks=st.integers(0, 24), program=programs)
def test_allocator_never_hands_out_a_block_twice(num_blocks, program):
    alloc = BlockAllocator(num_blocks)
    live: list[list[int]] = []
    for op, arg in program:
        if op == "alloc":
            free_before = alloc.num_free
            if arg > free_before:
                with pytest.raises(CacheFullError, match="KV cache full"):
                    alloc.allocate(arg)
                assert alloc.num_free == free_before  # all or nothing
                continue
            live.append(alloc.allocate(arg))
        elif live:
            alloc.free(live.pop(arg % len(live)))
        held = [b for blocks in live for b in blocks]
        assert len(held) == len(set(held)), "a block is held twice"
        assert all(0 <= b < num_blocks for b in held)
        assert alloc.num_free + len(held) == num_blocks


def test_freeing_a_block_twice_is_an_error():
    alloc = BlockAllocator(4)
    blocks = alloc.allocate(2)
    alloc.free(blocks)
    with pytest.raises(ValueError, match="not allocated"):
        alloc.free(blocks)
    assert alloc.num_free == 4


@given(lengths=st.lists(st.integers(0, 300), min_size=1, max_size=6), num_blocks=st.integers(0, 16))
def test_reserve_is_all_or_nothing_and_tables_match_the_blocks(lengths, num_blocks):
    cache = PagedKVCache(n_layers=1, num_blocks=num_blocks, max_batch_size=len(lengths), max_seq_len=320)
    for row, length in enumerate(lengths):
        table_before = cache.block_table.clone()
        blocks_before = [list(b) for b in cache.blocks]
        free_before = cache.allocator.num_free
        needed = -(-length // BLOCK_SIZE)
        if needed > free_before:
            with pytest.raises(CacheFullError):
                cache.reserve(row, length)
            assert torch.equal(cache.block_table, table_before)
            assert cache.blocks == blocks_before and cache.allocator.num_free == free_before
        else:
            cache.reserve(row, length)
            assert len(cache.blocks[row]) == needed
            assert cache.block_table[row, :needed].tolist() == cache.blocks[row]
    held = [b for blocks in cache.blocks for b in blocks]
    assert len(held) == len(set(held))


def test_rows_grow_block_by_block_and_free_gives_blocks_back():
    cache = PagedKVCache(n_layers=2, num_blocks=4, max_batch_size=2, max_seq_len=256)
    cache.reserve(0, 1)
    cache.reserve(0, 64)  # still one block
    assert len(cache.blocks[0]) == 1
    cache.reserve(0, 65)
    cache.reserve(1, 100)
    assert cache.allocator.num_free == 0
    with pytest.raises(CacheFullError):
        cache.reserve(0, 129)
    cache.free(1)
    cache.reserve(0, 129)
    assert len(cache.blocks[0]) == 3 and cache.blocks[1] == []
    with pytest.raises(ValueError, match="max_seq_len"):
        cache.reserve(0, 257)


def test_layer_slices_are_contiguous_mla_caches():
    cache = PagedKVCache(n_layers=3, num_blocks=5, max_batch_size=2, max_seq_len=128)
    for i in range(3):
        layer = cache.layer(i)
        assert layer.shape == (5, BLOCK_SIZE, 1, 576) and layer.is_contiguous()
        assert layer.data_ptr() == cache.kv.data_ptr() + i * layer.numel() * layer.element_size()


def test_device_slot_mapping_matches_host_slots():
    cache = PagedKVCache(n_layers=1, num_blocks=8, max_batch_size=3, max_seq_len=256)
    cache.reserve(2, 200)  # blocks 0-3 go to row 2, so row 0 gets non-trivial ids
    cache.reserve(0, 130)
    positions = torch.tensor([[0, 63, 64, 129], [-1, -1, -1, -1], [5, 64, 128, 199]])
    got = slot_mapping(cache.block_table, positions).view(3, 4)
    assert got[0].tolist() == [cache.slots(0, p, 1)[0] for p in positions[0].tolist()]
    assert got[1].tolist() == [-1] * 4
    assert got[2].tolist() == [cache.slots(2, p, 1)[0] for p in positions[2].tolist()]
