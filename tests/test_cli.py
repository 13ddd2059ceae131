"""Every mistake on the command line of ``python -m torch_mla.generate`` (and of ``python -m
torch_mla.bench decoder``, which shares its options) is a one-line message naming the option, exit
code 2 and no traceback, found before any model is built; a text prompt never becomes byte ids."""

import json
import sys

import pytest
import torch

from torch_mla import bench, generate

NO_CUDA = not torch.cuda.is_available()


@pytest.fixture
def no_model(monkeypatch):
    """Any attempt to build a model fails the test: the mistake must be found before."""
    def build(*args, **kwargs):
        raise AssertionError("a model was built before the options were checked")

    monkeypatch.setattr(generate, "build_model", build)


def refused(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[-1].startswith(("python -m torch_mla.generate: error: ", "python -m torch_mla.bench decoder: error: "))
    return lines[-1]


MISTAKES = [
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "-3"], "--batch-size"),
    (["--prompt-len", "0"], "--prompt-len"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--prefill-chunk", "0"], "--prefill-chunk"),
    (["--prefill-chunk", "-1"], "--prefill-chunk"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "5"], "--top-p"),
    (["--temperature", "nan"], "--temperature"),
    (["--temperature", "-1"], "--temperature"),
    (["--seed", "x"], "--seed"),
    (["--dtype", "int8"], "--dtype"),
    (["--preset", "huge"], "--preset"),
    (["--device", "tpu"], "--device"),
    (["--prompt-ids", "1,x"], "--prompt-ids"),
    (["--prompt-ids", "1,-2"], "--prompt-ids"),
    (["--preset", "tiny", "--prompt-ids", "1,2,99999"], "--prompt-ids"),
    (["--preset", "tiny", "--eos-id", "512"], "--eos-id"),
    (["--preset", "tiny", "--prompt-len", "1000", "--max-new-tokens", "30"], "--prompt-len"),
    (["--preset", "tiny", "--prompt-ids", "1,2", "--max-new-tokens", "1023"], "--max-new-tokens"),
    (["--prompt", "hello"], "--prompt"),
    (["--prompt", "hello", "--prompt-ids", "1"], "--prompt"),
    (["--prompt-ids", "1", "--batch-size", "2"], "--batch-size"),
    (["--checkpoint", "/no/such/folder"], "--checkpoint"),
    (["--checkpoint", "/no/such/folder", "--preset", "tiny"], "--preset"),
    (["--json", "/no/such/folder/run.json"], "--json"),
    (["--unknown-option"], "--unknown-option"),
    (["--kv-cache-dtype", "fp16"], "--kv-cache-dtype"),
]


@pytest.mark.parametrize("argv, option", MISTAKES, ids=[" ".join(a) for a, _ in MISTAKES])
def test_a_bad_option_is_one_line_naming_it_before_any_model_is_built(argv, option, no_model, capsys):
    assert option in refused(generate.main, ["--device", "cpu", *argv], capsys)


@pytest.mark.parametrize("argv, option", [(["--compile", "--cuda-graphs"], "--cuda-graphs"),
                                          (["--no-compile", "--cuda-graphs"], "--cuda-graphs"),
                                          (["--cuda-graphs"], "--cuda-graphs"),
                                          (["--no-compile", "--backend", "eager"], "--backend")])
def test_contradictory_step_options_are_refused(argv, option, no_model, capsys):
    assert option in refused(generate.main, ["--device", "cpu", *argv], capsys)


@pytest.mark.skipif(not NO_CUDA, reason="a machine without CUDA")
def test_cuda_without_cuda_is_refused(no_model, capsys):
    assert "--device" in refused(generate.main, ["--device", "cuda"], capsys)


def test_greedy_decoding_warns_that_top_p_does_nothing(monkeypatch, capsys):
    monkeypatch.setattr(generate, "resolve", lambda *a: sys.exit(0))  # stop after the early checks
    with pytest.raises(SystemExit):
        generate.main(["--device", "cpu", "--top-p", "0.5"])
    assert "--top-p has no effect" in capsys.readouterr().err


def test_the_bench_decoder_mode_checks_the_same_options(no_model, capsys):
    assert "--batch-size" in refused(bench.bench_decoder, ["--device", "cpu", "--batch-size", "0"], capsys)


@pytest.fixture
def config_only(tmp_path):
    """A folder whose config.json is DeepSeek-V3's layout (one shard file, never read)."""
    config = dict(model_type="deepseek_v3", vocab_size=97, hidden_size=64, intermediate_size=96,
                  moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, kv_lora_rank=512,
                  qk_rope_head_dim=64, qk_nope_head_dim=32, v_head_dim=24, max_position_embeddings=256,
                  first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"")
    return tmp_path, config


def test_a_checkpoint_config_the_model_cannot_represent_is_refused_naming_the_field(config_only, no_model, capsys):
    path, config = config_only
    (path / "config.json").write_text(json.dumps(dict(config, moe_layer_freq=2)))
    assert "moe_layer_freq" in refused(generate.main, ["--device", "cpu", "--checkpoint", str(path)], capsys)


def test_a_text_prompt_without_a_tokenizer_is_refused(config_only, no_model, capsys):
    path, _ = config_only
    line = refused(generate.main, ["--device", "cpu", "--checkpoint", str(path), "--prompt", "hello"], capsys)
    assert "--prompt needs a tokenizer" in line


def test_a_text_prompt_without_transformers_names_the_hf_extra(config_only, no_model, monkeypatch, capsys):
    path, _ = config_only
    (path / "tokenizer_config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    line = refused(generate.main, ["--device", "cpu", "--checkpoint", str(path), "--prompt", "hello"], capsys)
    assert "pip install torch-mla[hf]" in line


def test_a_checkpoint_without_safetensors_names_the_hf_extra(config_only, no_model, monkeypatch, capsys):
    path, _ = config_only
    monkeypatch.setitem(sys.modules, "safetensors", None)
    line = refused(generate.main, ["--device", "cpu", "--checkpoint", str(path)], capsys)
    assert "pip install torch-mla[hf]" in line
