"""Bad input gets a clear error naming the argument, the same eagerly and under torch.compile.

Each case starts from valid arguments and breaks one thing. The expected text (plain, not a regex) is found in
the eager error, and the compiled call (torch.compile(fullgraph=True), fake tensors) must fail
with an error carrying the same message.
"""

import re

import pytest
import torch

import torch_mla
from torch_mla.testing import paged_inputs


def valid_decode_args():
    q, kv_cache, block_table, seqlens = paged_inputs([10, 70], s_q=2, h_q=4)
    return dict(q=q, kv_cache=kv_cache, block_table=block_table, cache_seqlens=seqlens)


def _every_other(t):
    """t's values in a view whose last dim has stride 2."""
    return torch.stack([t, t], dim=-1)[..., 0]


def _set(**changes):
    return lambda a: {**a, **{k: v(a) for k, v in changes.items()}}


DECODE_CASES = {
    "q float64": (_set(q=lambda a: a["q"].double()), "q must be bfloat16 or float16 or float32 or float8_e4m3fn, got float64"),
    "kv_cache other dtype": (_set(kv_cache=lambda a: a["kv_cache"].half()), "kv_cache must be bfloat16 or float8_e4m3fn, got float16"),
    "q head dim": (_set(q=lambda a: a["q"][..., :512].contiguous()), "q must have head dim (size -1) 576, got 512"),
    "kv_cache head dim": (_set(kv_cache=lambda a: a["kv_cache"][..., :512].contiguous()), "kv_cache must have head dim (size -1) 576, got 512"),
    "kv_cache heads": (_set(kv_cache=lambda a: a["kv_cache"].expand(-1, -1, 2, -1).contiguous()), "kv_cache must have num_heads_k (size 2) 1, got 2"),
    "q rank": (_set(q=lambda a: a["q"][:, 0]), "q must be 4-D [batch, s_q, h_q, 576], got shape (2, 4, 576)"),
    "kv_cache rank": (_set(kv_cache=lambda a: a["kv_cache"][:, :, 0]), "kv_cache must be 4-D"),
    "block_table rank": (_set(block_table=lambda a: a["block_table"][0]), "block_table must be 2-D"),
    "cache_seqlens rank": (_set(cache_seqlens=lambda a: a["cache_seqlens"][None]), "cache_seqlens must be 1-D"),
    "block_table int64": (_set(block_table=lambda a: a["block_table"].long()), "block_table must be int32, got int64"),
    "cache_seqlens int64": (_set(cache_seqlens=lambda a: a["cache_seqlens"].long()), "cache_seqlens must be int32, got int64"),
    "block_table batch": (_set(block_table=lambda a: a["block_table"][:1].contiguous()), "block_table must have batch (size 0) equal to q's 2, got 1"),
    "cache_seqlens batch": (_set(cache_seqlens=lambda a: a["cache_seqlens"][:1].contiguous()), "cache_seqlens must have batch (size 0) equal to q's 2, got 1"),
    "q last-dim stride": (_set(q=lambda a: _every_other(a["q"])), "q must have unit stride in its last dim, got strides (9216, 4608, 1152, 2)"),
    "kv_cache last-dim stride": (_set(kv_cache=lambda a: _every_other(a["kv_cache"])), "kv_cache must have unit stride in its last dim"),
    "block_table last-dim stride": (_set(block_table=lambda a: a["block_table"].t().contiguous().t()), "block_table must have unit stride in its last dim, got strides (1, 2)"),
    "cache_seqlens non-contiguous": (_set(cache_seqlens=lambda a: _every_other(a["cache_seqlens"])), "cache_seqlens must be contiguous, got strides (2,)"),
    "head_dim_v": (_set(head_dim_v=lambda a: 128), "head_dim_v must have value 512, got 128"),
    "softmax_scale": (_set(softmax_scale=lambda a: -1.0), "softmax_scale must be a positive finite number, got -1.0"),
    "metadata alone": (_set(tile_scheduler_metadata=lambda a: torch.zeros(1, 8, dtype=torch.int32)), "tile_scheduler_metadata and num_splits must be given togethe"),
    "num_splits batch": (_set(tile_scheduler_metadata=lambda a: torch.zeros(1, 8, dtype=torch.int32),
                              num_splits=lambda a: torch.zeros(5, dtype=torch.int32)), "num_splits must have size 0 (batch + 1) 3, got 5"),
    "metadata width": (_set(tile_scheduler_metadata=lambda a: torch.zeros(1, 4, dtype=torch.int32),
                            num_splits=lambda a: torch.zeros(3, dtype=torch.int32)), "tile_scheduler_metadata must have size -1 8, got 4"),
    "requires grad": (_set(q=lambda a: a["q"].float().requires_grad_(), kv_cache=lambda a: a["kv_cache"].float()),
                      "q requires grad, but mla ops are inference-only"),
}
FP8 = torch.float8_e4m3fn
SCALE = torch.tensor([0.5])


def _fp8_cache(a):
    return a["kv_cache"].to(FP8)


def _fp8_q(a):
    return {**a, "q": a["q"].to(FP8), "kv_cache": _fp8_cache(a), "descale_q": SCALE, "descale_k": SCALE}


# The FP8 rules: each case breaks one thing of a valid FP8 call (e4m3 q and cache with their scales).
DECODE_CASES.update({
    "fp8 cache without descale_k": (_set(kv_cache=_fp8_cache),
                                    "kv_cache is float8_e4m3fn, so descale_k (its float32 dequantization scale, shape [1]) is required"),
    "bf16 cache given descale_k": (_set(descale_k=lambda a: SCALE),
                                   "descale_k is given but kv_cache is bfloat16: descale_k is the scale of a float8_e4m3fn kv_cache only"),
    "fp8 q without descale_q": (lambda a: {**_fp8_q(a), "descale_q": None},
                                "q is float8_e4m3fn, so descale_q (its float32 dequantization scale, shape [1]) is required"),
    "bf16 q given descale_q": (_set(kv_cache=_fp8_cache, descale_k=lambda a: SCALE, descale_q=lambda a: SCALE),
                               "descale_q is given but q is bfloat16: descale_q is the scale of a float8_e4m3fn q only"),
    "fp8 q with a bf16 cache": (lambda a: {**_fp8_q(a), "kv_cache": a["kv_cache"], "descale_k": None},
                                "q is float8_e4m3fn, so kv_cache must be float8_e4m3fn too, got bfloat16"),
    "descale_k float64": (lambda a: {**_fp8_q(a), "descale_k": SCALE.double()}, "descale_k must be float32, got float64"),
    "descale_q bfloat16": (lambda a: {**_fp8_q(a), "descale_q": SCALE.bfloat16()}, "descale_q must be float32, got bfloat16"),
    "descale_k per token": (lambda a: {**_fp8_q(a), "descale_k": torch.ones(2)},
                            "descale_k must hold one float32 value, shape [1] (per tensor) or [], got shape (2,)"),
    "descale_q 2-D": (lambda a: {**_fp8_q(a), "descale_q": torch.ones(1, 1)},
                      "descale_q must hold one float32 value, shape [1] (per tensor) or [], got shape (1, 1)"),
    "q float8_e5m2": (lambda a: {**_fp8_q(a), "q": a["q"].to(torch.float8_e5m2)},
                               "q must be bfloat16 or float16 or float32 or float8_e4m3fn, got float8_e5m2"),
    "e5m2 cache": (_set(kv_cache=lambda a: a["kv_cache"].to(torch.float8_e5m2), descale_k=lambda a: SCALE),
                   "kv_cache must be bfloat16 or float8_e4m3fn, got float8_e5m2"),
    "descale_k requires grad": (lambda a: {**_fp8_q(a), "descale_k": SCALE.clone().requires_grad_()},
                                "descale_k requires grad, but mla ops are inference-only"),
})
# a second device is always at hand: meta
DECODE_CASES["devices mixed"] = (_set(block_table=lambda a: a["block_table"].to("meta")),
                                 "block_table is on meta but q is on cpu; all tensors must share one device")
DECODE_CASES["descale_k elsewhere"] = (lambda a: {**_fp8_q(a), "descale_k": SCALE.to("meta")},
                                       "descale_k is on meta but q is on cpu; all tensors must share one device")


def call_decode(**a):
    return torch.ops.mla.decode(a["q"], a["kv_cache"], a["block_table"], a["cache_seqlens"], a.get("head_dim_v", 512),
                                a.get("softmax_scale"), a.get("causal", False), a.get("tile_scheduler_metadata"),
                                a.get("num_splits"), a.get("descale_q"), a.get("descale_k"))


@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_bad_decode_input_is_rejected_eagerly_and_compiled(case):
    break_args, message = DECODE_CASES[case]
    args = break_args(valid_decode_args())
    with pytest.raises(ValueError, match=re.escape(message)):
        call_decode(**args)
    torch._dynamo.reset()
    compiled = torch.compile(call_decode, fullgraph=True, backend="eager")
    with pytest.raises(Exception, match=re.escape(message)):
        compiled(**args)


def test_requires_grad_is_fine_under_no_grad():
    args = valid_decode_args()
    args["q"] = args["q"].float().requires_grad_()
    args["kv_cache"] = args["kv_cache"].float()
    with torch.no_grad():
        out, _ = call_decode(**args)
    assert not out.requires_grad


# Values only the device knows: checked on the CPU always (free there), on CUDA in debug mode.
VALUE_CASES = {
    "seqlen beyond table": (_set(cache_seqlens=lambda a: torch.tensor([10, 10 ** 4], dtype=torch.int32)), "cache_seqlens must lie in [0, 192]"),
    "negative seqlen": (_set(cache_seqlens=lambda a: torch.tensor([-1, 3], dtype=torch.int32)), "cache_seqlens must lie in [0, 192]"),
    "block id out of range": (_set(block_table=lambda a: a["block_table"].clone().fill_(99)), "block_table holds block ids outside"),
    "s_q > seqlen, causal": (_set(cache_seqlens=lambda a: torch.tensor([1, 70], dtype=torch.int32), causal=lambda a: True),
                             "with causal=True every non-empty sequence needs cache_seqlens >= s_q (2)"),
    "descale_k zero": (lambda a: {**_fp8_q(a), "descale_k": torch.zeros(1)}, "descale_k must be positive and finite, got 0.0"),
    "descale_q infinite": (lambda a: {**_fp8_q(a), "descale_q": torch.tensor([float("inf")])},
                           "descale_q must be positive and finite, got inf"),
    "descale_k negative": (lambda a: {**_fp8_q(a), "descale_k": torch.tensor(-2.0)}, "descale_k must be positive and finite, got -2.0"),
}


@pytest.mark.parametrize("case", list(VALUE_CASES))
def test_bad_values_are_rejected_on_cpu(case):
    break_args, message = VALUE_CASES[case]
    with pytest.raises(ValueError, match=re.escape(message)):
        call_decode(**break_args(valid_decode_args()))


def test_get_metadata_rejects_bad_input():
    with pytest.raises(ValueError, match="cache_seqlens must be int32, got int64"):
        torch_mla.get_metadata(torch.tensor([3]), 16)
    with pytest.raises(ValueError, match="num_heads_k must have value 1, got 2"):
        torch_mla.get_metadata(torch.tensor([3], dtype=torch.int32), 16, 2)
    with pytest.raises(ValueError, match="num_q_tokens_per_head_k must be >= 1"):
        torch_mla.get_metadata(torch.tensor([3], dtype=torch.int32), 0)


WRITE_CASES = {
    "kv_c width": (dict(kv_c=torch.randn(2, 500)), "kv_c must have size -1 512, got 500"),
    "k_pe width": (dict(k_pe=torch.randn(2, 32)), "k_pe must have size -1 64, got 32"),
    "kv_c dtype": (dict(kv_c=torch.randn(2, 512).half()), "kv_c must be float32, got float16"),
    "slot dtype": (dict(slot_mapping=torch.tensor([0.0, 1.0])), "slot_mapping must be int32 or int64, got float32"),
    "tokens mismatch": (dict(slot_mapping=torch.tensor([0, 1, 2])), "slot_mapping must have num_tokens (size 0) equal to kv_c's 2, got 3"),
    "slot out of range": (dict(slot_mapping=torch.tensor([0, 128])), "slot_mapping holds slot 128 outside [0, 128)"),
    "slot twice": (dict(slot_mapping=torch.tensor([5, 5])), "slot_mapping holds a slot twice"),
    "cache rank": (dict(kv_cache=torch.zeros(2, 64, 576)), "kv_cache must be 4-D"),
    "cache last-dim stride": (dict(kv_cache=torch.zeros(2, 64, 1, 576, 2)[..., 0]), "kv_cache must have unit stride in its last dim"),
    "kv_c last-dim stride": (dict(kv_c=torch.randn(2, 512, 2)[..., 0]), "kv_c must have unit stride in its last dim"),
    "slots non-contiguous": (dict(slot_mapping=torch.tensor([[0, 9], [1, 9]])[:, 0]), "slot_mapping must be contiguous"),
    "requires grad": (dict(kv_c=torch.randn(2, 512, requires_grad=True)), "kv_c requires grad"),
    "fp8 cache without scale": (dict(kv_cache=torch.zeros(2, 64, 1, 576, dtype=FP8)),
                                "kv_cache is float8_e4m3fn, so scale (its float32 dequantization scale, shape [1]) is required"),
    "float cache given a scale": (dict(scale=SCALE), "scale is given but kv_cache is float32: scale is the scale of a float8_e4m3fn kv_cache only"),
    "fp8 cache, fp8 rows": (dict(kv_cache=torch.zeros(2, 64, 1, 576, dtype=FP8), scale=SCALE, kv_c=torch.randn(2, 512).to(FP8)),
                            "kv_c must be bfloat16 or float16 or float32, got float8_e4m3fn"),
    "fp8 cache, rows of two dtypes": (dict(kv_cache=torch.zeros(2, 64, 1, 576, dtype=FP8), scale=SCALE, kv_c=torch.randn(2, 512).half()),
                                      "k_pe must be float16, got float32"),
    "scale float64": (dict(kv_cache=torch.zeros(2, 64, 1, 576, dtype=FP8), scale=SCALE.double()), "scale must be float32, got float64"),
    "scale per token": (dict(kv_cache=torch.zeros(2, 64, 1, 576, dtype=FP8), scale=torch.ones(2)),
                        "scale must hold one float32 value, shape [1] (per tensor) or [], got shape (2,)"),
    "scale elsewhere": (dict(kv_cache=torch.zeros(2, 64, 1, 576, dtype=FP8), scale=SCALE.to("meta")),
                        "scale is on meta but kv_cache is on cpu"),
    "scale zero": (dict(kv_cache=torch.zeros(2, 64, 1, 576, dtype=FP8), scale=torch.zeros(1)), "scale must be positive and finite, got 0.0"),
    "scale nan": (dict(kv_cache=torch.zeros(2, 64, 1, 576, dtype=FP8), scale=torch.tensor([float("nan")])),
                  "scale must be positive and finite, got nan"),
}


@pytest.mark.parametrize("case", list(WRITE_CASES))
def test_bad_write_cache_input_is_rejected(case):
    changes, message = WRITE_CASES[case]
    args = dict(kv_c=torch.randn(2, 512), k_pe=torch.randn(2, 64), kv_cache=torch.zeros(2, 64, 1, 576),
                slot_mapping=torch.tensor([0, 1]))
    args.update(changes)
    before = args["kv_cache"].float().clone()
    with pytest.raises(ValueError, match=re.escape(message)):
        torch_mla.write_cache(**args)
    assert torch.equal(args["kv_cache"].float(), before), "a rejected write must not touch the cache"


FP8_HELPER_CASES = {
    "quantize: x float8": (lambda: torch_mla.quantize_fp8(torch.zeros(3, dtype=FP8), SCALE),
                           "mla.quantize_fp8: x must be bfloat16 or float16 or float32, got float8_e4m3fn"),
    "quantize: scale shape": (lambda: torch_mla.quantize_fp8(torch.zeros(3), torch.ones(3)),
                              "mla.quantize_fp8: scale must hold one float32 value"),
    "quantize: scale zero": (lambda: torch_mla.quantize_fp8(torch.zeros(3), torch.zeros(1)),
                             "mla.quantize_fp8: scale must be positive and finite, got 0.0"),
    "quantize rows: q float8": (lambda: torch_mla.quantize_rows_fp8(torch.zeros(2, 3, dtype=FP8)),
                                "mla.quantize_rows_fp8: q must be bfloat16 or float16 or float32, got float8_e4m3fn"),
    "dequantize: x bfloat16": (lambda: torch_mla.dequantize_fp8(torch.zeros(3, dtype=torch.bfloat16), SCALE),
                               "mla.dequantize_fp8: x must be float8_e4m3fn, got bfloat16"),
    "dequantize: scale dtype": (lambda: torch_mla.dequantize_fp8(torch.zeros(3, dtype=FP8), SCALE.half()),
                                "mla.dequantize_fp8: scale must be float32, got float16"),
    "dequantize: dtype": (lambda: torch_mla.dequantize_fp8(torch.zeros(3, dtype=FP8), SCALE, torch.int8),
                          "mla.dequantize_fp8: dtype must be bfloat16 or float16 or float32, got torch.int8"),
}


@pytest.mark.parametrize("case", list(FP8_HELPER_CASES))
def test_bad_fp8_helper_input_is_rejected(case):
    call, message = FP8_HELPER_CASES[case]
    with pytest.raises(ValueError, match=re.escape(message)):
        call()
