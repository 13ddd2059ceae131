"""The generation loop: batch rows are independent (ragged prompts share the paged cache without
leaking into each other), sampling is seeded, EOS stops a row, a full cache is a clear error that
leaves the cache usable, the figures count what was generated, and ``python -m torch_mla.generate``
and ``python -m torch_mla.bench decoder`` run (random model, and a checkpoint folder with a
tokenizer)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from torch_mla.cache import CacheFullError
from torch_mla.engine import Generator, sample
from torch_mla.models.deepseek import PRESETS, Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [[int(t) for t in torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(n))]
           for n in (70, 3, 20)]


@pytest.fixture(scope="module")
def model():
    return Transformer(PRESETS["tiny"]).init_random(seed=5, std=0.1).eval()


def eager(model, batch=4, max_seq_len=128, **kw):
    return Generator(model, max_batch_size=batch, max_seq_len=max_seq_len, compile=False, **kw)


def test_rows_of_a_ragged_batch_are_independent(model):
    together = eager(model).generate(PROMPTS, 10).tokens
    alone = [eager(model, batch=1).generate([p], 10).tokens[0] for p in PROMPTS]
    assert together == alone


def test_chunked_prefill_gives_the_same_tokens(model):
    assert eager(model, prefill_chunk=16).generate(PROMPTS, 6).tokens == eager(model).generate(PROMPTS, 6).tokens


def test_sampling_is_reproducible_with_a_seed(model):
    gen = eager(model)
    a = gen.generate(PROMPTS, 12, temperature=1.0, top_p=0.9, seed=7).tokens
    b = gen.generate(PROMPTS, 12, temperature=1.0, top_p=0.9, seed=7).tokens
    c = gen.generate(PROMPTS, 12, temperature=1.0, top_p=0.9, seed=8).tokens
    assert a == b and a != c


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(2000, -1)
    g = torch.Generator().manual_seed(0)
    picked = sample(logits, temperature=1.0, top_p=0.6, generator=g)
    assert set(picked.tolist()) == {0, 1}
    assert sample(logits, temperature=1.0, top_p=1e-6, generator=g).eq(0).all()  # only the argmax
    assert sample(logits, temperature=0.0).eq(0).all()  # greedy


def test_eos_stops_only_its_row(model):
    free = eager(model).generate(PROMPTS, 12).tokens
    eos = free[0][3]
    stopped = eager(model).generate(PROMPTS, 12, eos_id=eos).tokens
    for want, got in zip(free, stopped):
        cut = want.index(eos) + 1 if eos in want else len(want)
        assert got == want[:cut]


def test_full_cache_is_a_clear_error_and_the_cache_stays_usable(model):
    gen = eager(model, num_blocks=2)  # 128 tokens in all
    with pytest.raises(CacheFullError, match="KV cache full"):
        gen.generate(PROMPTS, 10)  # needs 2 + 1 + 1 blocks
    assert gen.cache.allocator.num_free == 2 and all(not b for b in gen.cache.blocks)
    assert gen.generate(PROMPTS[1:], 10).tokens == eager(model).generate(PROMPTS[1:], 10).tokens


def run(module, *args, timeout=300):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def run_cli(*args, timeout=300):
    return run("torch_mla.generate", *args, timeout=timeout)


def test_cli_says_what_ran_and_reports_the_figures(tmp_path):
    out = run_cli("--preset", "tiny", "--device", "cpu", "--batch-size", "2", "--prompt-len", "8",
                  "--max-new-tokens", "5", "--json", str(tmp_path / "run.json"))
    assert "preset tiny with seeded random weights" in out
    assert "running: cpu, float32, decode step eager, mla.decode by the pure-PyTorch reference" in out
    assert "[0] 8 prompt tokens -> 5 new tokens" in out and "[1] 8 prompt tokens" in out
    assert "time to first token:" in out and "ms per step of batch 2" in out and "peak memory:" in out
    assert "compile:" not in out  # eager: nothing compiled
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["decode_tokens"] == 2 * 4 and record["decode_steps"] == 4  # the 4 decode steps of 2 rows
    assert record["decode_step"] == "eager" and len(record["tokens"]) == 2
    assert all(record[k] > 0 for k in ("ttft_ms", "prefill_tokens_per_s", "decode_ms_per_step", "decode_tokens_per_s"))


def test_cli_runs_over_an_fp8_cache_and_says_so(tmp_path):
    out = run_cli("--preset", "tiny", "--device", "cpu", "--batch-size", "2", "--prompt-len", "8",
                  "--max-new-tokens", "3", "--kv-cache-dtype", "fp8", "--json", str(tmp_path / "run.json"))
    assert "fp8 KV cache (float8_e4m3fn, scale 1.0)" in out and "[1] 8 prompt tokens -> 3 new tokens" in out
    assert json.loads((tmp_path / "run.json").read_text())["kv_cache_dtype"] == "float8_e4m3fn"


def test_tokens_per_s_counts_only_tokens_generated_before_eos(model):
    free = eager(model).generate(PROMPTS, 12).tokens
    eos = free[0][2]  # row 0 stops after its third token
    result = eager(model).generate(PROMPTS, 12, eos_id=eos)
    assert result.decode_tokens == sum(len(row) - 1 for row in result.tokens)  # the first token is prefill's
    assert result.decode_tokens < result.decode_steps * len(PROMPTS)


def test_one_new_token_reports_no_decode_figures(model):
    result = eager(model).generate(PROMPTS, 1)
    assert result.decode_steps == 0 and result.ms_per_step is None and result.tokens_per_s is None


def test_bench_decoder_mode_times_eager_and_compiled_with_the_same_tokens():
    # batch 4 and 60 + 12 tokens (2 blocks a row): the shapes of test_model_compile's graph
    out = run("torch_mla.bench", "decoder", "--preset", "tiny", "--device", "cpu", "--batch-size", "4",
              "--prompt-len", "60", "--max-new-tokens", "12")
    assert "| eager |" in out
    assert "| compiled (inductor) |" in out
    assert out.split("| compiled (inductor) |")[1].split("\n")[0].strip().endswith("| 4/4 |")


def test_cli_loads_a_checkpoint_with_its_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from test_model_parity import make_hf_model

    hf = make_hf_model("v3-yarn")
    hf.save_pretrained(tmp_path)
    words = ["<eos>", "<unk>"] + [f"w{i}" for i in range(95)]  # the model's 97 ids
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    fast.save_pretrained(tmp_path)
    out = run_cli("--checkpoint", str(tmp_path), "--prompt", "w1 w2 w3 w4", "--prompt", "w9",
                  "--max-new-tokens", "4", "--no-compile")
    assert "checkpoint " in out and "[0] 4 prompt tokens" in out and "[1] 1 prompt tokens" in out
    assert "'w" in out  # decoded text


def test_progress_falls_back_to_plain_lines_without_tqdm(model, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm -> ImportError
    eager(model).generate(PROMPTS, 11, progress=True)
    assert "decode 10/10" in capsys.readouterr().err
