"""The FP8 (float8_e4m3fn) KV cache on the CPU: quantization, write_cache, and decode against the
independent float64 oracle (tests/oracle.py) over the dequantized inputs.

The oracle's inputs are dequantized here in float64 (``float64(e4m3) * float64(scale)``, exact),
not by the package. Bound: the reference dequantizes in float32 (one rounding, 2^-24 relative)
and then computes exactly as over a bf16/fp16/fp32 cache, so out stays within one ulp of its
dtype (bf16 for an e4m3 q) relative plus 1e-4 of its largest magnitude, and lse within 1e-4, as
in test_decode.py. That is far inside the contract's bound for every FP8 implementation
(ops.fp8_error_bounds of the oracle's terms), which is asserted too.
"""

import math

import torch
from hypothesis import given, strategies as st

import torch_mla
from oracle import naive_decode
from test_decode import assert_close_to_oracle
from torch_mla import ops
from torch_mla.ops import FP8, HEAD_DIM, HEAD_DIM_V, ROPE_DIM
from torch_mla.testing import paged_inputs

E4M3_CODES = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8)  # every bit pattern
scales = st.floats(1e-3, 10.0).map(lambda s: torch.tensor([s], dtype=torch.float32))


def dequantized64(t, scale):
    """The values an e4m3 tensor stands for, in float64, independently of the package."""
    return t.double() * scale.double()


def rows_quantized(q):
    """The contract's quantization of a bf16/fp16/fp32 q over an FP8 cache, written out: each row
    with scale amax / 448 in float32 (1 for a row of zeros), e4m3(q / scale) nearest even."""
    amax = q.float().abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 448, torch.ones(()))
    return (q.float() / scale).clamp(-448, 448).to(FP8), scale


@given(seed=st.integers(0, 2 ** 31 - 1), dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
       magnitude=st.floats(1e-6, 1e4))
def test_quantize_rows_gives_each_row_the_scale_of_its_largest_magnitude(seed, dtype, magnitude):
    q = (torch.randn(3, 5, HEAD_DIM, generator=torch.Generator().manual_seed(seed)) * magnitude).to(dtype)
    q[1, 2] = 0
    q8, scale = torch_mla.quantize_rows_fp8(q)
    want8, want_scale = rows_quantized(q)
    assert scale.shape == (3, 5, 1) and scale.dtype == torch.float32 and scale[1, 2] == 1
    assert torch.equal(scale, want_scale) and torch.equal(q8.view(torch.uint8), want8.view(torch.uint8))
    nonzero = q.float().abs().amax(dim=-1) > 0
    assert (q8.float().abs().amax(dim=-1)[nonzero] == 448).all(), "each row's largest magnitude maps to e4m3's largest"
    q[0, 0, 7] = math.nan  # a NaN element stays NaN and does not set the scale
    q8, scale = torch_mla.quantize_rows_fp8(q)
    assert q8[0, 0, 7].float().isnan() and torch.isfinite(scale).all()


def test_a_row_scale_is_one_division_by_448():
    # scale = amax / 448 rounded once, not amax * (1/448) rounded twice. With amax 2.40625 the
    # scale is 11/2048 exactly and 1.6328125 / scale = 304, a tie between e4m3's 288 and 320 that
    # rounds to even, 320; the reciprocal's scale (one ulp off) gives 288.
    q = torch.tensor([2.40625, 1.6328125, -1.6328125, 0.0], dtype=torch.bfloat16)
    q8, scale = torch_mla.quantize_rows_fp8(q)
    assert scale.item() == 11 / 2048
    assert q8.float().tolist() == [448.0, 320.0, -320.0, 0.0]
    reciprocal = torch.tensor(2.40625) * (torch.tensor(1.0) / torch.tensor(448.0))  # (float32)
    assert scale.item() != reciprocal.item(), "the example tells the two apart"


@given(scale=scales)
def test_dequantize_then_quantize_gives_back_every_e4m3_code(scale):
    codes = E4M3_CODES[~E4M3_CODES.float().isnan()]
    again = torch_mla.quantize_fp8(torch_mla.dequantize_fp8(codes, scale), scale)
    assert torch.equal(again.view(torch.uint8), codes.view(torch.uint8))


@given(scale=scales, seed=st.integers(0, 2 ** 31 - 1), dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]))
def test_quantize_rounds_x_over_scale_to_the_nearest_even_e4m3_value_and_saturates(scale, seed, dtype):
    x = (torch.randn(4096, generator=torch.Generator().manual_seed(seed)) * 300 * scale).to(dtype)
    codes = torch_mla.quantize_fp8(x, scale)
    # the contract: float32(x) / scale in float32, clamped to +-448, to the nearest e4m3 value, ties to even
    target = (x.float() / scale).clamp(-448, 448).double()
    grid = E4M3_CODES[E4M3_CODES.float().isfinite()].double().unique()
    distance = (grid[None, :] - target[:, None]).abs()
    nearest = distance.min(dim=1).values
    assert ((codes.double() - target).abs() == nearest).all()
    tie = (distance == nearest[:, None]).sum(dim=1) == 2
    assert (codes.view(torch.uint8)[tie] % 2 == 0).all(), "ties go to the even mantissa"


def test_quantize_saturates_infinities_and_keeps_nan():
    scale = torch.tensor([0.5])
    x = torch.tensor([1e6, -1e6, math.inf, -math.inf, math.nan, 224.0, 0.0])
    got = torch_mla.dequantize_fp8(torch_mla.quantize_fp8(x, scale), scale)
    assert got[:4].tolist() == [224.0, -224.0, 224.0, -224.0]
    assert got[4].isnan() and got[5:].tolist() == [224.0, 0.0]


@given(
    num_blocks=st.integers(1, 5),
    block_size=st.sampled_from([1, 16, 64]),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    scale=scales,
    data=st.data(),
)
def test_write_cache_quantizes_exactly_its_slots_into_an_fp8_cache(num_blocks, block_size, dtype, scale, data):
    num_slots = num_blocks * block_size
    slots = data.draw(st.lists(st.integers(0, num_slots - 1), unique=True, max_size=min(num_slots, 40)))
    order = data.draw(st.permutations(slots + data.draw(st.lists(st.integers(-3, -1), max_size=3))))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 31 - 1)))
    kv_cache = torch.randn(num_blocks, block_size, 1, HEAD_DIM, generator=g).to(FP8)
    before = kv_cache.view(torch.uint8).clone()
    kv_c = (torch.randn(len(order), HEAD_DIM_V, generator=g) * 100 * scale).to(dtype)  # some beyond 448 * scale
    k_pe = torch.randn(len(order), ROPE_DIM, generator=g).to(dtype)
    torch_mla.write_cache(kv_c, k_pe, kv_cache, torch.tensor(order, dtype=torch.int64), scale=scale)

    expected = before.view(-1, HEAD_DIM).clone()
    for t, slot in enumerate(order):
        if slot >= 0:
            expected[slot] = torch_mla.quantize_fp8(torch.cat([kv_c[t], k_pe[t]]), scale).view(torch.uint8)
    assert torch.equal(kv_cache.view(torch.uint8).view(-1, HEAD_DIM), expected)


@st.composite
def fp8_cases(draw):
    s_q = draw(st.integers(1, 3))
    causal = draw(st.booleans())
    block_size = draw(st.sampled_from([1, 7, 16, 64]))
    lengths = st.one_of(st.just(0), st.just(1), st.integers(s_q, 3 * block_size + 5), st.integers(1, 200),
                        st.sampled_from([block_size, 2 * block_size + 1])).filter(lambda n: not (causal and 0 < n < s_q))
    return dict(
        seqlens=draw(st.lists(lengths, min_size=1, max_size=3)),
        s_q=s_q, causal=causal, block_size=block_size,
        h_q=draw(st.sampled_from([1, 3, 16, 64])),
        q_dtype=draw(st.sampled_from([torch.bfloat16, torch.float16, torch.float32, FP8])),
        k_scale=draw(scales), q_scale=draw(scales),
        softmax_scale=draw(st.one_of(st.none(), st.floats(0.01, 0.2))),
        seed=draw(st.integers(0, 2 ** 31 - 1)),
        extra_blocks=draw(st.integers(0, 3)),
    )


@given(fp8_cases())
def test_fp8_decode_matches_float64_oracle_over_the_dequantized_inputs(case):
    # paged_inputs: pages in a random order, NaN in every row no sequence owns (NaN in e4m3 too)
    g = torch.Generator().manual_seed(case["seed"])
    q, kv, block_table, seqlens = paged_inputs(case["seqlens"], s_q=case["s_q"], h_q=case["h_q"],
                                               block_size=case["block_size"], dtype=torch.float32,
                                               extra_blocks=case["extra_blocks"], generator=g)
    k_scale, q_scale = case["k_scale"], case["q_scale"]
    kv8 = torch_mla.quantize_fp8(kv, k_scale)  # small scales saturate some values, large ones make subnormals
    fp8_q = case["q_dtype"] == FP8
    q_in = torch_mla.quantize_fp8(q, q_scale) if fp8_q else q.to(case["q_dtype"])
    out, lse = torch_mla.decode(q_in, kv8, block_table, seqlens, softmax_scale=case["softmax_scale"],
                                causal=case["causal"], descale_q=q_scale if fp8_q else None, descale_k=k_scale)

    q64 = dequantized64(q_in, q_scale) if fp8_q else dequantized64(*rows_quantized(q_in))
    ref_out, ref_lse, mag, abs_out = naive_decode(q64, dequantized64(kv8, k_scale), block_table, seqlens,
                                                  case["softmax_scale"], case["causal"], fp8_terms=True)
    out_dtype = torch.bfloat16 if fp8_q else case["q_dtype"]
    assert_close_to_oracle(out, lse, ref_out, ref_lse, out_dtype)
    # the contract's bound for any FP8 implementation, implied by the one above
    out_bound, lse_bound = ops.fp8_error_bounds(ref_out, abs_out, mag)
    assert ((out.double() - ref_out).abs() <= out_bound).all()
    finite = torch.isfinite(ref_lse)
    assert ((lse.double() - ref_lse).abs()[finite] <= lse_bound[finite]).all()


def test_an_fp8_cache_read_with_its_scale_equals_the_dequantized_inputs_read_as_float32():
    q, kv, block_table, seqlens = paged_inputs([5, 64, 130], s_q=2, h_q=4, dtype=torch.float32)
    scale = torch.tensor([0.01])
    kv8 = torch_mla.quantize_fp8(kv, scale)
    got = torch_mla.decode(q, kv8, block_table, seqlens, causal=True, descale_k=scale)
    q8, q_scale = torch_mla.quantize_rows_fp8(q)  # what decode does to a float q over an FP8 cache
    expected = torch_mla.decode(q8.float() * q_scale,
                                torch_mla.dequantize_fp8(kv8, scale), block_table, seqlens, causal=True)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
