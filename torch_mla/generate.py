"""``python -m torch_mla.generate``: generate with the reference DeepSeek decoder.

A small model with seeded random weights runs on the CPU in seconds; ``--checkpoint DIR`` loads a
Hugging Face DeepSeek-V2/V3 folder instead. Every option is checked before a model is built. The
engine is :mod:`torch_mla.engine`; the eager / compiled / CUDA-graph comparison is
``python -m torch_mla.bench decoder``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass

import torch

from .engine import BACKENDS, GenerationResult, Generator
from .models.checkpoint import (HF_EXTRA, CheckpointError, args_from_hf_config, has_tokenizer, load_checkpoint,
                                load_tokenizer, read_config)
from .models.deepseek import PRESETS, ModelArgs, Transformer, describe

__all__ = ["main", "add_model_options", "resolve", "build_model", "Plan"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KV_CACHE_DTYPES = ("auto", "fp8")  # vLLM's words: the model's dtype, or float8_e4m3fn


# ------------------------------------------------------------------------------------------------
# Option types: each turns a bad value into argparse's one-line "argument --x: ..." message
# ------------------------------------------------------------------------------------------------


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


positive_int, non_negative_int = _int_at_least(1), _int_at_least(0)


def temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0 (0: greedy), got {text!r}")
    return value


def top_p(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a probability in (0, 1], got {text!r}")
    return value


def token_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids like 1,2,3, got {text!r}") from None
    if any(t < 0 for t in ids):
        raise argparse.ArgumentTypeError(f"token ids must be >= 0, got {text!r}")
    return ids


def device(text: str) -> torch.device:
    try:
        dev = torch.device(text)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: CUDA is not available here (torch {torch.__version__}); "
                                             "use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev


# ------------------------------------------------------------------------------------------------
# Options shared with ``python -m torch_mla.bench decoder``
# ------------------------------------------------------------------------------------------------


def add_model_options(ap: argparse.ArgumentParser) -> None:
    """The model, device, prompts and lengths: the options of every decoder command."""
    ap.add_argument("--preset", choices=sorted(PRESETS), help="model size, seeded random weights (default: small)")
    ap.add_argument("--checkpoint", metavar="DIR", help="Hugging Face DeepSeek-V2/V3 folder (config.json + "
                    f"*.safetensors; needs {HF_EXTRA})")
    ap.add_argument("--device", type=device, default=torch.device("cuda" if torch.cuda.is_available() else "cpu"),
                    help="cpu, cuda or cuda:N (default: cuda when present)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on CUDA, float32 on the CPU")
    ap.add_argument("--seed", type=non_negative_int, default=0, help="seeds weights, random prompts and sampling")
    ap.add_argument("--batch-size", type=positive_int, help="random prompts when none are given (default 4)")
    ap.add_argument("--prompt-len", type=positive_int, help="length of the random prompts (default 32)")
    ap.add_argument("--prompt", action="append", metavar="TEXT",
                    help="a text prompt (repeat for a batch); needs a --checkpoint with a tokenizer")
    ap.add_argument("--prompt-ids", action="append", type=token_ids, metavar="IDS",
                    help="a prompt as comma-separated token ids (repeat for a batch)")
    ap.add_argument("--max-new-tokens", type=positive_int, default=32)
    ap.add_argument("--eos-id", type=non_negative_int, help="stop a row at this token (default: the tokenizer's)")
    ap.add_argument("--prefill-chunk", type=positive_int, default=512, help="prompt tokens per causal prefill call")
    ap.add_argument("--json", metavar="PATH", help="also write the figures (and tokens) as JSON here")


@dataclass
class Plan:
    """Everything a run needs, checked: what to build, on what, with which prompts."""

    args: ModelArgs
    checkpoint: str | None
    preset: str | None
    device: torch.device
    dtype: torch.dtype
    seed: int
    prompts: list[list[int]]
    tokenizer: object | None
    eos_id: int | None
    max_seq_len: int
    weights: str  # in words: the checkpoint folder, or the preset and its random seed


def resolve(ap: argparse.ArgumentParser, opts: argparse.Namespace) -> Plan:
    """Check the options against each other and against the model's config; ``ap.error`` (exit 2) on any mistake."""
    if opts.checkpoint and opts.preset:
        ap.error("--preset and --checkpoint exclude each other: a preset has random weights, a checkpoint its own")
    if opts.prompt and opts.prompt_ids:
        ap.error("--prompt and --prompt-ids exclude each other: give text or token ids")
    if (opts.prompt or opts.prompt_ids) and (opts.batch_size or opts.prompt_len):
        ap.error("--batch-size and --prompt-len shape random prompts: they do not go with --prompt / --prompt-ids")
    if opts.json and not os.path.isdir(os.path.dirname(os.path.abspath(opts.json))):
        ap.error(f"--json {opts.json}: no folder {os.path.dirname(os.path.abspath(opts.json))}")
    dtype = DTYPES[opts.dtype] if opts.dtype else (torch.bfloat16 if opts.device.type == "cuda" else torch.float32)

    tokenizer = None
    if opts.checkpoint:
        path = opts.checkpoint
        try:
            config = read_config(path)
            args = args_from_hf_config(config)
        except CheckpointError as e:
            ap.error(f"--checkpoint {path}: {e}")
        if not any(f.endswith(".safetensors") for f in os.listdir(path)):
            ap.error(f"--checkpoint {path}: no *.safetensors files")
        try:
            import safetensors  # noqa: F401  only whether it is there
        except ImportError:
            ap.error(f"--checkpoint needs the safetensors package: {HF_EXTRA}")
        if has_tokenizer(path):
            try:
                tokenizer = load_tokenizer(path)
            except ImportError as e:
                if opts.prompt:
                    ap.error(f"--prompt: {e}")
                print(f"warning: the output stays token ids: {e}", file=sys.stderr)
        limit, limit_name = args.max_seq_len, f"the checkpoint's max_position_embeddings ({args.max_seq_len})"
        weights = f"checkpoint {path} ({config.get('model_type', 'deepseek_v3')})"
    else:
        preset = opts.preset or "small"
        args = PRESETS[preset]
        limit, limit_name = args.max_seq_len, f"the {preset} preset's {args.max_seq_len} positions"
        weights = f"preset {preset} with seeded random weights (seed {opts.seed}): the tokens carry no meaning"

    vocab = args.vocab_size
    if opts.prompt:
        if tokenizer is None:
            where = f"{opts.checkpoint} has no tokenizer files" if opts.checkpoint else "a preset has no tokenizer"
            ap.error(f"--prompt needs a tokenizer and {where}: give --prompt-ids, or a --checkpoint with one")
        prompts = [tokenizer.encode(p) for p in opts.prompt]
        if not all(prompts):
            ap.error("--prompt: a prompt has no tokens")
    elif opts.prompt_ids:
        prompts = opts.prompt_ids
    else:
        g = torch.Generator().manual_seed(opts.seed)
        prompts = torch.randint(0, vocab, (opts.batch_size or 4, opts.prompt_len or 32), generator=g).tolist()
    bad = sorted({t for p in prompts for t in p if t >= vocab})
    if bad:
        option = "--prompt (its tokenizer)" if opts.prompt else "--prompt-ids"
        ap.error(f"{option}: token ids must be below the model's vocabulary size {vocab}, got {bad[:5]}")
    eos_id = opts.eos_id
    if eos_id is None and tokenizer is not None:
        eos_id = tokenizer.eos_token_id
    elif eos_id is not None and eos_id >= vocab:
        ap.error(f"--eos-id: must be below the vocabulary size {vocab}, got {eos_id}")
    longest = max(len(p) for p in prompts)
    if longest + opts.max_new_tokens > limit:
        what = "--prompt-len" if not (opts.prompt or opts.prompt_ids) else "the longest prompt"
        ap.error(f"{what} ({longest}) + --max-new-tokens ({opts.max_new_tokens}) exceeds {limit_name}")
    return Plan(args, opts.checkpoint, None if opts.checkpoint else (opts.preset or "small"), opts.device, dtype,
                opts.seed, prompts, tokenizer, eos_id, longest + opts.max_new_tokens, weights)


def build_model(plan: Plan) -> Transformer:
    """The model the plan names, on its device and dtype, in eval mode."""
    if plan.checkpoint:
        return load_checkpoint(plan.checkpoint, device=plan.device, dtype=plan.dtype)
    model = Transformer(plan.args).init_random(plan.seed)
    return model.to(device=plan.device, dtype=plan.dtype).eval().keep_float32_parts()


def kernel_name(dev: torch.device) -> str:
    """Which mla.decode serves this device, in words."""
    import torch_mla

    if dev.type == "cuda" and torch_mla.has_cuda_kernel():
        return "the CUDA kernel"
    return "the pure-PyTorch reference"


def peak_memory(result: GenerationResult) -> tuple[int | None, str]:
    """Peak bytes and what they measure: the CUDA allocator's peak, or the process's resident set."""
    if result.peak_memory_bytes is not None:
        return result.peak_memory_bytes, "CUDA allocator peak"
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak resident set"
    except ImportError:
        return None, "not measured"


def figures(result: GenerationResult) -> dict:
    """The figures users compare, in ms and tokens/s; None where a figure has no steps to measure."""
    peak, peak_kind = peak_memory(result)
    return {
        "batch_size": result.batch_size, "prompt_tokens": result.prompt_tokens,
        "ttft_ms": 1000 * result.ttft_s, "prefill_tokens_per_s": result.prefill_tokens_per_s,
        "decode_ms_per_step": result.ms_per_step, "decode_tokens_per_s": result.tokens_per_s,
        "decode_steps": result.decode_steps, "decode_tokens": result.decode_tokens,
        "compile_s": result.compile_s, "peak_memory_bytes": peak, "peak_memory_kind": peak_kind,
    }


def print_figures(result: GenerationResult) -> None:
    f = figures(result)
    print(f"time to first token: {f['ttft_ms']:.1f} ms (prefill of {f['prompt_tokens']} prompt tokens, "
          f"{f['prefill_tokens_per_s']:.0f} tokens/s)")
    if result.decode_steps:
        print(f"decode: {f['decode_ms_per_step']:.2f} ms per step of batch {f['batch_size']}, "
              f"{f['decode_tokens_per_s']:.1f} tokens/s ({f['decode_tokens']} tokens generated in {f['decode_steps']} "
              "timed steps; rows stopped at EOS not counted)")
    else:
        print("decode: no step left to time (raise --max-new-tokens)")
    if result.compile_s is not None:
        print(f"compile: {result.compile_s:.2f} s (the first decode steps, which compile and capture; not in the "
              "decode figures)")
    if f["peak_memory_bytes"] is not None:
        print(f"peak memory: {f['peak_memory_bytes'] / 2 ** 20:.0f} MiB ({f['peak_memory_kind']})")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m torch_mla.generate", description=__doc__.split("\n\n")[1])
    add_model_options(ap)
    ap.add_argument("--temperature", type=temperature, default=0.0, help="0: greedy")
    ap.add_argument("--top-p", type=top_p, default=1.0, help="nucleus sampling: keep the most likely tokens up to p")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="compile the decode step (fullgraph, static shapes); default on CUDA (and with "
                         "--backend), off on the CPU, where compiling takes longer than a short demo")
    ap.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                    help="with --compile on CUDA: replay the step as a CUDA graph (default on)")
    ap.add_argument("--backend", choices=BACKENDS, help="with --compile: inductor (fused kernels, fastest; the "
                    "default) or eager (eager's kernels: bit-identical logits, eager's greedy tokens)")
    ap.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                    help="auto: the model's dtype; fp8: float8_e4m3fn rows with one scale (1.0), half of bf16's "
                         "bytes (the CUDA kernel reads it on Hopper FP8 tensor cores)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    opts = ap.parse_args(argv)
    if opts.compile is None:  # asking for a backend or CUDA graphs asks for compiling
        compile_ = opts.device.type == "cuda" or opts.backend is not None or bool(opts.cuda_graphs)
    else:
        compile_ = opts.compile
    if not compile_ and opts.cuda_graphs:
        ap.error("--cuda-graphs replays the compiled step: it needs --compile")
    if opts.cuda_graphs and opts.device.type != "cuda":
        ap.error(f"--cuda-graphs needs --device cuda, got {opts.device}")
    if not compile_ and opts.backend:
        ap.error("--backend picks the compile backend: it needs --compile")
    if opts.temperature == 0 and opts.top_p != 1:
        print("warning: --top-p has no effect with greedy decoding (--temperature 0)", file=sys.stderr)
    plan = resolve(ap, opts)
    fp8_cache = opts.kv_cache_dtype == "fp8"

    print(f"model: {plan.weights}; {describe(plan.args)}")
    try:
        model = build_model(plan)
    except CheckpointError as e:
        ap.error(f"--checkpoint {plan.checkpoint}: {e}")
    gen = Generator(model, len(plan.prompts), plan.max_seq_len, compile=compile_, cuda_graphs=opts.cuda_graphs,
                    prefill_chunk=opts.prefill_chunk, backend=opts.backend or "inductor",
                    kv_cache_dtype=torch.float8_e4m3fn if fp8_cache else None)
    cache_note = ", fp8 KV cache (float8_e4m3fn, scale 1.0)" if fp8_cache else ""
    print(f"running: {plan.device}, {str(plan.dtype).removeprefix('torch.')}, decode step {gen.mode}, "
          f"mla.decode by {kernel_name(plan.device)}{cache_note}", flush=True)
    result = gen.generate(plan.prompts, opts.max_new_tokens, opts.temperature, opts.top_p, opts.seed, plan.eos_id,
                          progress=True)
    for i, (p, toks) in enumerate(zip(plan.prompts, result.tokens)):
        print(f"[{i}] {len(p)} prompt tokens -> {len(toks)} new tokens: {toks}")
        if plan.tokenizer is not None:
            print(f"    {plan.tokenizer.decode(toks)!r}")
    print_figures(result)
    if opts.json:
        record = {"weights": plan.weights, "checkpoint": plan.checkpoint, "preset": plan.preset,
                  "device": str(plan.device), "dtype": str(plan.dtype).removeprefix("torch."),
                  "decode_step": gen.mode, "mla_kernel": kernel_name(plan.device),
                  "kv_cache_dtype": str(gen.cache.kv.dtype).removeprefix("torch."),
                  "max_new_tokens": opts.max_new_tokens, "temperature": opts.temperature, "top_p": opts.top_p,
                  **figures(result), "tokens": result.tokens}
        with open(opts.json, "w") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
