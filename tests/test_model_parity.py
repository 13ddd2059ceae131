"""The decoder computes the same function as Hugging Face transformers' DeepSeek-V2/V3.

A tiny random transformers model is saved with ``save_pretrained`` and loaded back through
``load_checkpoint`` (names mapped, ``kv_b_proj`` split for absorption). Then, in float32 on the
CPU: the logits of a chunked, ragged prefill through the paged cache and ``mla.decode`` match
transformers' on every position; several decode steps match; greedy generation picks the same
tokens. transformers always recomputes from scratch here, so it shares nothing with our cache path.
"""

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from torch_mla.cache import PagedKVCache  # noqa: E402
from torch_mla.engine import Generator, decode_step  # noqa: E402
from torch_mla.models.checkpoint import load_checkpoint, load_tokenizer  # noqa: E402
from torch_mla.models.deepseek import rope_tables  # noqa: E402

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
        "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 1.0, "rope_theta": 10000.0}
COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=512, qk_rope_head_dim=64,
              qk_nope_head_dim=32, v_head_dim=24, max_position_embeddings=256, first_k_dense_replace=1,
              n_routed_experts=8, num_experts_per_tok=2, tie_word_embeddings=False)
VARIANTS = {
    # DeepSeek-V3: q low-rank, sigmoid routing with bias, group-limited top-k, YaRN, interleaved RoPE
    "v3-yarn": ("DeepseekV3", dict(COMMON, q_lora_rank=48, n_shared_experts=1, n_group=4, topk_group=2,
                                   routed_scaling_factor=2.5, rope_parameters=YARN, rope_interleave=True)),
    # V3 layout without q compression, plain RoPE, half-split RoPE pairs, no groups
    "v3-plain": ("DeepseekV3", dict(COMMON, q_lora_rank=None, n_shared_experts=2, n_group=1, topk_group=1,
                                    routed_scaling_factor=1.0, rope_interleave=False,
                                    rope_parameters={"rope_type": "default", "rope_theta": 500.0})),
    # DeepSeek-V2-Lite-like: no q compression, softmax routing, greedy top-k
    "v2-lite": ("DeepseekV2", dict(COMMON, q_lora_rank=None, n_shared_experts=2, topk_method="greedy",
                                   routed_scaling_factor=1.0, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # DeepSeek-V2: q compression, group-limited greedy, YaRN
    "v2-group": ("DeepseekV2", dict(COMMON, q_lora_rank=48, n_shared_experts=1, topk_method="group_limited_greedy",
                                    n_group=4, topk_group=2, routed_scaling_factor=16.0, rope_parameters=YARN)),
}


def make_hf_model(variant: str, seed: int = 0):
    """A tiny random transformers model whose weights make attention and routing decisive.

    transformers' init (std 0.02) leaves attention almost uniform and the router biases at 0, where
    a wrong RoPE, scale or bias would hardly move the logits; unit-gain weights do not.
    """
    arch, kwargs = VARIANTS[variant]
    if not hasattr(transformers, f"{arch}ForCausalLM"):
        pytest.skip(f"transformers {transformers.__version__} has no {arch}ForCausalLM")
    config = getattr(transformers, f"{arch}Config")(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, f"{arch}ForCausalLM")(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norms: around 1
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return model


@pytest.fixture(scope="module", params=list(VARIANTS))
def models(request, tmp_path_factory):
    """(transformers model, our model loaded from its save_pretrained folder, folder)."""
    hf = make_hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    ours = load_checkpoint(str(path), dtype=torch.float32)
    return hf, ours, path


def hf_logits(hf, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].float()


PROMPTS = [
    [int(t) for t in torch.randint(0, 97, (70,), generator=torch.Generator().manual_seed(1))],  # crosses a block
    [5, 17, 3, 96, 0],
]


def prefill_all_logits(model, cache, prompts, chunk):
    """Our logits at every prompt position: each prompt in causal chunks over the paged cache."""
    out = []
    for row, prompt in enumerate(prompts):
        cache.reserve(row, len(prompt) + 8)
        logits = []
        table = cache.block_table[row:row + 1]
        for start in range(0, len(prompt), chunk):
            end = min(start + chunk, len(prompt))
            tokens = torch.tensor([prompt[start:end]])
            positions = torch.arange(start, end)[None]
            seqlens = torch.tensor([end], dtype=torch.int32)
            slots = torch.tensor(cache.slots(row, start, end - start))
            logits.append(model(tokens, positions, cache.kv, table, seqlens, slots, causal=True)[0])
        out.append(torch.cat(logits))
    return out


def test_loaded_attention_scale_and_rope_are_transformers(models):
    hf, ours, _ = models
    attn = hf.model.layers[0].self_attn
    assert ours.layers[0].attn.softmax_scale == pytest.approx(attn.scaling, rel=1e-12)
    rotary = hf.model.rotary_emb
    cos, _ = rope_tables(ours.args)
    assert torch.allclose(cos[0], torch.ones(()) * rotary.attention_scaling)  # position 0: angle 0
    positions = torch.arange(ours.args.max_seq_len, dtype=torch.float32)
    expected = torch.cos(torch.outer(positions, rotary.inv_freq.float())) * rotary.attention_scaling
    torch.testing.assert_close(cos, expected, rtol=1e-5, atol=1e-5)


def test_kv_b_proj_is_split_into_w_uk_and_w_uv(models):
    hf, ours, _ = models
    a = ours.args
    for hf_layer, layer in zip(hf.model.layers, ours.layers):
        kv_b = hf_layer.self_attn.kv_b_proj.weight.view(a.n_heads, a.qk_nope_head_dim + a.v_head_dim, a.kv_lora_rank)
        assert torch.equal(torch.cat([layer.attn.w_uk, layer.attn.w_uv], dim=1), kv_b)


@pytest.mark.parametrize("chunk", [512, 32])
def test_prefill_logits_match_transformers(models, chunk):
    hf, ours, _ = models
    cache = PagedKVCache(ours.args.n_layers, num_blocks=8, max_batch_size=2, max_seq_len=128)
    with torch.no_grad():
        got = prefill_all_logits(ours, cache, PROMPTS, chunk)
    for prompt, logits in zip(PROMPTS, got):
        torch.testing.assert_close(logits, hf_logits(hf, prompt), rtol=1e-4, atol=1e-4)


def test_decode_steps_match_transformers(models):
    """Teacher-forced decode steps of a ragged batch with an idle row, through decode_step."""
    hf, ours, _ = models
    cache = PagedKVCache(ours.args.n_layers, num_blocks=8, max_batch_size=3, max_seq_len=128)
    forced = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        prefill_all_logits(ours, cache, PROMPTS, chunk=64)
        positions = torch.tensor([len(PROMPTS[0]), len(PROMPTS[1]), -1])  # row 2 idle
        for step in range(forced.shape[1]):
            tokens = torch.cat([forced[:, step], torch.tensor([0])])
            got = decode_step(ours, cache.kv, cache.block_table, tokens, positions)
            for row in range(2):
                expected = hf_logits(hf, PROMPTS[row] + forced[row, : step + 1].tolist())[-1]
                torch.testing.assert_close(got[row], expected, rtol=1e-4, atol=1e-4)
            positions[:2] += 1


def test_greedy_generation_matches_transformers(models):
    hf, ours, _ = models
    new = 8
    expected = []
    for prompt in PROMPTS:
        seq = list(prompt)
        for _ in range(new):
            seq.append(int(hf_logits(hf, seq)[-1].argmax()))
        expected.append(seq[len(prompt):])
    gen = Generator(ours, max_batch_size=2, max_seq_len=128, compile=False, prefill_chunk=32)
    assert gen.generate(PROMPTS, new).tokens == expected


def test_checkpoint_config_is_mapped(models):
    hf, ours, path = models
    config = json.loads((path / "config.json").read_text())
    a = ours.args
    assert (a.dim, a.n_layers, a.n_heads, a.vocab_size) == (config["hidden_size"], config["num_hidden_layers"],
                                                            config["num_attention_heads"], config["vocab_size"])
    assert a.q_lora_rank == (config["q_lora_rank"] or 0)
    assert a.score_func == ("sigmoid" if config["model_type"] == "deepseek_v3" else "softmax")
    assert load_tokenizer(str(path)) is None  # no tokenizer files were written


def test_block_fp8_weights_are_dequantized(tmp_path):
    """DeepSeek-V3's release format: fp8 weights with a ``weight_scale_inv`` per 128 x 128 block."""
    from safetensors.torch import load_file, save_file

    make_hf_model("v3-yarn").save_pretrained(tmp_path)
    shard = tmp_path / "model.safetensors"
    tensors = load_file(shard)
    expected = {}
    for name in ("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", "model.layers.1.self_attn.q_b_proj.weight"):
        w = tensors[name]
        rows = -(-w.shape[0] // 128)
        scale = torch.rand(rows, -(-w.shape[1] // 128)) + 0.5
        full = scale.repeat_interleave(128, 0)[: w.shape[0]].repeat_interleave(128, 1)[:, : w.shape[1]]
        q = (w / full).to(torch.float8_e4m3fn)
        tensors[name], tensors[name + "_scale_inv"] = q, scale
        expected[name] = q.float() * full
    save_file(tensors, shard, metadata={"format": "pt"})
    ours = load_checkpoint(str(tmp_path))
    assert torch.equal(ours.layers[0].attn.wkv_a.weight, expected["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"])
    assert torch.equal(ours.layers[1].attn.wq_b.weight, expected["model.layers.1.self_attn.q_b_proj.weight"])


def test_bf16_load_keeps_router_bias_and_rope_tables_in_float32(models):
    hf, _, path = models
    ours = load_checkpoint(str(path), dtype=torch.bfloat16)
    assert ours.embed.weight.dtype == torch.bfloat16
    assert ours.rope_cos.dtype == ours.rope_sin.dtype == torch.float32
    for hf_layer, layer in zip(hf.model.layers, ours.layers):
        if getattr(layer.ffn, "gate", None) is not None and layer.ffn.gate.bias is not None:
            assert torch.equal(layer.ffn.gate.bias, hf_layer.mlp.gate.e_score_correction_bias)
