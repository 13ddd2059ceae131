"""torch_mla.flash_mla and torch_mla's FlashMLA names, called as serving engines call FlashMLA.

The calls are written as these files write them (positions and keywords), at these commits:
- vLLM vllm/v1/attention/backends/mla/flashmla.py @ 01b1d34 (FlashMLA's 2026 interface: a
  scheduler object; the FP8 cache through flash_mla_with_kvcache_fp8 with descale_q /
  descale_k of shape [1]) and vllm/v1/attention/ops/flashmla.py @ 055e47c (the FP8 entry point);
- SGLang python/sglang/srt/layers/attention/flashmla_backend.py @ 3d7da5a (FlashMLA's 2025
  interface: metadata tensors; its FP8 branch: q quantized with layer.k_scale, descale_q =
  descale_k = layer.k_scale.reshape(1)), and sgl_kernel.flash_mla's `is_fp8_kvcache=` keyword;
- FlashMLA tests/test_flash_mla_dense_decoding.py @ 9241ae3 (its own call of both).
Each result is compared with torch_mla.decode on the same inputs (the CPU ignores the plan, so
equal means equal), or with the float64 oracle where the compat layer computes (attn_sink).
"""

import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, strategies as st

import torch_mla
import torch_mla.flash_mla as flash_mla
from oracle import naive_decode
from torch_mla.testing import paged_inputs

PAGE_SIZE = 64
KV_LORA_RANK = 512


def inputs(seqlens, s_q=1, h_q=16, dtype=torch.bfloat16, seed=0):
    return paged_inputs(seqlens, s_q=s_q, h_q=h_q, block_size=PAGE_SIZE, dtype=dtype,
                        generator=torch.Generator().manual_seed(seed))


def assert_same(got, expected):
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_vllm_scheduler_object_serves_every_layer_of_a_step():
    s_q, num_q_heads, scale = 2, 16, 0.1
    seq_lens = torch.tensor([130, 7, 64], dtype=torch.int32)
    # FlashMLAMetadataBuilder._build_decode
    num_q_tokens_per_head_k = s_q * num_q_heads // 1
    scheduler_metadata, _ = flash_mla.get_mla_metadata(seq_lens, num_q_tokens_per_head_k, 1, is_fp8_kvcache=False)
    for layer in range(3):
        q, kv, block_table, _ = inputs(seq_lens.tolist(), s_q=s_q, h_q=num_q_heads, seed=layer)
        kv_c_and_k_pe_cache = kv.squeeze(2)  # vLLM's cache: [num_blocks, block_size, 576]
        # FlashMLAImpl._forward_decode
        o, lse = flash_mla.flash_mla_with_kvcache(
            q=q,
            k_cache=kv_c_and_k_pe_cache.unsqueeze(-2),
            block_table=block_table,
            cache_seqlens=seq_lens,
            head_dim_v=KV_LORA_RANK,
            tile_scheduler_metadata=scheduler_metadata,
            softmax_scale=scale,
            causal=True,
            is_fp8_kvcache=False,
        )
        assert_same((o, lse), torch_mla.decode(q, kv, block_table, seq_lens, softmax_scale=scale, causal=True))
    assert scheduler_metadata.have_initialized
    assert scheduler_metadata.num_splits.shape == (4,)


@pytest.mark.parametrize("change, field", [
    (dict(seqlens=[130, 7]), "b=3"),
    (dict(s_q=2), "s_q=1"),
    (dict(h_q=8), "h_q=16"),
    (dict(causal=False), "causal=True"),
])
def test_scheduler_object_reused_with_other_shapes_is_an_error(change, field):
    sched, _ = flash_mla.get_mla_metadata()
    q, kv, bt, lens = inputs([130, 7, 64])
    flash_mla.flash_mla_with_kvcache(q, kv, bt, lens, 512, sched, None, causal=True)
    args = dict(seqlens=[130, 7, 64], s_q=1, h_q=16, causal=True) | change
    q, kv, bt, lens = inputs(args["seqlens"], s_q=args["s_q"], h_q=args["h_q"], seed=1)
    with pytest.raises(ValueError, match=f"planned for {field}"):
        flash_mla.flash_mla_with_kvcache(q, kv, bt, lens, 512, sched, None, causal=args["causal"])


def test_flashmla_own_test_calls_match_decode():
    q, blocked_k, block_table, cache_seqlens = inputs([300, 2, 65], s_q=2, h_q=32)
    tile_scheduler_metadata, num_splits = flash_mla.get_mla_metadata()
    got = flash_mla.flash_mla_with_kvcache(q, blocked_k, block_table, cache_seqlens, 512, tile_scheduler_metadata,
                                           num_splits, causal=True)
    assert num_splits is None
    assert_same(got, torch_mla.decode(q, blocked_k, block_table, cache_seqlens, causal=True))


@pytest.mark.parametrize("fp8_keyword", [False, True])
@pytest.mark.parametrize("table_slice", [False, True])
def test_sglang_metadata_tensors_match_decode(fp8_keyword, table_slice):
    from torch_mla import flash_mla_with_kvcache, get_mla_metadata

    Q_LEN, num_q_heads, scaling = 1, 16, 0.08
    q, k_cache, block_kv_indices, seq_lens = inputs([200, 64, 0, 3], h_q=num_q_heads)
    if table_slice:  # under CUDA graphs SGLang passes cuda_graph_kv_indices[:bs, :max_seqlen_pad]
        wide = torch.full((block_kv_indices.shape[0], block_kv_indices.shape[1] + 7), -1, dtype=torch.int32)
        wide[:, :block_kv_indices.shape[1]] = block_kv_indices
        block_kv_indices = wide[:, :block_kv_indices.shape[1]]
        assert not block_kv_indices.is_contiguous()
    kw = dict(is_fp8_kvcache=False) if fp8_keyword else {}  # sgl_kernel.flash_mla passes it
    # FlashMLABackend.init_forward_metadata
    mla_metadata, num_splits = get_mla_metadata(seq_lens.to(torch.int32), Q_LEN * num_q_heads, 1, **kw)
    assert mla_metadata.dtype == num_splits.dtype == torch.int32 and num_splits.shape == (5,)
    # FlashMLABackend.forward_decode
    reshape_q = q.view(4, -1, num_q_heads, 576)
    o, _ = flash_mla_with_kvcache(
        q=reshape_q,
        k_cache=k_cache.view(-1, PAGE_SIZE, 1, 576),
        block_table=block_kv_indices,
        cache_seqlens=seq_lens.to(torch.int32),
        head_dim_v=KV_LORA_RANK,
        tile_scheduler_metadata=mla_metadata,
        num_splits=num_splits,
        softmax_scale=scaling,
        causal=False,
    )
    assert torch.equal(o, torch_mla.decode(q, k_cache, block_kv_indices, seq_lens, softmax_scale=scaling)[0])


def test_vllm_fp8_entry_point_without_descales_matches_decode():
    q, kv, bt, lens = inputs([100, 5])
    tile_scheduler_metadata, num_splits = flash_mla.get_mla_metadata_dense_fp8(lens, 16, 1)
    got = flash_mla.flash_mla_with_kvcache_fp8(q=q, k_cache=kv, block_table=bt, cache_seqlens=lens, head_dim_v=512,
                                               tile_scheduler_metadata=tile_scheduler_metadata,
                                               num_splits=num_splits, softmax_scale=0.1, causal=True)
    assert_same(got, torch_mla.decode(q, kv, bt, lens, softmax_scale=0.1, causal=True))


FP8 = torch.float8_e4m3fn


def fp8_inputs(seqlens, s_q=1, h_q=16, k_scale=0.02, q_scale=0.05, seed=0):
    """An e4m3 cache and query (quantized from bf16 ones) with their [1] float32 scales."""
    q, kv, bt, lens = inputs(seqlens, s_q=s_q, h_q=h_q, seed=seed)
    k_scale, q_scale = torch.tensor([k_scale]), torch.tensor([q_scale])
    return torch_mla.quantize_fp8(q, q_scale), torch_mla.quantize_fp8(kv, k_scale), bt, lens, q_scale, k_scale


def test_vllm_fp8_decode_matches_decode():
    s_q, num_q_heads, scale = 2, 16, 0.1
    q, kv, block_table, seq_lens, q_scale, k_scale = fp8_inputs([130, 7, 64], s_q=s_q, h_q=num_q_heads)
    layer = SimpleNamespace(_q_scale=q_scale.reshape(()), _k_scale=k_scale.reshape(()))  # vLLM keeps 0-d scales
    # FlashMLAMetadataBuilder._build_decode with is_fp8_kvcache
    num_q_tokens_per_head_k = s_q * num_q_heads // 1
    scheduler_metadata, _ = flash_mla.get_mla_metadata(seq_lens, num_q_tokens_per_head_k, 1, is_fp8_kvcache=True)
    tile_scheduler_metadata, num_splits = flash_mla.get_mla_metadata_dense_fp8(seq_lens, num_q_tokens_per_head_k, 1)
    scheduler_metadata.tile_scheduler_metadata = tile_scheduler_metadata
    scheduler_metadata.num_splits = num_splits
    kv_c_and_k_pe_cache = kv.squeeze(2)
    # FlashMLAImpl._forward_decode, kv_cache_dtype "fp8"
    o, lse = flash_mla.flash_mla_with_kvcache_fp8(
        q=q,
        k_cache=kv_c_and_k_pe_cache.unsqueeze(-2),  # Add head dim of 1
        block_table=block_table,
        cache_seqlens=seq_lens,
        head_dim_v=KV_LORA_RANK,
        tile_scheduler_metadata=scheduler_metadata.tile_scheduler_metadata,
        num_splits=scheduler_metadata.num_splits,
        softmax_scale=scale,
        causal=True,
        descale_q=layer._q_scale.reshape(1),
        descale_k=layer._k_scale.reshape(1),
    )
    assert o.dtype == torch.bfloat16  # as vLLM's FP8 FlashMLA returns
    assert_same((o, lse), torch_mla.decode(q, kv, block_table, seq_lens, softmax_scale=scale, causal=True,
                                           descale_q=q_scale, descale_k=k_scale))


def test_sglang_fp8_decode_matches_decode():
    from torch_mla import flash_mla_with_kvcache, get_mla_metadata

    Q_LEN, num_q_heads, scaling = 1, 16, 0.08
    q, k_cache, block_kv_indices, seq_lens = inputs([200, 64, 0, 3], h_q=num_q_heads)
    k_scale = torch.tensor([0.03])
    k_cache = torch_mla.quantize_fp8(k_cache, k_scale)  # SGLang's set_kv_buffer, kv_cache_dtype fp8_e4m3
    layer = SimpleNamespace(k_scale=k_scale, scaling=scaling)
    mla_metadata, num_splits = get_mla_metadata(seq_lens.to(torch.int32), Q_LEN * num_q_heads, 1, is_fp8_kvcache=True)
    # FlashMLABackend.forward_decode, is_fp8_kvcache
    reshape_q = q.view(4, -1, num_q_heads, 576)
    q_scale = layer.k_scale
    descale_q = layer.k_scale.reshape(1)
    descale_k = layer.k_scale.reshape(1)
    q_shape = reshape_q.shape
    reshape_q_fp8 = torch_mla.quantize_fp8(reshape_q.reshape(-1, q_shape[-1]), q_scale).reshape(q_shape)  # scaled_fp8_quant
    o, _ = flash_mla_with_kvcache(
        q=reshape_q_fp8,
        k_cache=k_cache.view(-1, PAGE_SIZE, 1, 576),
        block_table=block_kv_indices[:4],
        cache_seqlens=seq_lens.to(torch.int32),
        head_dim_v=KV_LORA_RANK,
        tile_scheduler_metadata=mla_metadata,
        num_splits=num_splits,
        softmax_scale=layer.scaling,
        causal=True,
        descale_q=descale_q,
        descale_k=descale_k,
    )
    expected = torch_mla.decode(reshape_q_fp8, k_cache, block_kv_indices, seq_lens, softmax_scale=scaling,
                                causal=True, descale_q=descale_q, descale_k=descale_k)[0]
    assert torch.equal(o, expected)


def test_flashmla_scheduler_object_with_an_fp8_cache_and_bf16_query():
    q, kv, bt, lens = inputs([300, 2, 65], s_q=2, h_q=32)
    k_scale = torch.tensor([0.02])
    kv8 = torch_mla.quantize_fp8(kv, k_scale)
    sched, _ = flash_mla.get_mla_metadata()
    out, lse = flash_mla.flash_mla_with_kvcache(q, kv8, bt, lens, 512, sched, None, causal=True, is_fp8_kvcache=True,
                                                descale_k=k_scale)
    assert sched.config.is_fp8_kvcache and out.dtype == torch.bfloat16
    assert_same((out, lse), torch_mla.decode(q, kv8, bt, lens, causal=True, descale_k=k_scale))
    with pytest.raises(ValueError, match="planned for is_fp8_kvcache=True"):  # one plan, one cache kind
        flash_mla.flash_mla_with_kvcache(q, kv, bt, lens, 512, sched, None, causal=True)


@pytest.mark.parametrize("planner", [flash_mla.get_mla_metadata_tensors, flash_mla.get_mla_metadata_dense_fp8])
def test_fp8_plans_are_the_plans_of_the_lengths(planner):
    lens = torch.tensor([10, 300, 0], dtype=torch.int32)
    kwargs = dict(is_fp8_kvcache=True) if planner is flash_mla.get_mla_metadata_tensors else {}
    got = planner(lens, 16, 1, **kwargs)
    assert_same(got, torch_mla.get_metadata(lens, 16, 1))


def test_flashmla_own_fp8_format_is_not_implemented():
    q, kv, bt, lens = inputs([70, 3])
    flashmla_fp8 = torch.zeros(kv.shape[0], PAGE_SIZE, 1, 656, dtype=torch.uint8)  # 512 e4m3 + 4 scales + 64 bf16
    with pytest.raises(NotImplementedError, match="FlashMLA's FP8 rows .656 bytes, per-tile scales inside. are not implemented"):
        flash_mla.flash_mla_with_kvcache(q, flashmla_fp8, bt, lens, 512, None, is_fp8_kvcache=True)


def test_fp8_arguments_break_decode_rules_by_name():
    q, kv, bt, lens = inputs([70, 3])
    with pytest.raises(ValueError, match="kv_cache is float8_e4m3fn, so descale_k"):
        flash_mla.flash_mla_with_kvcache(q, kv.to(FP8), bt, lens, 512, None, is_fp8_kvcache=True)
    md, ns = flash_mla.get_mla_metadata_dense_fp8(lens, 16, 1)
    with pytest.raises(ValueError, match="descale_q is given but q is bfloat16"):  # vLLM quantizes q first
        flash_mla.flash_mla_with_kvcache_fp8(q, kv.to(FP8), bt, lens, 512, md, ns, descale_q=torch.ones(1),
                                             descale_k=torch.ones(1))


@pytest.mark.parametrize("planner", [flash_mla.get_mla_metadata, flash_mla.get_mla_metadata_tensors])
def test_metadata_for_sparse_is_not_implemented(planner):
    lens = torch.tensor([10], dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="topk"):
        planner(lens, 16, 1, 16, topk=2048)


@pytest.mark.parametrize("name", ["indices", "extra_k_cache", "extra_indices_in_kvcache", "topk_length",
                                  "extra_topk_length"])
def test_sparse_arguments_are_not_implemented(name):
    q, kv, bt, lens = inputs([70, 3])
    value = torch.zeros(2, 1, 64, dtype=torch.int32)
    sched, _ = flash_mla.get_mla_metadata()
    with pytest.raises(NotImplementedError, match=name):
        flash_mla.flash_mla_with_kvcache(q, kv, bt, lens, 512, sched, **{name: value})
    assert not sched.have_initialized


def test_num_splits_beside_a_scheduler_object_is_an_error():
    q, kv, bt, lens = inputs([70, 3])
    sched, _ = flash_mla.get_mla_metadata()
    with pytest.raises(ValueError, match="num_splits must be None"):
        flash_mla.flash_mla_with_kvcache(q, kv, bt, lens, 512, sched, torch.zeros(3, dtype=torch.int32))


@pytest.mark.parametrize("sink, message", [
    (torch.zeros(8), r"attn_sink must be 1-D \[h_q\] = \[16\]"),
    (torch.zeros(16, dtype=torch.float64), "attn_sink must be float32"),
])
def test_bad_attn_sink_is_an_error_naming_it(sink, message):
    q, kv, bt, lens = inputs([70, 3])
    with pytest.raises(ValueError, match=message):
        flash_mla.flash_mla_with_kvcache(q, kv, bt, lens, 512, None, attn_sink=sink)


@pytest.mark.parametrize("plan", ["object", "tensors", "none"])
def test_engine_layouts_reach_decode_as_given(plan, monkeypatch):
    """q a slice of a larger projection, the cache one layer of a larger buffer, the block table
    a column slice (SGLang's cuda_graph_kv_indices[:bs, :max_seqlen_pad]): no copy on the way."""
    seen = {}

    def record(q, kv_cache, block_table, cache_seqlens, **kwargs):
        seen.update(q=q, kv_cache=kv_cache, block_table=block_table)
        return torch.zeros(*q.shape[:3], 512, dtype=q.dtype), torch.zeros(q.shape[0], q.shape[2], q.shape[1])

    monkeypatch.setattr(flash_mla.ops, "decode", record)
    lens = torch.tensor([70, 3], dtype=torch.int32)
    q = torch.randn(2, 1, 16, 700)[..., :576]
    kv = torch.randn(2, 4, PAGE_SIZE, 1, 576)[1]
    table = torch.zeros(2, 8, dtype=torch.int32)[:, :2]
    md, ns = {"object": flash_mla.get_mla_metadata(), "tensors": torch_mla.get_mla_metadata(lens, 16, 1),
              "none": (None, None)}[plan]
    flash_mla.flash_mla_with_kvcache(q, kv, table, lens, 512, md, ns)
    assert seen["q"] is q and seen["kv_cache"] is kv and seen["block_table"] is table


ULP = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 1e-6}


def sink_values(h_q, draw):
    special = st.sampled_from([math.inf, -math.inf, 0.0])
    return torch.tensor(draw(st.lists(st.one_of(st.floats(-20, 20), special), min_size=h_q, max_size=h_q)),
                        dtype=torch.float32)


@given(data=st.data(), plan=st.sampled_from(["object", "tensors", "none"]),
       dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]), s_q=st.integers(1, 3),
       seqlens=st.lists(st.one_of(st.just(0), st.integers(3, 200)), min_size=1, max_size=3))
def test_attn_sink_scales_out_and_leaves_lse_as_flashmla_defines(data, plan, dtype, s_q, seqlens):
    h_q = 4
    q, kv, bt, lens = paged_inputs(seqlens, s_q=s_q, h_q=h_q, block_size=16, dtype=dtype,
                                   generator=torch.Generator().manual_seed(len(seqlens)))
    sink = sink_values(h_q, data.draw)
    md, ns = {"object": flash_mla.get_mla_metadata(), "tensors": torch_mla.get_mla_metadata(lens, s_q * h_q, 1),
              "none": (None, None)}[plan]
    out, lse = flash_mla.flash_mla_with_kvcache(q, kv, bt, lens, 512, md, ns, causal=True, attn_sink=sink)

    ref_out, ref_lse = naive_decode(q, kv, bt, lens, causal=True)
    # FlashMLA tests/ref.py: output *= 1 / (1 + exp(attn_sink - lse)); rows that see nothing stay 0
    finite = torch.isfinite(ref_lse).transpose(1, 2)  # [b, s_q, h_q]
    factor = 1.0 / (1.0 + torch.exp(sink.double() - ref_lse.transpose(1, 2)))
    ref_out = torch.where(finite[..., None], ref_out * factor[..., None], torch.zeros((), dtype=torch.float64))

    assert torch.equal(lse, torch_mla.decode(q, kv, bt, lens, causal=True)[1])
    assert out.dtype == dtype and not out.isnan().any()
    # decode rounds out to dtype, the sink scaling rounds once more: two half-ulps, where a half-ulp
    # below the smallest normal (a large sink puts fp16's out there) is the subnormals' fixed one
    half_ulp = ULP[dtype] * torch.maximum(ref_out.abs(), torch.tensor(torch.finfo(dtype).tiny, dtype=torch.float64))
    bound = 2 * half_ulp + 1e-4 * ref_out.abs().max().clamp_min(1e-6)
    assert ((out.double() - ref_out).abs() <= bound).all()


def test_early_interface_compiles_as_one_graph_without_recompiling():
    def step(q, kv, bt, lens, sink):
        md, ns = torch_mla.get_mla_metadata(lens, q.shape[1] * q.shape[2], 1)
        return torch_mla.flash_mla_with_kvcache(q, kv, bt, lens, 512, md, ns, 0.1, True, attn_sink=sink)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    for i, seqlens in enumerate([[70, 5], [130, 1, 64]]):
        q, kv, bt, lens = inputs(seqlens, h_q=4, dtype=torch.float32, seed=i)
        sink = torch.tensor([0.0, 1.5, -math.inf, math.inf])
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            out, lse = compiled(q, kv, bt, lens, sink)
        expected = step(q, kv, bt, lens, sink)
        torch.testing.assert_close(out, expected[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(lse, expected[1])


@pytest.mark.gpu
def test_scheduler_object_and_attn_sink_on_the_gpu_kernel():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    assert torch_mla.has_cuda_kernel(), torch_mla.cuda_kernel_error()
    g = torch.Generator().manual_seed(5)
    q, kv, bt, lens = paged_inputs([3000, 65, 2, 700], s_q=2, h_q=64, device="cuda", generator=g)
    sink = torch.tensor([math.inf, -math.inf] + [0.5] * 62, device="cuda")
    md, ns = torch_mla.get_metadata(lens, 2 * 64, 1)
    expected = torch_mla.decode(q, kv, bt, lens, softmax_scale=0.1, causal=True, tile_scheduler_metadata=md,
                                num_splits=ns)
    sched, _ = flash_mla.get_mla_metadata(lens, 2 * 64, 1, is_fp8_kvcache=False)
    for _ in range(2):  # two layers, one plan
        assert_same(flash_mla.flash_mla_with_kvcache(q, kv, bt, lens, 512, sched, softmax_scale=0.1, causal=True),
                    expected)
    out, lse = flash_mla.flash_mla_with_kvcache(q, kv, bt, lens, 512, sched, softmax_scale=0.1, causal=True,
                                                attn_sink=sink)
    assert torch.equal(lse, expected[1])
    factor = 1.0 / (1.0 + torch.exp(sink.double() - expected[1].double().transpose(1, 2)))
    ref = expected[0].double() * factor[..., None]
    assert ((out.double() - ref).abs() <= 2.0 ** -8 * ref.abs() + 1e-30).all()
    assert (out[:, :, 0] == 0).all() and torch.equal(out[:, :, 1], expected[0][:, :, 1])
