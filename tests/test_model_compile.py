"""The decode step is one torch.compile(fullgraph=True) graph: it gives the eager step's logits and
cache writes, and never recompiles as sequences grow (across block boundaries, across
generations of other lengths). With the eager backend it gives them bit for bit, in bf16 too. On a
GPU, CUDA-graph replay gives the same greedy tokens."""

import pytest
import torch
from torch._dynamo.utils import counters

from torch_mla.cache import PagedKVCache
from torch_mla.engine import CudaGraphStep, Generator, decode_step, prefill
from torch_mla.models.deepseek import PRESETS, Transformer

PROMPTS = [[int(t) for t in torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(n))]
           for n in (60, 9, 33)]


def tiny_model(device="cpu", dtype=torch.float32) -> Transformer:
    return Transformer(PRESETS["tiny"]).init_random(seed=3, std=0.1).to(device=device, dtype=dtype).eval()


@pytest.fixture(scope="module")
def compiled():
    """One compiled generator for the module: batch 4, 2 blocks per row (the CLI bench test's shapes,
    so a warm inductor cache serves both)."""
    torch._dynamo.reset()
    counters.clear()
    return Generator(tiny_model(), max_batch_size=4, max_seq_len=128, compile=True)


def prefill_rows(model, cache):
    cache.reset()
    for row, p in enumerate(PROMPTS):
        cache.reserve(row, len(p) + 16)
    return prefill(model, cache, PROMPTS).argmax(-1)


@torch.no_grad()
def test_compiled_decode_step_matches_eager_without_recompiling(compiled):
    model = compiled.model
    eager_cache = PagedKVCache(model.args.n_layers, num_blocks=8, max_batch_size=4, max_seq_len=128)
    first = prefill_rows(model, eager_cache)
    prefill_rows(model, compiled.cache)
    tokens = torch.cat([first, torch.zeros(1, dtype=torch.long)])
    positions = torch.tensor([len(p) for p in PROMPTS] + [-1])  # row 3 idle; row 0 crosses into block 2
    for i in range(8):
        expected = decode_step(model, eager_cache.kv, eager_cache.block_table, tokens, positions)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            got = compiled.step(model, compiled.cache.kv, compiled.cache.block_table, tokens, positions)
        torch.testing.assert_close(got[:3], expected[:3], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(compiled.cache.kv, eager_cache.kv, rtol=1e-5, atol=1e-5)
        tokens = torch.cat([expected[:3].argmax(-1), torch.zeros(1, dtype=torch.long)])
        positions[:3] += 1
    assert counters["stats"]["unique_graphs"] == 1


def test_compiled_generation_gives_eager_tokens_and_never_recompiles(compiled):
    model = compiled.model
    with torch._dynamo.config.patch(error_on_recompile=counters["stats"]["unique_graphs"] > 0):
        got = compiled.generate(PROMPTS, 12)
    assert got.tokens == Generator(model, 4, 128, compile=False).generate(PROMPTS, 12).tokens
    other = [p[:20] for p in PROMPTS] + [PROMPTS[0]]  # other lengths, full batch: same graph
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = compiled.generate(other, 40)
    assert again.tokens == Generator(model, 4, 128, compile=False).generate(other, 40).tokens
    assert counters["stats"]["unique_graphs"] == 1


@torch.no_grad()
def test_eager_backend_gives_eager_logits_bit_for_bit_in_bf16():
    """backend="eager": dynamo's single graph runs eager's own kernels, so even in bf16, where
    inductor's fusions round differently, the step's logits and cache writes are eager's exactly,
    and greedy generation gives eager's tokens."""
    torch._dynamo.reset()
    counters.clear()
    model = tiny_model(dtype=torch.bfloat16).keep_float32_parts()
    gen = Generator(model, max_batch_size=4, max_seq_len=128, compile=True, backend="eager")
    eager_cache = PagedKVCache(model.args.n_layers, num_blocks=8, max_batch_size=4, max_seq_len=128,
                               dtype=torch.bfloat16)
    first = prefill_rows(model, eager_cache)
    prefill_rows(model, gen.cache)
    tokens = torch.cat([first, torch.zeros(1, dtype=torch.long)])
    positions = torch.tensor([len(p) for p in PROMPTS] + [-1])
    for i in range(6):
        expected = decode_step(model, eager_cache.kv, eager_cache.block_table, tokens, positions)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            got = gen.step(model, gen.cache.kv, gen.cache.block_table, tokens, positions)
        assert torch.equal(got[:3], expected[:3]) and torch.equal(gen.cache.kv, eager_cache.kv)
        tokens = torch.cat([expected[:3].argmax(-1), torch.zeros(1, dtype=torch.long)])
        positions[:3] += 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = gen.generate(PROMPTS, 12, record_margins=True)
    want = Generator(model, 4, 128, compile=False).generate(PROMPTS, 12, record_margins=True)
    assert got.tokens == want.tokens and got.step_margins == want.step_margins
    assert counters["stats"]["unique_graphs"] == 1


def test_backend_and_cuda_graph_options_are_checked():
    with pytest.raises(ValueError, match="backend must be one of"):
        Generator(tiny_model(), 1, 64, backend="tvm")
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA model"):
        Generator(tiny_model(), 1, 64, compile=True, cuda_graphs=True)
    with pytest.raises(ValueError, match="it needs compile=True"):
        Generator(tiny_model(), 1, 64, compile=False, cuda_graphs=True)


@pytest.mark.gpu
def test_eager_backend_cuda_graph_replay_gives_eager_tokens_exactly():
    """bf16 on the GPU, eager backend: the step is captured once and then only replayed (the
    compiled function is not called again), and the tokens and top-2 logit gaps of every step
    are eager's, bit for bit."""
    torch._dynamo.reset()
    model = tiny_model("cuda", torch.bfloat16).keep_float32_parts()
    new = 48
    eager = Generator(model, 4, 160, compile=False).generate(PROMPTS, new, record_margins=True)
    graphs = Generator(model, 4, 160, compile=True, cuda_graphs=True, backend="eager")
    assert isinstance(graphs.step, CudaGraphStep)
    graphs.generate(PROMPTS, 4)  # warm-up: compile and capture
    calls = []
    inner = graphs.step.step
    graphs.step.step = lambda *a: calls.append(1) or inner(*a)
    replayed = graphs.generate(PROMPTS, new, record_margins=True)
    assert not calls, "the step ran outside its CUDA graph"
    assert replayed.tokens == eager.tokens
    assert replayed.step_margins == eager.step_margins


@pytest.mark.gpu
def test_inductor_cuda_graphs_give_the_compiled_tokens_and_eager_ones_where_clear():
    """bf16 on the GPU: replaying the CUDA graph changes nothing against the same compiled code
    without graphs (bit for bit), and the tokens are eager's wherever eager's choice is clear
    (a top-2 logit gap above bf16 noise); tokens may differ only after such a near tie."""
    torch._dynamo.reset()
    counters.clear()
    model = tiny_model("cuda", torch.bfloat16).keep_float32_parts()
    new = 48
    eager = Generator(model, 4, 160, compile=False).generate(PROMPTS, new, record_margins=True)
    graphs = Generator(model, 4, 160, compile=True, cuda_graphs=True)
    graphs.generate(PROMPTS, 4)  # warm-up: compile and capture
    replayed = graphs.generate(PROMPTS, new)
    assert counters["inductor"]["cudagraph_skips"] == 0, "the decode step fell back from CUDA graphs"
    torch._dynamo.reset()
    plain = Generator(model, 4, 160, compile=True, cuda_graphs=False).generate(PROMPTS, new)
    assert replayed.tokens == plain.tokens
    for row, (want, got) in enumerate(zip(eager.tokens, replayed.tokens)):
        first_diff = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), None)
        if first_diff is not None:
            assert eager.step_margins[row][first_diff] < 0.125, (
                f"row {row}: tokens differ at step {first_diff} where eager's choice was clear")
