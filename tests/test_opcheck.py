"""torch.library.opcheck on every mla op: schema, fake impl, autograd registration, AOT dispatch."""

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


@pytest.mark.parametrize("name,tensors,kwargs", list(decode_samples()), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck_decode(name, tensors, kwargs):
    q, kv, bt, sl = tensors
    args = (q, kv, bt, sl, HEAD_DIM_V, kwargs.get("softmax_scale"), kwargs.get("causal", False),
            kwargs.get("tile_scheduler_metadata"), kwargs.get("num_splits"))
    torch.library.opcheck(torch.ops.mla.decode.default, args)


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
