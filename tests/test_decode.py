"""mla.decode on the CPU against the independent float64 oracle (tests/oracle.py).

Tolerances: the reference computes in float32 from the bf16/fp16/fp32 inputs and rounds `out`
once to the input dtype, so each element of `out` may differ from the float64 result by half an
ulp of its dtype (2^-9 relative for bf16, 2^-12 for fp16) plus float32 accumulation error
(~1e-6 of the row's scale). We allow one ulp relative plus 1e-4 of the largest magnitude.
`lse` stays float32: 1e-4 absolute covers float32 rounding of sums of a few thousand terms.
"""

import math

import pytest
import torch
from hypothesis import given, strategies as st

import torch_mla
from oracle import naive_decode
from torch_mla.ops import HEAD_DIM
from torch_mla.testing import paged_inputs, strided_like

ULP = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 1e-6}


def assert_close_to_oracle(out, lse, ref_out, ref_lse, dtype):
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    out64 = out.double()
    bound = ULP[dtype] * ref_out.abs() + 1e-4 * ref_out.abs().max().clamp_min(1e-6)
    assert ((out64 - ref_out).abs() <= bound).all(), f"max err {(out64 - ref_out).abs().max()}"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse[~finite] == math.inf).all()
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], rtol=1e-5, atol=1e-4)


@st.composite
def decode_cases(draw):
    s_q = draw(st.integers(1, 4))
    causal = draw(st.booleans())
    block_size = draw(st.sampled_from([1, 7, 16, 64]))
    batch = draw(st.integers(1, 4))
    # causal sequences need at least s_q tokens; 0 is an empty padding sequence
    lengths = st.one_of(
        st.just(0), st.just(1), st.integers(s_q, 3 * block_size + 5),
        st.sampled_from([block_size, 2 * block_size, 2 * block_size + 1]), st.integers(1, 300),
    ).filter(lambda n: not (causal and 0 < n < s_q))
    seqlens = draw(st.lists(lengths, min_size=batch, max_size=batch))
    return dict(
        seqlens=seqlens,
        s_q=s_q,
        h_q=draw(st.sampled_from([1, 2, 3, 16, 17, 64, 128])),
        block_size=block_size,
        dtype=draw(st.sampled_from([torch.bfloat16, torch.float16, torch.float32])),
        causal=causal,
        softmax_scale=draw(st.one_of(st.none(), st.floats(0.01, 0.2))),
        seed=draw(st.integers(0, 2 ** 31 - 1)),
        extra_blocks=draw(st.integers(0, 4)),
    )


@given(decode_cases())
def test_decode_matches_float64_oracle(case):
    g = torch.Generator().manual_seed(case["seed"])
    q, kv_cache, block_table, seqlens = paged_inputs(
        case["seqlens"], s_q=case["s_q"], h_q=case["h_q"], block_size=case["block_size"],
        dtype=case["dtype"], extra_blocks=case["extra_blocks"], generator=g,
    )
    out, lse = torch_mla.decode(q, kv_cache, block_table, seqlens, softmax_scale=case["softmax_scale"],
                                causal=case["causal"])
    ref_out, ref_lse = naive_decode(q, kv_cache, block_table, seqlens, case["softmax_scale"], case["causal"])
    assert out.shape == (len(case["seqlens"]), case["s_q"], case["h_q"], 512)
    assert_close_to_oracle(out, lse, ref_out, ref_lse, case["dtype"])


@pytest.mark.parametrize("seqlen", [4096, 8193])
def test_decode_long_sequences(seqlen):
    q, kv_cache, block_table, seqlens = paged_inputs([seqlen, 77], s_q=2, h_q=8, dtype=torch.bfloat16)
    out, lse = torch_mla.decode(q, kv_cache, block_table, seqlens, causal=True)
    assert_close_to_oracle(out, lse, *naive_decode(q, kv_cache, block_table, seqlens, causal=True), torch.bfloat16)


def test_nan_in_unused_pages_does_not_leak():
    # paged_inputs fills every row no sequence owns with NaN, and points spare table entries at them
    q, kv_cache, block_table, seqlens = paged_inputs([5, 64, 130], h_q=4, block_size=64, extra_blocks=2)
    assert kv_cache.isnan().any()
    out, lse = torch_mla.decode(q, kv_cache, block_table, seqlens)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


def test_garbage_block_ids_past_the_length_are_never_read():
    q, kv_cache, block_table, seqlens = paged_inputs([10, 70], h_q=4)
    block_table[:, 2:] = 10 ** 6  # out of range, but past both sequences' pages
    block_table[0, 1] = -5
    out, lse = torch_mla.decode(q, kv_cache, block_table, seqlens)
    assert_close_to_oracle(out, lse, *naive_decode(q, kv_cache, block_table, seqlens), torch.bfloat16)


def test_empty_sequence_gives_zero_out_and_infinite_lse():
    q, kv_cache, block_table, seqlens = paged_inputs([0, 3], h_q=2)
    out, lse = torch_mla.decode(q, kv_cache, block_table, seqlens)
    assert (out[0] == 0).all() and (lse[0] == math.inf).all()
    assert torch.isfinite(lse[1]).all()


def test_empty_batch_gives_empty_result():
    q, kv_cache, block_table, seqlens = paged_inputs([], s_q=2, h_q=4)
    out, lse = torch_mla.decode(q, kv_cache, block_table, seqlens, causal=True)
    assert out.shape == (0, 2, 4, 512) and lse.shape == (0, 4, 2)


def test_causal_rows_see_a_growing_prefix():
    # row i of s_q sees L - s_q + i + 1 keys: equal to a separate s_q=1 call on the shorter sequence
    q, kv_cache, block_table, seqlens = paged_inputs([40], s_q=3, h_q=4, dtype=torch.float32)
    out, lse = torch_mla.decode(q, kv_cache, block_table, seqlens, causal=True)
    for i in range(3):
        shorter = seqlens - (2 - i)
        o_i, l_i = torch_mla.decode(q[:, i:i + 1].contiguous(), kv_cache, block_table, shorter)
        torch.testing.assert_close(out[:, i], o_i[:, 0])
        torch.testing.assert_close(lse[:, :, i], l_i[:, :, 0])


def test_default_softmax_scale_is_head_dim_to_the_minus_half():
    q, kv_cache, block_table, seqlens = paged_inputs([33], h_q=2, dtype=torch.float32)
    a = torch_mla.decode(q, kv_cache, block_table, seqlens)
    b = torch_mla.decode(q, kv_cache, block_table, seqlens, softmax_scale=HEAD_DIM ** -0.5)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_flash_mla_compatible_entry_points_match_decode():
    q, kv_cache, block_table, seqlens = paged_inputs([50, 9], s_q=2, h_q=16)
    metadata, num_splits = torch_mla.get_mla_metadata(seqlens, 2 * 16, 1)
    out, lse = torch_mla.flash_mla_with_kvcache(q, kv_cache, block_table, seqlens, 512, metadata, num_splits, causal=True)
    ref = torch_mla.decode(q, kv_cache, block_table, seqlens, causal=True)
    torch.testing.assert_close((out, lse), ref, rtol=0, atol=0)


def test_decode_does_not_modify_its_inputs():
    q, kv_cache, block_table, seqlens = paged_inputs([20, 65], s_q=2, h_q=4)
    before = [t.clone() for t in (q, kv_cache, block_table, seqlens)]
    torch_mla.decode(q, kv_cache, block_table, seqlens, causal=True)
    for t, b in zip((q, kv_cache, block_table, seqlens), before):
        assert torch.equal(t.nan_to_num(0.0), b.nan_to_num(0.0))


@given(
    seqlens=st.lists(st.integers(0, 200), min_size=1, max_size=3),
    s_q=st.integers(1, 3),
    h_q=st.sampled_from([1, 2, 5]),
    block_size=st.sampled_from([1, 16, 64]),
    dtype=st.sampled_from([torch.bfloat16, torch.float32]),
    seed=st.integers(0, 2 ** 31 - 1),
)
def test_strided_inputs_give_the_result_of_contiguous_copies(seqlens, s_q, h_q, block_size, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q, kv_cache, block_table, lens = paged_inputs(seqlens, s_q=s_q, h_q=h_q, block_size=block_size, dtype=dtype,
                                                  generator=g)
    views = strided_like(q, kv_cache, block_table)
    for view, t in zip(views, (q, kv_cache, block_table)):
        assert torch.equal(view.nan_to_num(7.0), t.nan_to_num(7.0)) and view.stride() != t.stride()
    expected = torch_mla.decode(q, kv_cache, block_table, lens)
    got = torch_mla.decode(*views, lens)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_strided_inputs_under_torch_compile_give_the_eager_result():
    q, kv_cache, block_table, lens = paged_inputs([5, 70, 130], s_q=2, h_q=4, dtype=torch.float32)
    views = strided_like(q, kv_cache, block_table)

    def step(q, kv_cache, block_table, lens):
        return torch.ops.mla.decode(q, kv_cache, block_table, lens, 512, None, True, None, None)

    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True)(*views, lens)
    expected = step(q, kv_cache, block_table, lens)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
