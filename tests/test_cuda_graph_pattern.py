"""The full-CUDA-graph pattern of serving engines, with FlashMLA's tensor plans.

As vLLM's FlashMLAMetadataBuilder (before FlashMLA's 2026 interface) and SGLang's
FlashMLABackend.init_forward_metadata_{capture,replay}_cuda_graph do it: the graph is captured
once for the largest batch, over static buffers; before each replay the plan of the live rows
is copied into buffers preallocated for that batch, and num_splits is padded past the live rows
with its last value, so that idle rows have no split (no work; out 0, lse +inf). Replays with
fewer live rows must give each live row what an eager call on the live rows alone gives.

The CPU reference ignores the plan, so there the same buffers give the same live rows as long as
idle rows have cache_seqlens 0 (an empty sequence); the GPU test replays a captured graph.
"""

import math

import pytest
import torch

import torch_mla
from torch_mla.testing import paged_inputs

MAX_BS, S_Q, H_Q, SCALE = 8, 2, 16, 0.08
ROUNDS = (8, 5, 1, 3, 8)  # live rows per step: shrinking, then growing past stale tails


class GraphBuffers:
    """Static inputs and plan for MAX_BS rows; `prepare` fills them for the live rows."""

    def __init__(self, kv, max_blocks, device):
        self.kv = kv
        self.q = torch.zeros(MAX_BS, S_Q, H_Q, 576, dtype=kv.dtype, device=device)
        self.block_table = torch.zeros(MAX_BS, max_blocks, dtype=torch.int32, device=device)
        self.lens = torch.zeros(MAX_BS, dtype=torch.int32, device=device)
        # SGLang's init_cuda_graph_state: a plan for the largest batch, kept as the buffers
        self.metadata, self.num_splits = torch_mla.get_mla_metadata(
            torch.ones(MAX_BS, dtype=torch.int32, device=device), S_Q * H_Q, 1)

    def prepare(self, q, block_table, lens):
        bs = q.shape[0]
        self.q[:bs].copy_(q)
        self.block_table[:bs].copy_(block_table)
        self.lens[:bs].copy_(lens)
        self.lens[bs:].zero_()
        metadata, num_splits = torch_mla.get_mla_metadata(self.lens[:bs], S_Q * H_Q, 1)
        self.metadata.copy_(metadata)
        self.num_splits[:bs + 1].copy_(num_splits)
        self.num_splits[bs + 1:].fill_(num_splits[-1])  # idle rows: zero splits

    def step(self):
        return torch_mla.flash_mla_with_kvcache(self.q, self.kv, self.block_table, self.lens, 512, self.metadata,
                                                self.num_splits, SCALE, True)


def rounds(device):
    """(q, block_table, lens) of the live rows of each step, over one shared cache."""
    g = torch.Generator().manual_seed(3)
    capacity = [700, 64, 1500, 3, 129, 2000, 65, 900]
    _, kv, table, _ = paged_inputs(capacity, s_q=S_Q, h_q=H_Q, dtype=torch.bfloat16, device=device, generator=g)
    steps = []
    for bs in ROUNDS:
        lens = torch.tensor([max(S_Q, n - int(torch.randint(0, 60, (), generator=g))) for n in capacity[:bs]],
                            dtype=torch.int32)
        q = torch.randn(bs, S_Q, H_Q, 576, generator=g).to(torch.bfloat16)
        steps.append((q.to(device), table[:bs].clone(), lens.to(device)))
    return kv, table.shape[1], steps


def check_step(out, lse, q, block_table, lens, kv, exact):
    bs = q.shape[0]
    expected = torch_mla.decode(q, kv, block_table, lens, softmax_scale=SCALE, causal=True)
    if exact:
        assert torch.equal(out[:bs], expected[0]) and torch.equal(lse[:bs], expected[1])
    else:  # the combine's tiling follows the batch, so the rounding may differ
        torch.testing.assert_close(out[:bs], expected[0])
        torch.testing.assert_close(lse[:bs], expected[1], rtol=0, atol=1e-3)
    assert (out[bs:] == 0).all() and (lse[bs:] == math.inf).all(), "idle rows: out 0, lse +inf"


def test_padded_plan_buffers_give_the_live_rows_on_the_cpu():
    kv, max_blocks, steps = rounds("cpu")
    buffers = GraphBuffers(kv, max_blocks, "cpu")
    for q, block_table, lens in steps:
        buffers.prepare(q, block_table, lens)
        out, lse = buffers.step()
        check_step(out, lse, q, block_table, lens, kv, exact=True)


@pytest.mark.gpu
def test_graph_replay_with_fewer_live_rows_matches_eager():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    assert torch_mla.has_cuda_kernel(), torch_mla.cuda_kernel_error()
    kv, max_blocks, steps = rounds("cuda")
    buffers = GraphBuffers(kv, max_blocks, "cuda")
    buffers.prepare(*steps[0])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up (first-call setup) outside the capture
            buffers.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = buffers.step()
    for q, block_table, lens in steps:
        buffers.prepare(q, block_table, lens)
        graph.replay()
        torch.cuda.synchronize()
        eager = buffers.step()  # the same padded buffers, outside the graph: bit for bit
        assert torch.equal(out, eager[0]) and torch.equal(lse, eager[1])
        check_step(out, lse, q, block_table, lens, kv, exact=False)
