"""The FP8 (e4m3) cache on the GPU: the Hopper FP8 kernel against the float64 oracle over the
dequantized inputs, the quantizing write_cache against the CPU reference, CUDA-graph replay.
Skipped where there is no GPU.

Bounds. Every case is held to the contract's (ops.fp8_error_bounds of the oracle's terms): a
score may be off by ops.FP8_SCORE_RTOL of its row's magnitude M, and out by ops.FP8_OUT_RTOL of
the row's largest |out| plus what such score errors do to the probabilities. The kernel's products
are exact; the e4m3 tensor cores add the 32 of a k-step to the accumulator aligned to about 14
bits of its magnitude (or of their largest), so a chain of k-steps loses more the longer it runs.
The kernel adds S's k-steps in chains of two, the chains in fp32: a chain loses less than
2 * 32 * 2^-14 = 2^-8 of its sum of |products|, hence FP8_SCORE_RTOL = 2^-8. P.V runs in fp16 (V widened
exactly, P one fp16 term, 2^-11 relative); out is rounded to bf16/fp16.

On random data (paged_inputs' normal values) the truncations of products of either sign cancel,
and the kernel is far inside that bound: M is about 20 there, so the bound allows a lse error of
0.09 and 10-20% on out, while the kernel's were below 2e-3 and 0.5% on the H200
(docs/kernel.md). Those cases are held to RANDOM_OUT_RTOL of the row's largest |out| and
RANDOM_LSE_ATOL too, so that a lost page or a stale buffer shows. COHERENT shapes products that
share a sign, where the error is largest.
"""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import torch_mla
from oracle import naive_decode
from test_cuda_decode import poison_allocator
from test_fp8 import rows_quantized
from torch_mla import ops
from torch_mla.ops import FP8, HEAD_DIM, HEAD_DIM_V, ROPE_DIM
from torch_mla.testing import paged_inputs

pytestmark = pytest.mark.gpu
RANDOM_OUT_RTOL, RANDOM_LSE_ATOL = 2e-2, 1e-2  # random data only: the kernel's figures, with room


@pytest.fixture(autouse=True)
def _kernel_present():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    assert torch_mla.has_cuda_kernel(), f"CUDA extension not loaded: {torch_mla.cuda_kernel_error()}"


def fp8_inputs(seqlens, s_q, h_q, q_dtype, k_scale=0.02, q_scale=0.01, seed=0, shape=None):
    """paged_inputs (scattered pages, NaN in every row no sequence owns) with an e4m3 cache; q in
    q_dtype, or e4m3 with q_scale. ``shape(q, kv, block_table)`` may reshape the float32 data
    first (COHERENT). Returns CUDA tensors and the oracle's float64 q and cache."""
    g = torch.Generator().manual_seed(seed)
    q, kv, block_table, lens = paged_inputs(seqlens, s_q=s_q, h_q=h_q, dtype=torch.float32, generator=g)
    if shape is not None:
        q, kv = shape(q, kv, block_table)
    k_scale, q_scale = torch.tensor([k_scale]), torch.tensor([q_scale])
    kv8 = torch_mla.quantize_fp8(kv, k_scale)
    if q_dtype == FP8:
        q_in = torch_mla.quantize_fp8(q, q_scale)
        q64 = q_in.double() * q_scale.double()
    else:
        q_in = q.to(q_dtype)
        q8, row_scale = rows_quantized(q_in)  # the contract's row quantization, written out in the test
        q64 = q8.double() * row_scale.double()
    cuda = dict(q=q_in.cuda(), kv_cache=kv8.cuda(), block_table=block_table.cuda(), cache_seqlens=lens.cuda(),
                descale_k=k_scale.cuda(), descale_q=q_scale.cuda() if q_dtype == FP8 else None)
    return cuda, q64, kv8.double() * k_scale.double()


def on_random_data(ref_out, out_bound, lse_bound):
    """The contract's bounds, tightened to the kernel's own figures on random data (module
    docstring): RANDOM_OUT_RTOL of the row's largest |out|, RANDOM_LSE_ATOL."""
    return (torch.minimum(out_bound, RANDOM_OUT_RTOL * ref_out.abs().amax(dim=-1, keepdim=True)),
            lse_bound.clamp_max(RANDOM_LSE_ATOL))


def check_fp8_against_oracle(seqlens, s_q, h_q, causal=False, q_dtype=torch.bfloat16, softmax_scale=None, seed=0,
                             shape=None, k_scale=0.02):
    a, q64, kv64 = fp8_inputs(seqlens, s_q, h_q, q_dtype, seed=seed, shape=shape, k_scale=k_scale)
    poison_allocator()
    out, lse = torch_mla.decode(a["q"], a["kv_cache"], a["block_table"], a["cache_seqlens"], softmax_scale=softmax_scale,
                                causal=causal, descale_q=a["descale_q"], descale_k=a["descale_k"])
    torch.cuda.synchronize()
    assert out.dtype == (torch.bfloat16 if q_dtype == FP8 else q_dtype)
    ref_out, ref_lse, mag, abs_out = naive_decode(q64, kv64, a["block_table"], a["cache_seqlens"], softmax_scale,
                                                  causal, fp8_terms=True)
    out_bound, lse_bound = ops.fp8_error_bounds(ref_out, abs_out, mag)
    if shape is None:
        out_bound, lse_bound = on_random_data(ref_out, out_bound, lse_bound)
    out, lse = out.cpu().double(), lse.cpu().double()
    assert not out.isnan().any() and not lse.isnan().any(), "NaN in the result"
    for b, n in enumerate(seqlens):
        if n == 0:
            assert (out[b] == 0).all() and (lse[b] == math.inf).all(), "empty sequence: out 0, lse +inf"
            continue
        err, bound = (out[b] - ref_out[b]).abs(), out_bound[b]
        worst = (err - bound).argmax()
        assert (err <= bound).all(), (f"sequence {b} (len {n}): out error {err.flatten()[worst]:.2e}, "
                                      f"bound {bound.flatten()[worst]:.2e}")
        finite = torch.isfinite(ref_lse[b])  # (+inf: a causal row that sees no token)
        assert (lse[b][~finite] == math.inf).all()
        err, bound = (lse[b] - ref_lse[b]).abs()[finite], lse_bound[b][finite]
        worst = (err - bound).argmax()
        assert (err <= bound).all(), f"sequence {b} (len {n}): lse error {err[worst]:.2e}, bound {bound[worst]:.2e}"


CASES = [
    # (seqlens, s_q, h_q, causal)
    ([1], 1, 1, False),
    ([2], 1, 16, False),
    ([64], 1, 16, False),
    ([63, 65, 128, 129], 1, 16, False),
    ([65, 1, 200], 2, 16, True),
    ([0, 130, 7], 1, 128, False),
    ([4097], 1, 128, False),          # one sequence split over every SM
    ([4097, 33], 2, 128, True),       # two 64-row tiles x split
    ([300] * 5, 4, 32, True),
    ([1000, 4, 63, 64, 129], 3, 7, True),
    ([777, 1, 64 * 20 + 3], 4, 128, True),
    ([513, 2048, 17, 1500], 1, 64, False),
    ([1] * 40, 1, 3, False),
    ([40000, 24000], 1, 64, False),   # long: S's accumulation error grows with the sequence
    # at most 16 query rows: the kernel's narrow form (tokens and dims as the wgmma's rows), split
    # and not, causal and not, NaN past the lengths within a page
    ([4097], 1, 16, False),
    ([4097, 33, 20000], 2, 8, True),
    ([300] * 5, 1, 13, True),
    ([20000, 3, 64, 65], 1, 16, False),
    # 17-32 query rows: the narrow form with 32 columns
    ([4097, 33, 20000], 2, 16, True),
    ([300] * 5, 3, 7, True),
    ([20000, 3, 64, 65], 1, 32, False),
    # 1- and 2-token sequences, many rows: lse is one score (or two), so any error in a score or
    # a row scale shows undamped (the bench's check failed here when its CUDA reference rounded
    # the row scales differently: docs/kernel.md).
    ([1] * 128, 1, 64, False),
    ([2] * 128, 2, 64, True),
]


@pytest.mark.parametrize("seqlens,s_q,h_q,causal", CASES)
def test_fp8_kernel_matches_float64_oracle(seqlens, s_q, h_q, causal):
    check_fp8_against_oracle(seqlens, s_q, h_q, causal)


@pytest.mark.parametrize("q_dtype", [torch.float16, FP8])
def test_fp8_kernel_query_dtypes_and_softmax_scale(q_dtype):
    check_fp8_against_oracle([100, 64, 3000], 2, 64, True, q_dtype=q_dtype, softmax_scale=0.05, seed=3)


@settings(max_examples=25, deadline=None)
@given(s_q=st.integers(1, 3), h_q=st.sampled_from([1, 16, 32, 64, 128]), causal=st.booleans(),
       q_dtype=st.sampled_from([torch.bfloat16, torch.float16, FP8]), data=st.data())
def test_fp8_kernel_property(s_q, h_q, causal, q_dtype, data):
    lengths = st.integers(s_q if causal else 0, 700)
    seqlens = data.draw(st.lists(lengths, min_size=1, max_size=6))
    check_fp8_against_oracle(seqlens, s_q, h_q, causal, q_dtype=q_dtype, seed=data.draw(st.integers(0, 2 ** 20)))


def spikes(q, kv, block_table):
    """Tokens 40 and 178 of every sequence that long made 0.25 and 0.5 times the sum of its query
    rows 0-7 (of position 0): those rows score about 6 and 12 nat there, from products that
    mostly share a sign."""
    for b in range(block_table.shape[0]):
        for coef, t in ((0.25, 40), (0.5, 178)):
            kv[block_table[b, t // 64], t % 64, 0] = coef * q[b, 0, :8].sum(dim=0)
    return q, kv


def front_heavy(q, kv, block_table):
    kv = kv.abs()
    kv[..., :HEAD_DIM // 2] *= 4  # (the first k-steps' products 4x the rest)
    return q.abs(), kv


# Scores whose products share a sign: summing them is where the e4m3 tensor cores lose most
# (random signs cancel their truncations). Each shape at the default softmax_scale (M about
# 10-25) and 4x it (M up to about 80).
COHERENT = {"positive": lambda q, kv, _: (q.abs(), kv.abs()), "front-heavy": front_heavy, "spikes": spikes}


@pytest.mark.parametrize("h_q", [16, 32, 64, 128])
@pytest.mark.parametrize("kind", list(COHERENT))
@pytest.mark.parametrize("scale_mult", [1, 4])
def test_fp8_kernel_coherent_scores(h_q, kind, scale_mult):
    seqlens = [1] * 16 + [3, 200, 4097] if kind != "spikes" else [179, 200, 4097]
    check_fp8_against_oracle(seqlens, 1, h_q, shape=COHERENT[kind], softmax_scale=scale_mult * HEAD_DIM ** -0.5,
                             k_scale=0.05)


def test_fp8_kernel_runs_are_bitwise_identical():
    a, _, _ = fp8_inputs([3000, 77, 1], 1, 128, torch.bfloat16)
    first = torch_mla.decode(**a)
    again = torch_mla.decode(**a)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_fp8_write_cache_matches_reference_bitwise(dtype, slot_dtype):
    g = torch.Generator().manual_seed(5)
    n, num_blocks, block_size = 50, 4, 64
    scale = torch.tensor([0.03])
    kv_c = (torch.randn(n, HEAD_DIM_V, generator=g) * 30).to(dtype)  # some beyond 448 * scale: saturate
    k_pe = torch.randn(n, ROPE_DIM, generator=g).to(dtype)
    kv_c[0, :3] = torch.tensor([math.inf, -math.inf, math.nan]).to(dtype)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:n].to(slot_dtype)
    slots[7] = -1
    cache_cpu = torch.randn(num_blocks, block_size, 1, HEAD_DIM, generator=g).to(FP8)
    cache_gpu = cache_cpu.cuda()
    torch_mla.write_cache(kv_c, k_pe, cache_cpu, slots, scale=scale)
    torch_mla.write_cache(kv_c.cuda(), k_pe.cuda(), cache_gpu, slots.cuda(), scale=scale.cuda())
    got, want = cache_gpu.cpu(), cache_cpu
    nan = want.float().isnan()
    assert torch.equal(got.float().isnan(), nan), "NaN stays NaN (its sign bit is not part of the contract)"
    assert torch.equal(got.view(torch.uint8)[~nan], want.view(torch.uint8)[~nan])


def test_fp8_bf16_query_is_quantized_as_the_reference_does():
    # the CUDA row quantization (csrc/common/quantize.cu) against the CPU reference: same decode
    # inputs, one row of zeros, one with a huge value, results within the kernel's bound of each other
    a, _, _ = fp8_inputs([500, 64], 1, 16, torch.bfloat16, seed=9)
    a["q"][0, 0, 3] = 0
    a["q"][1, 0, 5, 17] = 40  # the row's amax, 10x its others: their e4m3 steps grow
    out, lse = torch_mla.decode(**a)
    cpu = {k: (v.cpu() if v is not None else None) for k, v in a.items()}
    ref_out, ref_lse = torch_mla.decode(**cpu)
    mag, abs_out = torch_mla.reference.fp8_error_terms(cpu["q"], cpu["kv_cache"], cpu["block_table"],
                                                       cpu["cache_seqlens"], HEAD_DIM_V, HEAD_DIM ** -0.5, False,
                                                       descale_k=cpu["descale_k"])
    out_bound, lse_bound = on_random_data(ref_out.double(), *ops.fp8_error_bounds(ref_out.double(), abs_out.double(),
                                                                                  mag.double()))
    assert ((out.cpu().double() - ref_out.double()).abs() <= out_bound).all()
    assert ((lse.cpu() - ref_lse).abs() <= lse_bound).all()


def test_fp8_row_quantization_rounds_ties_as_one_division_on_cuda_too():
    # The row scale is amax / 448 rounded once (test_fp8.py's example: 1.6328125 / (2.40625 / 448)
    # = 304, a tie that rounds to 320; amax * (1/448) gives 288). The reference on CUDA and the
    # CUDA kernel's own quantization (seen through a 1-token decode: lse is the one score) agree.
    q = torch.randn(64, 3, HEAD_DIM, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    q[0, 0] = 0
    q[0, 0, :2] = torch.tensor([2.40625, 1.6328125])
    cpu8, cpu_scale = torch_mla.quantize_rows_fp8(q)
    cuda8, cuda_scale = torch_mla.quantize_rows_fp8(q.cuda())
    assert torch.equal(cuda_scale.cpu(), cpu_scale) and torch.equal(cuda8.cpu().view(torch.uint8), cpu8.view(torch.uint8))
    kv = torch.zeros(2, 64, 1, HEAD_DIM)
    kv[1, 0, 0, 1] = 1.0  # the one token: its score is q8[1] * scale * 1
    k_scale = torch.tensor([1 / 64])
    kv8 = torch_mla.quantize_fp8(kv, k_scale).cuda()
    _, lse = torch_mla.decode(q[:1, None, :1].cuda(), kv8, torch.tensor([[1]], dtype=torch.int32).cuda(),
                              torch.tensor([1], dtype=torch.int32).cuda(), softmax_scale=1.0, descale_k=k_scale.cuda())
    assert lse.item() == pytest.approx(320 * 11 / 2048, abs=1e-5), "288 * 11 / 2048 = 1.547: rounded the other way"


def test_fp8_cuda_graph_replay_with_changed_seqlens_matches_eager():
    a, _, _ = fp8_inputs([2000] * 4, 2, 32, torch.bfloat16, seed=7)
    lens = a["cache_seqlens"]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            torch_mla.decode(**a, causal=True)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        md, ns = torch_mla.get_metadata(lens, 2 * 32, 1)
        out_g, lse_g = torch_mla.decode(**a, causal=True, tile_scheduler_metadata=md, num_splits=ns)
    for new in ([700, 64, 1, 2000], [2, 1000, 0, 1999], [1500, 3, 640, 17]):
        lens.copy_(torch.tensor(new, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        out_e, lse_e = torch_mla.decode(**a, causal=True)
        assert torch.equal(out_g, out_e) and torch.equal(lse_g, lse_e)
