"""torch.library.opcheck on every mla op: schema, fake impl, autograd registration, AOT dispatch.

With float8 inputs opcheck's schema test cannot run (it compares inputs before and after with
torch.allclose, which has no float8 kernel on the CPU); there the other three run, and
test_fp8_inputs_are_mutated_only_as_the_schema_says checks the schema's mutation claims bitwise.
"""

import pytest
import torch

import torch_mla  # noqa: F401
from torch_mla.ops import HEAD_DIM, HEAD_DIM_V, PAGE_SIZE, ROPE_DIM
from torch_mla.testing import paged_inputs


def decode_samples():
    yield "decode s_q=1", paged_inputs([17, 64, 130], h_q=16), dict(causal=False)
    yield "decode causal s_q=3", paged_inputs([5, 90], s_q=3, h_q=4, dtype=torch.float16), dict(causal=True)
    yield "decode fp32 scale", paged_inputs([1], h_q=128, block_size=16, dtype=torch.float32), dict(softmax_scale=0.1)
    yield "decode empty seq", paged_inputs([0, 2], h_q=2), dict()
    q, kv, bt, sl = paged_inputs([33, 7], s_q=2, h_q=8)
    md, ns = torch_mla.get_metadata(sl, 16, 1)
    yield "decode with metadata", (q, kv, bt, sl), dict(tile_scheduler_metadata=md, num_splits=ns, causal=True)
    scale = torch.tensor([0.03])
    q, kv, bt, sl = paged_inputs([17, 64, 130], s_q=2, h_q=8)
    yield "decode fp8 cache", (q, kv.to(torch.float8_e4m3fn), bt, sl), dict(descale_k=scale, causal=True)
    yield "decode fp8 q and cache", (q.to(torch.float8_e4m3fn), kv.to(torch.float8_e4m3fn), bt, sl), dict(
        descale_q=scale.reshape(()), descale_k=scale)


@pytest.mark.parametrize("name,tensors,kwargs", list(decode_samples()), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck_decode(name, tensors, kwargs):
    q, kv, bt, sl = tensors
    args = (q, kv, bt, sl, HEAD_DIM_V, kwargs.get("softmax_scale"), kwargs.get("causal", False),
            kwargs.get("tile_scheduler_metadata"), kwargs.get("num_splits"), kwargs.get("descale_q"),
            kwargs.get("descale_k"))
    torch.library.opcheck(torch.ops.mla.decode.default, args, test_utils=_test_utils(args))


@pytest.mark.gpu
@pytest.mark.parametrize("name,tensors,kwargs", [s for s in decode_samples() if s[1][1].shape[1] == PAGE_SIZE],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck_decode_on_the_cuda_kernel(name, tensors, kwargs):
    # The same samples on the CUDA kernels (block size 64 only): the fake impl against the bf16
    # and the FP8 kernel's outputs, and their registration.
    if not torch.cuda.is_available() or not torch_mla.has_cuda_kernel():
        pytest.skip("needs a CUDA GPU and the kernel")
    q, kv, bt, sl = (t.cuda() for t in tensors)
    kw = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    if kw.get("tile_scheduler_metadata") is not None:  # a CUDA plan, as the kernel takes it
        kw["tile_scheduler_metadata"], kw["num_splits"] = torch_mla.get_metadata(sl, q.shape[1] * q.shape[2], 1)
    args = (q, kv, bt, sl, HEAD_DIM_V, kw.get("softmax_scale"), kw.get("causal", False),
            kw.get("tile_scheduler_metadata"), kw.get("num_splits"), kw.get("descale_q"), kw.get("descale_k"))
    torch.library.opcheck(torch.ops.mla.decode.default, args, test_utils=_test_utils(args))


FP8 = torch.float8_e4m3fn


def _test_utils(args):
    fp8 = any(isinstance(a, torch.Tensor) and a.dtype == FP8 for a in args)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    return utils[1:] if fp8 else utils


def _bits(t):
    return t.view(torch.uint8).clone() if t.dtype == FP8 else t.clone()


def test_fp8_inputs_are_mutated_only_as_the_schema_says():
    q, kv, bt, sl = paged_inputs([17, 130], s_q=2, h_q=8)
    q8, kv8, scale = q.to(FP8), kv.to(FP8), torch.tensor([0.03])
    inputs = (q8, kv8, bt, sl, scale)
    before = [_bits(t) for t in inputs]
    torch.ops.mla.decode(q8, kv8, bt, sl, HEAD_DIM_V, None, True, None, None, scale, scale)
    assert all(torch.equal(_bits(t), b) for t, b in zip(inputs, before)), "decode mutates none of its inputs"
    kv_c, k_pe, slots = torch.randn(2, HEAD_DIM_V), torch.randn(2, ROPE_DIM), torch.tensor([0, 200])
    inputs = (kv_c, k_pe, slots, scale)
    before = [_bits(t) for t in inputs]
    cache_before = _bits(kv8)
    torch.ops.mla.write_cache(kv_c, k_pe, kv8, slots, scale)
    assert all(torch.equal(_bits(t), b) for t, b in zip(inputs, before)), "write_cache mutates only kv_cache"
    assert not torch.equal(_bits(kv8), cache_before)


@pytest.mark.parametrize("seqlens,tokens", [([1], 1), ([3, 4096, 0], 16), ([70] * 9, 256)])
def test_opcheck_get_metadata(seqlens, tokens):
    torch.library.opcheck(torch.ops.mla.get_metadata.default, (torch.tensor(seqlens, dtype=torch.int32), tokens, 1))


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_opcheck_write_cache(slot_dtype, dtype):
    kv_cache = torch.randn(4, PAGE_SIZE, 1, HEAD_DIM).to(dtype)
    kv_c = torch.randn(5, HEAD_DIM_V).to(dtype)
    k_pe = torch.randn(5, ROPE_DIM).to(dtype)
    slots = torch.tensor([3, -1, 70, 255, 128], dtype=slot_dtype)
    torch.library.opcheck(torch.ops.mla.write_cache.default, (kv_c, k_pe, kv_cache, slots))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_opcheck_write_cache_into_an_fp8_cache(dtype):
    kv_cache = torch.randn(4, PAGE_SIZE, 1, HEAD_DIM).to(torch.float8_e4m3fn)
    kv_c = torch.randn(5, HEAD_DIM_V).to(dtype) * 100  # some beyond 448 * scale: saturated
    k_pe = torch.randn(5, ROPE_DIM).to(dtype)
    slots = torch.tensor([3, -1, 70, 255, 128])
    args = (kv_c, k_pe, kv_cache, slots, torch.tensor([0.5]))
    torch.library.opcheck(torch.ops.mla.write_cache.default, args, test_utils=_test_utils(args))
