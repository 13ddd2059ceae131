"""The generation loop: batch rows are independent (ragged prompts share the paged cache without
leaking into each other), sampling is seeded, EOS stops a row, a full cache is a clear error that
leaves the cache usable, and ``python -m torch_mla.generate`` runs (random model, and a
checkpoint folder with a tokenizer)."""

import os
import subprocess
import sys

import pytest
import torch

from torch_mla.cache import CacheFullError
from torch_mla.generate import Generator, sample
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


def run_cli(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "torch_mla.generate", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_cli_generates_and_reports_speed():
    out = run_cli("--preset", "tiny", "--device", "cpu", "--batch-size", "2", "--prompt-len", "8",
                  "--max-new-tokens", "5", "--no-compile")
    assert "[0] prompt (8 tokens) -> 5 new tokens" in out and "[1] prompt" in out
    assert "[eager]" in out and "tokens/s" in out and "prefill" in out


def test_cli_bench_times_eager_and_compiled_with_the_same_tokens():
    # batch 4 and 60 + 12 tokens (2 blocks a row): the shapes of test_model_compile's graph
    out = run_cli("--preset", "tiny", "--device", "cpu", "--batch-size", "4", "--prompt-len", "60",
                  "--max-new-tokens", "12", "--bench")
    assert "| eager |" in out
    assert "| compiled |" in out and out.split("| compiled |")[1].split("\n")[0].strip().endswith("| 4/4 |")


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
    assert "[0] prompt (4 tokens)" in out and "[1] prompt (1 tokens)" in out
    assert "'w" in out  # decoded text


def test_progress_falls_back_to_plain_lines_without_tqdm(model, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm -> ImportError
    eager(model).generate(PROMPTS, 11, progress=True)
    assert "decode 10/10" in capsys.readouterr().err


def test_cli_reads_text_as_bytes_without_a_tokenizer():
    out = run_cli("--preset", "tiny", "--device", "cpu", "--prompt", "héllo", "--max-new-tokens", "2", "--no-compile")
    assert "[0] prompt (6 tokens) -> 2 new tokens" in out
