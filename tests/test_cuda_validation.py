"""The CUDA impls reject bad input with ops.py's own messages, and name what only the kernel needs.

ops.py holds the argument rules and their messages once; the CUDA impls test bare predicates
and, when one fails, raise the message of ops.py's check function. For each case of
tests/test_validation.py, the arguments are built on the GPU and broken the same way; the CUDA
error must equal the one ops.check_decode_args raises on the same arguments (so a predicate that
drifts from its rule shows here). Then the checks only the Hopper kernel makes.
"""

import re

import pytest
import torch

import torch_mla
from torch_mla import ops
from torch_mla.ops import HEAD_DIM
from test_validation import DECODE_CASES, SCALE, call_decode, valid_decode_args

pytestmark = pytest.mark.gpu
FP8 = torch.float8_e4m3fn


def _cuda_args():
    return {k: v.cuda() for k, v in valid_decode_args().items()}


def _python_message(a):
    with pytest.raises(ValueError) as info:
        ops.check_decode_args(a["q"], a["kv_cache"], a["block_table"], a["cache_seqlens"], a.get("head_dim_v", 512),
                              a.get("softmax_scale"), a.get("tile_scheduler_metadata"), a.get("num_splits"),
                              a.get("descale_q"), a.get("descale_k"))
    return str(info.value)


CUDA_CASES = dict(DECODE_CASES)
CUDA_CASES["devices mixed"] = (lambda a: {**a, "block_table": a["block_table"].cpu()}, "block_table is on cpu but q is on cuda")
CUDA_CASES["nan scale"] = (lambda a: {**a, "softmax_scale": float("nan")}, "softmax_scale must be a positive finite number, got nan")
CUDA_CASES["tiny scale"] = (lambda a: {**a, "softmax_scale": -1e-05}, "got -1e-05")
CUDA_CASES["descale_k elsewhere"] = (DECODE_CASES["descale_k elsewhere"][0], "descale_k is on meta but q is on cuda")


@pytest.mark.parametrize("case", list(CUDA_CASES))
def test_cuda_and_compiled_error_messages_equal_python_message(case):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    assert torch_mla.has_cuda_kernel()
    break_args, fragment = CUDA_CASES[case]
    args = break_args(_cuda_args())
    # metadata and scales given in a case live on the CPU: move them next to q
    for k in ("tile_scheduler_metadata", "num_splits", "descale_q", "descale_k"):
        if args.get(k) is not None and args[k].device.type == "cpu":
            args[k] = args[k].cuda()
    expected = _python_message(args)
    assert fragment in expected
    with pytest.raises(ValueError) as info:
        call_decode(**args)
    assert str(info.value) == expected
    torch._dynamo.reset()
    with pytest.raises(Exception, match=re.escape(expected)):
        torch.compile(call_decode, fullgraph=True, backend="eager")(**args)


def test_cuda_only_rules_have_clear_messages():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    a = _cuda_args()
    with pytest.raises(ValueError, match=re.escape("mla.decode: q must be bfloat16, float16 or (with an FP8 cache) float8_e4m3fn on CUDA, got float32")):
        call_decode(**{**a, "q": a["q"].float(), "kv_cache": a["kv_cache"].float()})
    kv32 = a["kv_cache"].reshape(-1, 32, 1, HEAD_DIM)
    with pytest.raises(ValueError, match=re.escape("mla.decode: kv_cache must have block_size (size 1) 64 on CUDA, got 32")):
        call_decode(**{**a, "kv_cache": kv32})


def test_cuda_kernel_names_the_strides_it_cannot_take():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    a = _cuda_args()
    q = a["q"]  # [2, 2, 4, 576]: s_q and h_q > 1
    heads_outer = q.transpose(1, 2).contiguous().transpose(1, 2)  # unit last stride, rows not one stride apart
    with pytest.raises(ValueError, match=re.escape("q.stride(1) == h_q * q.stride(2); got strides (4608, 576, 1152, 1)")):
        call_decode(**{**a, "q": heads_outer})
    odd_rows = torch.zeros(*q.shape[:3], HEAD_DIM + 4, dtype=q.dtype, device="cuda")[..., :HEAD_DIM]  # 1160-byte rows
    with pytest.raises(ValueError, match=re.escape("loads q by TMA, which needs its strides to be positive multiples of 16 bytes")):
        call_decode(**{**a, "q": odd_rows})
    shifted = torch.zeros(*q.shape[:3], HEAD_DIM + 8, dtype=q.dtype, device="cuda")[..., 4:4 + HEAD_DIM]
    with pytest.raises(ValueError, match=re.escape("and its data 16-byte aligned; got strides (4672, 2336, 584, 1) and data at byte 8 mod 16")):
        call_decode(**{**a, "q": shifted})
    kv = a["kv_cache"]
    padded = torch.zeros(*kv.shape[:3], HEAD_DIM + 4, dtype=kv.dtype, device="cuda")[..., :HEAD_DIM]
    with pytest.raises(ValueError, match=re.escape("loads kv_cache by TMA")):
        call_decode(**{**a, "kv_cache": padded})


def test_cuda_get_metadata_and_write_cache_messages_equal_python():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    lens = torch.tensor([3, 4], dtype=torch.int32, device="cuda")
    for args in ((lens.long(), 16, 1), (lens, 0, 1), (lens, 16, 2), (lens[None], 16, 1)):
        with pytest.raises(ValueError) as py:
            ops.check_get_metadata_args(*args)
        with pytest.raises(ValueError) as cu:
            torch.ops.mla.get_metadata(*args)
        assert str(cu.value) == str(py.value)
    base = dict(kv_c=torch.randn(2, 512), k_pe=torch.randn(2, 64), kv_cache=torch.zeros(2, 64, 1, HEAD_DIM),
                slot_mapping=torch.tensor([0, 1]))
    bad = [dict(kv_c=torch.randn(2, 500)), dict(k_pe=torch.randn(2, 32)), dict(kv_c=torch.randn(2, 512).half()),
           dict(slot_mapping=torch.tensor([0.0, 1.0])), dict(slot_mapping=torch.tensor([0, 1, 2])),
           dict(kv_cache=torch.zeros(2, 64, HEAD_DIM)), dict(kv_c=torch.randn(2, 512, requires_grad=True)),
           dict(kv_cache=torch.zeros(2, 64, 1, HEAD_DIM, dtype=FP8)), dict(scale=SCALE),
           dict(kv_cache=torch.zeros(2, 64, 1, HEAD_DIM, dtype=FP8), scale=torch.ones(2)),
           dict(kv_cache=torch.zeros(2, 64, 1, HEAD_DIM, dtype=FP8), scale=SCALE, kv_c=torch.randn(2, 512).half())]
    for change in bad:
        args = {k: v.cuda() for k, v in {**base, **change}.items()}
        if change.get("kv_c") is not None and change["kv_c"].requires_grad:
            args["kv_c"] = change["kv_c"].detach().cuda().requires_grad_()
        _assert_write_cache_messages_equal(args)
    # layouts, made on the GPU (moving a view there would make it contiguous)
    cuda = {k: v.cuda() for k, v in base.items()}
    for name, view in (("kv_cache", torch.zeros(2, 64, 1, HEAD_DIM, 2, device="cuda")[..., 0]),
                       ("kv_c", torch.randn(2, 512, 2, device="cuda")[..., 0]),
                       ("slot_mapping", torch.tensor([[0, 9], [1, 9]], device="cuda")[:, 0])):
        _assert_write_cache_messages_equal({**cuda, name: view})


def _assert_write_cache_messages_equal(args):
    with pytest.raises(ValueError) as py:
        ops.check_write_cache_args(**args)
    with pytest.raises(ValueError) as cu:
        torch.ops.mla.write_cache(args["kv_c"], args["k_pe"], args["kv_cache"], args["slot_mapping"], args.get("scale"))
    assert str(cu.value) == str(py.value)


def test_cuda_fp8_kernel_refuses_what_it_cannot_load_by_name():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    assert torch_mla.has_cuda_kernel()
    a = _cuda_args()
    scale = SCALE.cuda()
    fp8 = {**a, "kv_cache": a["kv_cache"].to(FP8), "descale_k": scale}
    call_decode(**fp8)  # taken
    small_blocks = {**fp8, "kv_cache": torch.zeros(4, 32, 1, HEAD_DIM, dtype=FP8, device="cuda")}
    with pytest.raises(ValueError, match=re.escape("mla.decode: kv_cache must have block_size (size 1) 64 on CUDA")):
        call_decode(**small_blocks)
    # an e4m3 q whose rows are 584 bytes apart: TMA needs multiples of 16 bytes
    wide = torch.zeros(*a["q"].shape[:-1], HEAD_DIM + 8, dtype=FP8, device="cuda")[..., :HEAD_DIM]
    with pytest.raises(ValueError, match=re.escape("mla.decode: the CUDA kernel loads q by TMA")):
        call_decode(**{**fp8, "q": wide, "descale_q": scale})
