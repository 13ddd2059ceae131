"""The CPU reference's cost follows the sequence lengths, not the block table's width: unused
columns add no work and no memory, in the op and in the decoder's decode steps; off the CPU (and
under tracing) it reads no lengths back to the host and stays one traceable graph."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from oracle import naive_decode
from torch_mla import reference
from torch_mla.engine import Generator
from torch_mla.models.deepseek import PRESETS, Transformer

BLOCK = 64


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any aten op produces."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def inputs(lengths, width, seed=0, device="cpu"):
    """Paged inputs whose block table has ``width`` columns, more than the lengths need."""
    g = torch.Generator().manual_seed(seed)
    pages = [-(-n // BLOCK) for n in lengths]
    kv_cache = torch.randn(max(sum(pages), 1), BLOCK, 1, 576, generator=g)
    table = torch.zeros(len(lengths), width, dtype=torch.int32)
    perm = torch.randperm(max(sum(pages), 1), generator=g).int()
    start = 0
    for row, n in enumerate(pages):
        table[row, :n] = perm[start:start + n]
        start += n
    q = torch.randn(len(lengths), 1, 4, 576, generator=g)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    return [t.to(device) for t in (q, kv_cache, table, seqlens)]


def largest_tensor(q, kv_cache, table, seqlens):
    with LargestTensor() as mode:
        reference.decode(q, kv_cache, table, seqlens, 512, 0.05, False)
    return mode.numel


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(0, 200), min_size=1, max_size=8), extra=st.integers(1, 600))
def test_unused_block_table_columns_add_no_memory(lengths, extra):
    narrow = max(1, -(-max(lengths) // BLOCK))
    q, kv_cache, table, seqlens = inputs(lengths, narrow + extra)
    assert largest_tensor(q, kv_cache, table, seqlens) == largest_tensor(q, kv_cache, table[:, :narrow], seqlens)


def test_batch_8_of_10_tokens_with_a_512_column_table_materialises_what_one_column_does():
    q, kv_cache, table, seqlens = inputs([10] * 8, 512)
    assert largest_tensor(q, kv_cache, table, seqlens) == largest_tensor(q, kv_cache, table[:, :1], seqlens)


@settings(max_examples=15, deadline=None)
@given(lengths=st.lists(st.integers(0, 200), min_size=1, max_size=5), extra=st.integers(0, 20))
def test_a_wide_block_table_gives_the_oracle_result(lengths, extra):
    q, kv_cache, table, seqlens = inputs(lengths, max(1, -(-max(lengths) // BLOCK)) + extra, seed=len(lengths))
    out, lse = reference.decode(q, kv_cache, table, seqlens, 512, 0.05, False)
    want_out, want_lse = naive_decode(q, kv_cache, table, seqlens, softmax_scale=0.05)
    torch.testing.assert_close(out.double(), want_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-4, atol=1e-4)


def test_off_the_cpu_the_reference_reads_no_length_back_to_the_host():
    # meta tensors have no values: any host read of the lengths would raise
    q, kv_cache, table, seqlens = inputs([10, 70], 9, device="meta")
    out, lse = reference.decode(q, kv_cache, table, seqlens, 512, 0.05, False)
    assert out.shape == (2, 1, 4, 512) and lse.shape == (2, 4, 1)


def test_the_reference_compiles_to_one_graph_with_dynamic_shapes():
    torch._dynamo.reset()
    compiled = torch.compile(reference.decode, fullgraph=True, dynamic=True)
    for i, (lengths, width) in enumerate([([10, 70], 9), ([1, 64, 130], 40)]):
        args = inputs(lengths, width, seed=i)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            got = compiled(*args, 512, 0.05, False)
        want = reference.decode(*args, 512, 0.05, False)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_decoder_steps_gather_only_what_the_sequences_hold(monkeypatch):
    """The decode steps' work does not grow with max_seq_len (the block table's width)."""
    model = Transformer(PRESETS["tiny"]).init_random(seed=1).eval()
    prompts = [[1, 2, 3], list(range(70))]
    widths = {}
    gather = reference._gather_pages
    for max_seq_len in (128, 1024):
        seen = []

        def recording(*args, seen=seen):
            kv, positions, seqlens = gather(*args)
            seen.append(kv.shape[1])
            return kv, positions, seqlens

        monkeypatch.setattr(reference, "_gather_pages", recording)
        Generator(model, 2, max_seq_len, compile=False).generate(prompts, 4)
        widths[max_seq_len] = seen
    assert widths[1024] == widths[128] and max(widths[128]) == 2 * BLOCK  # 70 + 4 tokens: two blocks
