"""The decoder over an FP8 KV cache: its drift against the bf16 cache on a tiny transformers model.

The V3 model of test_model_parity.py (random unit-gain weights, so attention is decisive; vocab
97, logits within about +-5, so near ties are common), loaded in bf16 on the CPU, runs a ragged
batch over a bf16 cache and over an FP8 cache (e4m3, scale 1.0), teacher-forced on the bf16
run's greedy tokens so that both give logits at the same 100 positions. For scale, the same
figures for the bf16 model and cache against float32 ones: the drift bf16 itself brings. The
figures (printed with -s, stated in docs/decoder.md) are the largest and the mean logit
difference and the share of positions whose greedy token agrees; the bounds leave a margin over
them (seeds 0-2 gave FP8 agreement 67-74% and a mean difference 2.9-3.8x bf16's, with q quantized
row by row as decode does over an FP8 cache).
"""

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from test_model_parity import make_hf_model  # noqa: E402
from teacher_forcing import drift, teacher_forced_logits  # noqa: E402
from torch_mla.engine import Generator  # noqa: E402
from torch_mla.models.checkpoint import load_checkpoint  # noqa: E402

PROMPTS = [[int(t) for t in torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(n))]
           for n in (70, 5, 33, 64)]
STEPS = 24


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("v3-yarn")
    make_hf_model("v3-yarn").save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_checkpoint(checkpoint, dtype=torch.bfloat16)


def teacher_forced(model, kv_dtype, forced=None):
    return teacher_forced_logits(model, PROMPTS, STEPS, kv_dtype, forced)


@torch.no_grad()
def test_fp8_cache_drifts_from_the_bf16_cache_by_a_few_times_bf16s_own_drift(model, checkpoint):
    bf16 = teacher_forced(model, torch.bfloat16)
    forced = bf16.argmax(-1)
    fp8 = teacher_forced(model, torch.float8_e4m3fn, forced)
    fp32 = teacher_forced(load_checkpoint(checkpoint, dtype=torch.float32), torch.float32, forced)
    fp8_max, fp8_mean, fp8_agree = drift(fp8, bf16)
    bf16_max, bf16_mean, bf16_agree = drift(bf16, fp32)
    print(f"\n{forced.numel()} teacher-forced positions, largest |logit| {bf16.abs().max().item():.2f}:"
          f"\n  FP8 vs bf16 cache: max |logit diff| {fp8_max:.2f}, mean {fp8_mean:.3f}, greedy agreement {fp8_agree:.0%}"
          f"\n  bf16 vs float32 model and cache: max {bf16_max:.2f}, mean {bf16_mean:.3f}, agreement {bf16_agree:.0%}")
    assert fp8_agree >= 0.6
    assert fp8_mean <= 5 * bf16_mean
    assert fp8_max <= bf16.abs().max().item()


@torch.no_grad()
def test_generation_over_a_one_byte_fp8_cache_keeps_most_first_tokens(model):
    bf16 = Generator(model, len(PROMPTS), 128, compile=False).generate(PROMPTS, 8).tokens
    fp8_gen = Generator(model, len(PROMPTS), 128, compile=False, kv_cache_dtype=torch.float8_e4m3fn)
    assert fp8_gen.cache.kv.dtype == torch.float8_e4m3fn and fp8_gen.cache.kv.element_size() == 1
    fp8 = fp8_gen.generate(PROMPTS, 8).tokens
    same_first = sum(a[0] == b[0] for a, b in zip(bf16, fp8))
    print(f"\nfree-running greedy tokens equal: {sum(x == y for a, b in zip(bf16, fp8) for x, y in zip(a, b))}"
          f" of {sum(map(len, bf16))}; first tokens {same_first} of {len(PROMPTS)}")
    assert same_first >= len(PROMPTS) // 2


def test_generator_refuses_another_cache_dtype(model):
    with pytest.raises(ValueError, match="kv_cache_dtype must be None"):
        Generator(model, 1, 64, compile=False, kv_cache_dtype=torch.float16)


@torch.no_grad()
def test_compiled_step_over_an_fp8_cache_is_one_graph_with_eager_tokens(model):
    # backend="eager": dynamo's one graph (fullgraph=True) over eager kernels, so the tokens are eager's exactly
    eager = Generator(model, len(PROMPTS), 128, compile=False, kv_cache_dtype=torch.float8_e4m3fn)
    compiled = Generator(model, len(PROMPTS), 128, compile=True, backend="eager", kv_cache_dtype=torch.float8_e4m3fn)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        tokens = compiled.generate(PROMPTS, 6).tokens
    assert tokens == eager.generate(PROMPTS, 6).tokens
