"""The ops inside torch.compile(fullgraph=True): no graph break, no recompile as batch size and
sequence lengths change (dynamic shapes), and the eager result."""

import torch

import torch_mla  # noqa: F401
from torch_mla.ops import HEAD_DIM_V, PAGE_SIZE, ROPE_DIM
from torch_mla.testing import paged_inputs


def decode_step(q, kv_cache, block_table, cache_seqlens, kv_c, k_pe, slot_mapping):
    """One decode step as a model runs it: write the new token, plan, attend."""
    torch.ops.mla.write_cache(kv_c, k_pe, kv_cache, slot_mapping)
    metadata, num_splits = torch.ops.mla.get_metadata(cache_seqlens, q.shape[1] * q.shape[2], 1)
    out, lse = torch.ops.mla.decode(q, kv_cache, block_table, cache_seqlens, HEAD_DIM_V, 0.07, True, metadata, num_splits)
    return out.float() * 2.0, lse


def step_inputs(seqlens, seed):
    """Inputs for a step that appends one token to each sequence (its last position)."""
    g = torch.Generator().manual_seed(seed)
    q, kv_cache, block_table, cache_seqlens = paged_inputs(seqlens, s_q=1, h_q=8, dtype=torch.float32, generator=g)
    positions = cache_seqlens.long() - 1
    slots = block_table.gather(1, (positions // PAGE_SIZE)[:, None]).squeeze(1).long() * PAGE_SIZE + positions % PAGE_SIZE
    kv_c = torch.randn(len(seqlens), HEAD_DIM_V, generator=g)
    k_pe = torch.randn(len(seqlens), ROPE_DIM, generator=g)
    return q, kv_cache, block_table, cache_seqlens, kv_c, k_pe, slots


def test_compiled_step_matches_eager_without_recompiling():
    torch._dynamo.reset()
    compiled = torch.compile(decode_step, fullgraph=True, dynamic=True)
    shapes = [[5, 70], [1, 64, 130], [200, 3, 65, 9, 12]]  # batch 2, 3, 5; pages 2, 3, 4
    for i, seqlens in enumerate(shapes):
        eager_args = step_inputs(seqlens, seed=i)
        compiled_args = [t.clone() for t in eager_args]
        expected = decode_step(*eager_args)
        if i == 0:
            got = compiled(*compiled_args)
        else:
            with torch._dynamo.config.patch(error_on_recompile=True):
                got = compiled(*compiled_args)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        # the cache write happened in the compiled graph too
        assert torch.equal(compiled_args[1].nan_to_num(7.0), eager_args[1].nan_to_num(7.0))


def fp8_decode_step(q, kv_cache, block_table, cache_seqlens, kv_c, k_pe, slot_mapping, scale):
    """The step over an FP8 cache: quantize the new token on write, attend over the dequantized cache."""
    torch.ops.mla.write_cache(kv_c, k_pe, kv_cache, slot_mapping, scale)
    metadata, num_splits = torch.ops.mla.get_metadata(cache_seqlens, q.shape[1] * q.shape[2], 1)
    return torch.ops.mla.decode(q, kv_cache, block_table, cache_seqlens, HEAD_DIM_V, 0.07, True, metadata, num_splits,
                                None, scale)


def test_compiled_fp8_step_matches_eager_without_recompiling():
    torch._dynamo.reset()
    compiled = torch.compile(fp8_decode_step, fullgraph=True, dynamic=True)
    scale = torch.tensor([0.02])
    for i, seqlens in enumerate([[5, 70], [1, 64, 130], [200, 3, 65, 9, 12]]):
        q, kv_cache, *rest = step_inputs(seqlens, seed=i)
        kv_cache = torch_mla.quantize_fp8(kv_cache, scale)
        eager_args = [q, kv_cache, *rest, scale]
        compiled_args = [t.clone() for t in eager_args]
        expected = fp8_decode_step(*eager_args)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            got = compiled(*compiled_args)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
        assert torch.equal(compiled_args[1].view(torch.uint8), eager_args[1].view(torch.uint8))
