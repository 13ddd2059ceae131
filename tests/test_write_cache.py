"""mla.write_cache writes exactly the given slots, skips negative ones, and touches nothing else."""

import torch
from hypothesis import given, strategies as st

import torch_mla
from torch_mla.ops import HEAD_DIM, HEAD_DIM_V, ROPE_DIM


@given(
    num_blocks=st.integers(1, 6),
    block_size=st.sampled_from([1, 16, 64]),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    slot_dtype=st.sampled_from([torch.int32, torch.int64]),
    data=st.data(),
)
def test_write_cache_writes_exactly_its_slots(num_blocks, block_size, dtype, slot_dtype, data):
    num_slots = num_blocks * block_size
    slots = data.draw(st.lists(st.integers(0, num_slots - 1), unique=True, max_size=min(num_slots, 40)))
    skips = data.draw(st.lists(st.integers(-3, -1), max_size=3))
    order = data.draw(st.permutations(slots + skips))
    seed = data.draw(st.integers(0, 2 ** 31 - 1))
    g = torch.Generator().manual_seed(seed)
    kv_cache = torch.randn(num_blocks, block_size, 1, HEAD_DIM, generator=g).to(dtype)
    before = kv_cache.clone()
    kv_c = torch.randn(len(order), HEAD_DIM_V, generator=g).to(dtype)
    k_pe = torch.randn(len(order), ROPE_DIM, generator=g).to(dtype)
    torch_mla.write_cache(kv_c, k_pe, kv_cache, torch.tensor(order, dtype=slot_dtype))

    expected = before.view(-1, HEAD_DIM).clone()
    for t, slot in enumerate(order):
        if slot >= 0:
            expected[slot] = torch.cat([kv_c[t], k_pe[t]])
    assert torch.equal(kv_cache.view(-1, HEAD_DIM), expected)


def test_write_cache_then_decode_reads_the_written_tokens():
    block_size, num_blocks = 64, 4
    kv_cache = torch.full((num_blocks, block_size, 1, HEAD_DIM), float("nan"))
    block_table = torch.tensor([[2, 0]], dtype=torch.int32)
    n = 70
    positions = torch.arange(n)
    slots = block_table[0, positions // block_size].long() * block_size + positions % block_size
    kv_c, k_pe = torch.randn(n, HEAD_DIM_V), torch.randn(n, ROPE_DIM)
    torch_mla.write_cache(kv_c, k_pe, kv_cache, slots)
    q = torch.randn(1, 1, 2, HEAD_DIM)
    out, _ = torch_mla.decode(q, kv_cache, block_table, torch.tensor([n], dtype=torch.int32))
    keys = torch.cat([kv_c, k_pe], dim=-1)
    probs = torch.softmax(q[0, 0] @ keys.T * HEAD_DIM ** -0.5, dim=-1)
    torch.testing.assert_close(out[0, 0], probs @ kv_c)


def test_write_cache_into_a_strided_cache_matches_a_contiguous_one_and_spares_the_rest():
    # the cache as one layer of a [layers, ...] buffer with padded rows; kv_c a slice of a wider row
    g = torch.Generator().manual_seed(3)
    buffer = torch.randn(2, 4, 16, 1, HEAD_DIM + 8, generator=g)
    strided = buffer[1, ..., :HEAD_DIM]
    contiguous = strided.clone()
    outside = buffer.clone()
    kv_c = torch.randn(10, HEAD_DIM_V + 32, generator=g)[:, :HEAD_DIM_V]
    k_pe = torch.randn(10, ROPE_DIM, generator=g)
    slots = torch.tensor([0, 63, 17, -1, 5, 40, 16, 1, 62, -2])
    torch_mla.write_cache(kv_c, k_pe, strided, slots)
    torch_mla.write_cache(kv_c.contiguous(), k_pe, contiguous, slots)
    assert torch.equal(strided, contiguous)
    outside[1, ..., :HEAD_DIM] = contiguous
    assert torch.equal(buffer, outside), "only the cache's own rows change"
