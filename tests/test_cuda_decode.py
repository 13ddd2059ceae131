"""The Hopper kernel (csrc/) against the float64 oracle, on the GPU. Skipped where there is none.

Tolerances (bf16/fp16 inputs): Q.K^T is exact products with float32 accumulation, so lse is
within float32 rounding (1e-3 absolute is generous); the probabilities P are rounded to the
input dtype before P.V (as in FlashMLA) and out is rounded once more, so out carries about two
roundings of relative error 2^-9 (bf16): we require ||out - ref|| / ||ref|| <= 1e-2 and every
element within 2e-2 of the largest |ref| of its sequence. NaN never passes.
"""

import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

import torch_mla
from oracle import naive_decode
from torch_mla.ops import HEAD_DIM, HEAD_DIM_V, METADATA_SIZE, PAGE_SIZE, ROPE_DIM
from torch_mla.testing import paged_inputs, strided_like

pytestmark = pytest.mark.gpu

OUT_REL = 1e-2
OUT_ABS_OF_MAX = 2e-2
LSE_ATOL = 1e-3


@pytest.fixture(autouse=True)
def _kernel_present():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    assert torch_mla.has_cuda_kernel(), f"CUDA extension not loaded: {torch_mla.cuda_kernel_error()}"


def poison_allocator(numel=1 << 24):
    """Leave NaN in the caching allocator's free blocks so that unwritten outputs show up."""
    torch.empty(numel, dtype=torch.float32, device="cuda").fill_(math.nan)
    torch.cuda.synchronize()


def check_against_oracle(seqlens, s_q, h_q, causal=False, dtype=torch.bfloat16, softmax_scale=None, seed=0,
                         use_metadata=False):
    q, kv_cache, block_table, lens = paged_inputs(seqlens, s_q=s_q, h_q=h_q, dtype=dtype, device="cuda", seed=seed)
    if use_metadata:
        md, ns = torch_mla.get_metadata(lens, s_q * h_q, 1)
    else:
        md = ns = None
    poison_allocator()
    out, lse = torch_mla.decode(q, kv_cache, block_table, lens, softmax_scale=softmax_scale, causal=causal,
                                tile_scheduler_metadata=md, num_splits=ns)
    torch.cuda.synchronize()
    ref_out, ref_lse = naive_decode(q, kv_cache, block_table, lens, softmax_scale, causal)
    assert out.shape == (len(seqlens), s_q, h_q, HEAD_DIM_V) and out.dtype == dtype
    assert lse.shape == (len(seqlens), h_q, s_q) and lse.dtype == torch.float32
    out, lse = out.cpu().double(), lse.cpu().double()
    assert not out.isnan().any(), "NaN in out"
    assert not lse.isnan().any(), "NaN in lse"
    for b, n in enumerate(seqlens):
        if n == 0:
            assert (out[b] == 0).all() and (lse[b] == math.inf).all(), "empty sequence: out 0, lse +inf"
            continue
        err = (out[b] - ref_out[b]).norm() / ref_out[b].norm().clamp_min(1e-30)
        assert err <= OUT_REL, f"sequence {b} (len {n}): relative error {err:.2e}"
        worst = (out[b] - ref_out[b]).abs().max()
        assert worst <= OUT_ABS_OF_MAX * ref_out[b].abs().max(), f"sequence {b}: max abs error {worst:.2e}"
        torch.testing.assert_close(lse[b], ref_lse[b], rtol=0, atol=LSE_ATOL)
    return q, kv_cache, block_table, lens


CASES = [
    # (seqlens, s_q, h_q, causal)
    ([1], 1, 1, False),
    ([64], 1, 16, False),
    ([63, 65, 128, 129], 1, 16, False),
    ([65, 1, 200], 2, 16, True),
    ([0, 130, 7], 1, 128, False),
    ([0, 0], 1, 8, False),
    ([4097], 1, 128, False),          # one sequence split over every SM
    ([4097, 33], 2, 128, True),       # two 64-row tiles x split
    ([300] * 5, 4, 32, True),         # 128 rows
    ([1000, 4, 63, 64, 129], 3, 7, True),
    ([777, 1, 64 * 20 + 3], 4, 128, True),  # 512 rows: 8 tiles
    ([513, 2048, 17, 1500], 1, 64, False),
    ([1] * 40, 1, 3, False),          # many tiny sequences per CTA
]


@pytest.mark.parametrize("seqlens,s_q,h_q,causal", CASES)
def test_kernel_matches_float64_oracle(seqlens, s_q, h_q, causal):
    check_against_oracle(seqlens, s_q, h_q, causal)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_dtypes_and_softmax_scale(dtype):
    check_against_oracle([100, 1234, 5], 2, 16, True, dtype=dtype, softmax_scale=0.1, seed=3)


def test_kernel_with_metadata_from_get_metadata():
    check_against_oracle([3000, 17, 0, 640], 1, 64, False, use_metadata=True, seed=5)


@settings(max_examples=25, deadline=None)
@given(
    s_q=st.integers(1, 4),
    h_q=st.sampled_from([1, 2, 5, 16, 17, 32, 64, 100, 128]),
    causal=st.booleans(),
    batch=st.integers(1, 5),
    data=st.data(),
)
def test_kernel_property(s_q, h_q, causal, batch, data):
    lengths = st.one_of(st.just(0), st.just(1), st.integers(1, 700), st.sampled_from([64, 128, 129, 2049]))
    if causal:
        lengths = lengths.filter(lambda n: n == 0 or n >= s_q)
    seqlens = data.draw(st.lists(lengths, min_size=batch, max_size=batch))
    seed = data.draw(st.integers(0, 2 ** 31 - 1))
    dtype = data.draw(st.sampled_from([torch.bfloat16, torch.float16]))
    check_against_oracle(seqlens, s_q, h_q, causal, dtype=dtype, seed=seed)


def test_repeated_runs_are_bitwise_identical():
    q, kv, bt, lens = paged_inputs([5000, 77, 1, 3000], s_q=2, h_q=64, device="cuda", seed=11)
    first = torch_mla.decode(q, kv, bt, lens, causal=True)
    for _ in range(3):
        again = torch_mla.decode(q, kv, bt, lens, causal=True)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def check_plan(seqlens, rows):
    lens = torch.tensor(seqlens, dtype=torch.int32, device="cuda")
    md, ns = torch_mla.get_metadata(lens, rows, 1)
    parts = torch_mla.ops.num_sm_parts(lens.device, rows, 1)
    assert md.shape == (parts, METADATA_SIZE) and ns.shape == (len(seqlens) + 1,)
    md, ns = md.cpu().tolist(), ns.cpu().tolist()
    pages = [-(-n // PAGE_SIZE) for n in seqlens]
    counts = [ns[b + 1] - ns[b] for b in range(len(seqlens))]
    assert ns[0] == 0
    assert [c == 0 for c in counts] == [p == 0 for p in pages]
    # every page of every sequence is covered exactly once; each split index of a sequence once
    covered = [[0] * p for p in pages]
    split_ids = [[] for _ in pages]
    for row in md:
        b0, p0, b1, p1, first_split, n_pages = row[:6]
        if b0 >= len(seqlens):
            assert n_pages == 0
            continue
        total = 0
        for b in range(b0, b1 + 1):
            lo = p0 if b == b0 else 0
            hi = p1 if b == b1 else pages[b]
            if hi > lo:
                split_ids[b].append(first_split if b == b0 else 0)
            for i in range(lo, hi):
                covered[b][i] += 1
            total += max(0, hi - lo)
        assert total == n_pages
    assert all(c == 1 for seq in covered for c in seq)
    for b, ids in enumerate(split_ids):
        assert sorted(ids) == list(range(counts[b])), (b, ids, counts[b])
    return md, counts


@pytest.mark.parametrize("rows", [16, 64, 128, 512])
def test_metadata_plan_covers_every_page_once(rows):
    check_plan([0, 1, 64, 65, 5000, 0, 129], rows)
    g = torch.Generator().manual_seed(rows)
    for batch in (1, 7, 128, 300, 1500):  # 1500: past the greedy planner's batch limit
        lens = torch.randint(0, 3000, (batch,), generator=g)
        lens[torch.rand(batch, generator=g) < 0.2] = 0
        check_plan(lens.tolist(), rows)


def test_equal_lengths_are_not_split_when_they_fit():
    # b=128 x 64 pages over 132 (or 66) stretches: one or two whole sequences per CTA, no combine
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    _, counts = check_plan([4096] * 128, 64)
    if sms >= 128:
        assert max(counts) == 1
    _, counts = check_plan([4096] * 128, 128)
    if sms >= 128:
        assert max(counts) == 1


def test_cuda_graph_replay_with_changed_seqlens_matches_eager():
    q, kv, bt, lens = paged_inputs([2000] * 4, s_q=2, h_q=32, device="cuda", seed=7)  # every table entry holds real pages
    static_lens = lens.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up (first-call attribute setup) outside the capture
            md, ns = torch_mla.get_metadata(static_lens, 2 * 32, 1)
            torch_mla.decode(q, kv, bt, static_lens, causal=True, tile_scheduler_metadata=md, num_splits=ns)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        md, ns = torch_mla.get_metadata(static_lens, 2 * 32, 1)
        out_g, lse_g = torch_mla.decode(q, kv, bt, static_lens, causal=True, tile_scheduler_metadata=md, num_splits=ns)
        out_i, lse_i = torch_mla.decode(q, kv, bt, static_lens, causal=True)  # plans internally
    for new in ([700, 64, 1, 2000], [2, 1000, 0, 1999], [64, 64, 64, 64], [1500, 3, 640, 17]):
        static_lens.copy_(torch.tensor(new, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        out_e, lse_e = torch_mla.decode(q, kv, bt, static_lens, causal=True)
        assert torch.equal(out_g, out_e) and torch.equal(lse_g, lse_e)
        assert torch.equal(out_i, out_e) and torch.equal(lse_i, lse_e)


def test_torch_compile_reduce_overhead_matches_eager():
    q, kv, bt, lens = paged_inputs([3000] * 3, h_q=128, device="cuda", seed=9)

    def step(q, kv, bt, lens):
        md, ns = torch.ops.mla.get_metadata(lens, q.shape[1] * q.shape[2], 1)
        return torch.ops.mla.decode(q, kv, bt, lens, HEAD_DIM_V, None, True, md, ns)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, mode="reduce-overhead")
    static_lens = lens.clone()
    for new in ([900, 65, 3000], [1, 2, 3], [64, 4000 - 64 * 60, 1000]):
        static_lens.copy_(torch.tensor(new, dtype=torch.int32))
        out_c, lse_c = compiled(q, kv, bt, static_lens)
        out_e, lse_e = step(q, kv, bt, static_lens)
        assert torch.equal(out_c, out_e) and torch.equal(lse_c, lse_e)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_write_cache_matches_reference(dtype, slot_dtype):
    g = torch.Generator().manual_seed(1)
    num_blocks, tokens = 6, 150
    cache = torch.randn(num_blocks, PAGE_SIZE, 1, HEAD_DIM, generator=g).to(dtype)
    kv_c = torch.randn(tokens, 700, generator=g).to(dtype)[:, :HEAD_DIM_V]  # a row stride != 512
    k_pe = torch.randn(tokens, ROPE_DIM, generator=g).to(dtype)
    slots = torch.randperm(num_blocks * PAGE_SIZE, generator=g)[:tokens]
    slots[::7] = -1
    slots = slots.to(slot_dtype)
    expected = cache.clone()
    torch_mla.reference.write_cache(kv_c, k_pe, expected, slots)
    got = cache.cuda()
    torch_mla.write_cache(kv_c.cuda(), k_pe.cuda(), got, slots.cuda())
    assert torch.equal(got.cpu(), expected)


def test_write_cache_then_decode_sees_the_new_tokens():
    q, kv, bt, lens = paged_inputs([130], h_q=16, device="cuda", seed=2)
    new_c = torch.randn(3, HEAD_DIM_V, device="cuda").bfloat16()
    new_pe = torch.randn(3, ROPE_DIM, device="cuda").bfloat16()
    pos = torch.arange(130, 133, device="cuda")
    slots = bt[0, pos // PAGE_SIZE].long() * PAGE_SIZE + pos % PAGE_SIZE
    torch_mla.write_cache(new_c, new_pe, kv, slots)
    lens2 = torch.tensor([133], dtype=torch.int32, device="cuda")
    out, lse = torch_mla.decode(q, kv, bt, lens2)
    ref_out, ref_lse = naive_decode(q, kv, bt, lens2)
    assert (out.cpu().double() - ref_out).norm() / ref_out.norm() <= OUT_REL


@pytest.mark.parametrize("seqlens,s_q,h_q,use_metadata", [
    ([65, 1, 200], 2, 16, False),
    ([4097, 33], 2, 128, True),
    ([0, 130, 7], 1, 1, False),
    ([1000], 3, 1, True),
])
def test_strided_inputs_give_bit_identical_results(seqlens, s_q, h_q, use_metadata):
    # q a slice of a wider projection, the cache one layer of a padded buffer, the table a column slice
    q, kv, bt, lens = paged_inputs(seqlens, s_q=s_q, h_q=h_q, device="cuda", seed=4)
    md, ns = torch_mla.get_metadata(lens, s_q * h_q, 1) if use_metadata else (None, None)
    views = strided_like(q, kv, bt)
    expected = torch_mla.decode(q, kv, bt, lens, causal=True, tile_scheduler_metadata=md, num_splits=ns)
    got = torch_mla.decode(*views, lens, causal=True, tile_scheduler_metadata=md, num_splits=ns)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_strided_cache_of_a_single_block_and_batch_one_query_row():
    # size-1 dims: their strides are anything, the kernel must not use them
    q, kv, bt, lens = paged_inputs([40], h_q=1, device="cuda", extra_blocks=0, spare_table_cols=0, seed=6)
    q_view = q.expand(1, 1, 1, HEAD_DIM).as_strided(q.shape, (7, 3, 5, 1))
    kv_view = torch.empty(1, 2 * PAGE_SIZE, 1, HEAD_DIM + 64, dtype=kv.dtype, device="cuda")[:, ::2, :, :HEAD_DIM]
    kv_view.copy_(kv)
    expected = torch_mla.decode(q, kv, bt, lens)
    got = torch_mla.decode(q_view, kv_view, bt, lens)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_write_cache_into_a_strided_cache_matches_reference():
    g = torch.Generator().manual_seed(8)
    buffer = torch.randn(2, 5, PAGE_SIZE, 1, HEAD_DIM + 64, generator=g).bfloat16()
    kv_c = torch.randn(40, HEAD_DIM_V, generator=g).bfloat16()
    k_pe = torch.randn(40, ROPE_DIM, generator=g).bfloat16()
    slots = torch.randperm(5 * PAGE_SIZE, generator=g)[:40]
    slots[::9] = -1
    expected = buffer.clone()
    torch_mla.reference.write_cache(kv_c, k_pe, expected[1, ..., :HEAD_DIM], slots)
    got = buffer.cuda()
    torch_mla.write_cache(kv_c.cuda(), k_pe.cuda(), got[1, ..., :HEAD_DIM], slots.cuda())
    assert torch.equal(got.cpu(), expected)


DEBUG_SCRIPT = """
import torch, torch_mla
from torch_mla.testing import paged_inputs
assert torch_mla.has_cuda_kernel()
q, kv, bt, lens = paged_inputs([10, 70], s_q=2, h_q=4, device="cuda")
bad = torch.tensor([10, 10 ** 4], dtype=torch.int32, device="cuda")
for mode in (torch.inference_mode, torch.no_grad, torch.enable_grad):
    with mode():
        try:
            torch_mla.decode(q, kv, bt, bad)
            print("decode: no error")
        except ValueError as e:
            print(e)
        try:
            torch_mla.write_cache(kv[0, :2, 0, :512].clone(), kv[0, :2, 0, 512:].clone(), kv,
                                  torch.tensor([5, 5], device="cuda"))
            print("write_cache: no error")
        except ValueError as e:
            print(e)
"""


def test_debug_mode_checks_values_in_every_grad_mode():
    env = {**os.environ, "TORCH_MLA_DEBUG": "1"}
    run = subprocess.run([sys.executable, "-c", DEBUG_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == 6, run.stdout
    assert all(line.startswith("mla.decode: cache_seqlens must lie in [0, 192]") for line in lines[0::2]), run.stdout
    assert all(line == "mla.write_cache: slot_mapping holds a slot twice; each token needs its own slot"
               for line in lines[1::2]), run.stdout
