"""Generation with the reference DeepSeek decoder: prefill, then a compiled decode loop.

``python -m torch_mla.generate`` runs a small seeded random model on the CPU in seconds;
``--checkpoint DIR`` loads a Hugging Face DeepSeek-V2/V3 folder instead, ``--bench`` times eager,
compiled and compiled + CUDA graphs decoding side by side.

The decode step is one function, :func:`decode_step`, compiled with ``fullgraph=True`` and static
shapes: the batch and the block table have fixed sizes for the whole generation, and everything
that changes from step to step (tokens, positions, hence lengths and slots) is a tensor. So the
step compiles once and never recompiles as sequences grow, and on CUDA it is captured once into a
CUDA graph and replayed.

Two compile backends: ``inductor`` (the default; fused Triton / C++ kernels, and on CUDA
``mode="reduce-overhead"``, inductor's CUDA graphs) and ``eager`` (dynamo's one graph runs eager
PyTorch's own kernels, captured by :class:`CudaGraphStep`). Inductor is faster, but its fusions
round bf16 differently from eager, so in bf16 its greedy tokens may part from eager's after a
near tie; ``eager`` gives eager's logits bit for bit, hence eager's tokens, at CUDA-graph speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass, field

import torch

from .cache import BLOCK_SIZE, PagedKVCache, slot_mapping
from .models.checkpoint import load_checkpoint, load_tokenizer
from .models.deepseek import PRESETS, Transformer, describe

BACKENDS = ("inductor", "eager")  # torch.compile backends of the decode step (see the module docstring)

__all__ = ["decode_step", "prefill", "sample", "CudaGraphStep", "Generator", "GenerationResult", "main"]


def decode_step(model: Transformer, kv_cache: torch.Tensor, block_table: torch.Tensor,
                tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One token for every row: ``tokens [b]`` int64 at ``positions [b]`` int64 -> logits ``[b, vocab]``.

    A row with position -1 is idle (padding): nothing is written, its logits are meaningless.
    Lengths and slots are derived on the device, so the step has static shapes and no host sync.
    """
    pos = positions[:, None]
    seqlens = torch.where(positions >= 0, positions + 1, 0).to(torch.int32)
    slots = slot_mapping(block_table, pos)
    return model(tokens[:, None], pos, kv_cache, block_table, seqlens, slots, causal=False)[:, 0]


def prefill(model: Transformer, cache: PagedKVCache, prompts: list[list[int]], chunk_size: int = 512,
            rows: list[int] | None = None) -> torch.Tensor:
    """Write every prompt into the cache; return the logits after each prompt's last token, ``[n, vocab]``.

    Prompts of equal length go through together; each runs in causal chunks of ``chunk_size``
    tokens over the cache (a chunk sees the chunks before it through ``mla.decode``). Row
    ``rows[i]`` of the cache (default i) must already hold blocks for ``len(prompts[i])`` tokens.
    """
    device = cache.kv.device
    rows = list(range(len(prompts))) if rows is None else rows
    last = torch.empty(len(prompts), model.args.vocab_size, device=device)
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty")
        by_length.setdefault(len(p), []).append(i)
    for length, members in by_length.items():
        group_rows = [rows[i] for i in members]
        table = cache.block_table[torch.tensor(group_rows, device=device)]
        tokens = torch.tensor([prompts[i] for i in members], device=device)
        for start in range(0, length, chunk_size):
            end = min(start + chunk_size, length)
            positions = torch.arange(start, end, device=device).expand(len(members), -1)
            seqlens = torch.full((len(members),), end, dtype=torch.int32, device=device)
            slots = torch.tensor([cache.slots(r, start, end - start) for r in group_rows], device=device).view(-1)
            logits = model(tokens[:, start:end], positions, cache.kv, table, seqlens, slots,
                           causal=True, last_only=True)
        last[torch.tensor(members, device=device)] = logits[:, -1]
    return last


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens ``[b]`` int64: greedy when ``temperature == 0``, else nucleus sampling.

    Top-p keeps the smallest set of most likely tokens whose probability reaches ``top_p``.
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass strictly before each token
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class CudaGraphStep:
    """A decode step captured once into a CUDA graph (``torch.cuda.CUDAGraph``), then replayed.

    For compile backends that bring no CUDA graphs of their own (``backend="eager"``). Each call
    copies ``tokens`` and ``positions`` into static buffers and replays; the logits returned are a
    static buffer that the next call overwrites. The model, ``kv_cache`` and ``block_table`` are
    baked into the graph by address: the cache and table are updated in place, and a call with
    another cache (address or shape) captures afresh. Before the capture the step runs twice on a
    side stream (compiling it and warming up the kernels); those runs write the same cache rows
    as the replay that follows, with the same values, so they change nothing.
    """

    def __init__(self, step):
        self.step = step
        self.graph: torch.cuda.CUDAGraph | None = None
        self._key = None

    def __call__(self, model: Transformer, kv_cache: torch.Tensor, block_table: torch.Tensor,
                 tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        key = (id(model), kv_cache.data_ptr(), kv_cache.shape, block_table.data_ptr(), block_table.shape,
               tokens.shape, positions.shape)
        if key != self._key:
            self._capture(model, kv_cache, block_table, tokens, positions)
            self._key = key
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.graph.replay()
        return self.logits

    def _capture(self, model, kv_cache, block_table, tokens, positions) -> None:
        self.graph = None
        self.tokens, self.positions = tokens.clone(), positions.clone()
        side = torch.cuda.Stream(device=tokens.device)
        side.wait_stream(torch.cuda.current_stream(tokens.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.step(model, kv_cache, block_table, self.tokens, self.positions)
        torch.cuda.current_stream(tokens.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self.step(model, kv_cache, block_table, self.tokens, self.positions)
        self.graph = graph


@dataclass
class GenerationResult:
    """Generated tokens per prompt (stopping at and including EOS) and timings in seconds."""

    tokens: list[list[int]]
    prefill_s: float
    first_step_s: float  # the first decode step: includes compiling / CUDA-graph capture
    decode_s: float  # the other decode steps
    decode_steps: int  # decode steps after the first
    batch_size: int
    prompt_tokens: int
    step_margins: list[list[float]] = field(default_factory=list)  # greedy: top-1 minus top-2 logit

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput, first step excluded: generated tokens of all rows per second."""
        return self.batch_size * self.decode_steps / self.decode_s if self.decode_s > 0 else float("nan")

    @property
    def ms_per_token(self) -> float:
        """Latency of one decode step (one token for every row)."""
        return 1000 * self.decode_s / self.decode_steps if self.decode_steps else float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Progress:
    """tqdm when installed, else a plain line every tenth of the run; silent when disabled."""

    def __init__(self, total: int, enabled: bool):
        self.bar, self.total, self.done, self.enabled = None, total, 0, enabled
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="tok", desc="decode", file=sys.stderr, leave=False)
            except ImportError:
                pass

    def update(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update()
        elif self.enabled and self.done % max(1, self.total // 10) == 0:
            print(f"decode {self.done}/{self.total}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Generator:
    """Batched generation over a paged latent cache.

    Args:
        model: the decoder, in eval mode, on its device and dtype.
        max_batch_size: rows of the cache, i.e. the fixed batch of the decode step.
        max_seq_len: longest prompt + generation of a row.
        num_blocks: cache blocks; default enough for every row at ``max_seq_len``.
        compile: compile the decode step (``fullgraph=True``, static shapes).
        cuda_graphs: with ``compile``, replay the step as a CUDA graph; default on CUDA.
        prefill_chunk: tokens per causal prefill chunk.
        backend: ``torch.compile`` backend of the step: ``"inductor"`` (CUDA graphs through
            ``mode="reduce-overhead"``) or ``"eager"`` (eager's kernels, bit-identical logits;
            CUDA graphs through :class:`CudaGraphStep`).
    """

    def __init__(self, model: Transformer, max_batch_size: int, max_seq_len: int, num_blocks: int | None = None,
                 compile: bool = True, cuda_graphs: bool | None = None, prefill_chunk: int = 512,
                 backend: str = "inductor"):
        self.model = model
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        if max_seq_len > model.args.max_seq_len:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds the model's RoPE tables ({model.args.max_seq_len})")
        if num_blocks is None:
            num_blocks = max_batch_size * -(-max_seq_len // BLOCK_SIZE)
        self.cache = PagedKVCache(model.args.n_layers, num_blocks, max_batch_size, max_seq_len,
                                  dtype=self.dtype, device=self.device)
        self.prefill_chunk = prefill_chunk
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.cuda_graphs = bool(compile and (self.device.type == "cuda" if cuda_graphs is None else cuda_graphs))
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs needs a CUDA model, got {self.device}")
        self.backend = backend if compile else None
        self.step = decode_step
        if compile:
            # Static addresses: CUDA graphs may then mutate / read them in place without copies.
            torch._dynamo.mark_static_address(self.cache.kv)
            torch._dynamo.mark_static_address(self.cache.block_table)
            mode = "reduce-overhead" if self.cuda_graphs and backend == "inductor" else None
            self.step = torch.compile(decode_step, fullgraph=True, dynamic=False, backend=backend, mode=mode)
            if self.cuda_graphs and backend != "inductor":
                self.step = CudaGraphStep(self.step)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, eos_id: int | None = None,
                 progress: bool = False, record_margins: bool = False) -> GenerationResult:
        """Generate up to ``max_new_tokens`` tokens after each prompt (fewer when a row hits ``eos_id``)."""
        cache, device = self.cache, self.device
        n = len(prompts)
        if n > cache.max_batch_size:
            raise ValueError(f"{n} prompts exceed max_batch_size {cache.max_batch_size}")
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        cache.reset()
        try:
            for row, p in enumerate(prompts):
                cache.reserve(row, len(p) + max_new_tokens)
        except Exception:
            cache.reset()
            raise
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)

        _sync(device)
        t0 = time.perf_counter()
        logits = prefill(self.model, cache, prompts, self.prefill_chunk)
        margins: list[torch.Tensor] = []
        if record_margins:
            margins.append(logits.topk(2, dim=-1).values.diff(dim=-1).neg().squeeze(-1))
        batch = cache.max_batch_size
        tokens = torch.zeros(batch, dtype=torch.long, device=device)
        tokens[:n] = sample(logits, temperature, top_p, generator)
        positions = torch.full((batch,), -1, dtype=torch.long, device=device)  # idle rows stay at -1
        positions[:n] = torch.tensor([len(p) for p in prompts], device=device)
        out = [tokens[:n].clone()]
        done = torch.zeros(n, dtype=torch.bool, device=device)
        if eos_id is not None:
            done |= tokens[:n] == eos_id
        _sync(device)
        t1 = time.perf_counter()

        bar = _Progress(max_new_tokens - 1, progress)
        first_step_s, t2, steps = 0.0, t1, 0
        for i in range(1, max_new_tokens):
            if eos_id is not None and i % 8 == 0 and bool(done.all()):
                break  # checked every few steps: each check is a host sync
            if self.cuda_graphs and self.backend == "inductor":
                torch.compiler.cudagraph_mark_step_begin()
            logits = self.step(self.model, cache.kv, cache.block_table, tokens, positions)[:n]
            if record_margins:
                margins.append(logits.topk(2, dim=-1).values.diff(dim=-1).neg().squeeze(-1))
            next_tokens = sample(logits, temperature, top_p, generator)
            tokens = torch.zeros_like(tokens)
            tokens[:n] = next_tokens
            positions[:n] += 1
            out.append(next_tokens)
            if eos_id is not None:
                done |= next_tokens == eos_id
            if i == 1:
                _sync(device)
                t2 = time.perf_counter()
                first_step_s = t2 - t1
            else:
                steps += 1
            bar.update()
        _sync(device)
        t3 = time.perf_counter()
        bar.close()

        generated = torch.stack(out, dim=1).tolist()
        if eos_id is not None:
            generated = [row[: row.index(eos_id) + 1] if eos_id in row else row for row in generated]
        result = GenerationResult(generated, t1 - t0, first_step_s, t3 - t2, steps, n,
                                  sum(len(p) for p in prompts))
        if record_margins:
            result.step_margins = torch.stack(margins, dim=1).tolist()
        return result


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_model(preset: str, checkpoint: str | None, device: torch.device, dtype: torch.dtype,
                max_seq_len: int | None = None, seed: int = 0) -> tuple[Transformer, object]:
    """The model (and tokenizer, or None): a checkpoint folder, or a preset with seeded random weights."""
    if checkpoint:
        model = load_checkpoint(checkpoint, device=device, dtype=dtype, max_seq_len=max_seq_len)
        return model, load_tokenizer(checkpoint)
    args = PRESETS[preset]
    if max_seq_len and max_seq_len > args.max_seq_len:
        args = dataclasses.replace(args, max_seq_len=max_seq_len)
    model = Transformer(args).init_random(seed).to(device=device, dtype=dtype).eval().keep_float32_parts()
    return model, None


def _prompts(opts, tokenizer, vocab_size: int) -> list[list[int]]:
    if opts.prompt_ids:
        return [[int(t) for t in p.split(",")] for p in opts.prompt_ids]
    if opts.prompt:
        if tokenizer is not None:
            return [tokenizer.encode(p) for p in opts.prompt]
        if vocab_size < 256:
            raise SystemExit("--prompt needs a tokenizer (a --checkpoint with one) or a vocab of >= 256 bytes")
        return [list(p.encode("utf-8")) for p in opts.prompt]  # bytes as token ids
    g = torch.Generator().manual_seed(opts.seed)
    return torch.randint(0, vocab_size, (opts.batch_size, opts.prompt_len), generator=g).tolist()


def _print_result(name: str, r: GenerationResult, file=sys.stdout) -> None:
    print(f"[{name}] prefill {r.prompt_tokens} tokens: {1000 * r.prefill_s:.1f} ms | first decode step "
          f"(compile / capture): {1000 * r.first_step_s:.1f} ms | decode: {r.ms_per_token:.2f} ms/token, "
          f"{r.tokens_per_s:.1f} tokens/s (batch {r.batch_size}, {r.decode_steps} steps)", file=file)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m torch_mla.generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small", choices=sorted(PRESETS), help="model size (random weights)")
    ap.add_argument("--checkpoint", help="Hugging Face DeepSeek-V2/V3 folder (config.json + *.safetensors)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(_DTYPES), help="default: bfloat16 on CUDA, float32 on the CPU")
    ap.add_argument("--batch-size", type=int, default=4, help="random prompts when none are given")
    ap.add_argument("--prompt-len", type=int, default=32, help="length of the random prompts")
    ap.add_argument("--prompt", action="append", help="a text prompt (repeat for a batch)")
    ap.add_argument("--prompt-ids", action="append", help="a prompt as comma-separated token ids (repeatable)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0, help="seeds weights, random prompts and sampling")
    ap.add_argument("--eos-id", type=int, help="stop a row at this token (default: the tokenizer's, if any)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="compile the decode step (fullgraph, static shapes)")
    ap.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                    help="with --compile: replay the step as a CUDA graph (default on CUDA)")
    ap.add_argument("--backend", choices=BACKENDS, default="inductor",
                    help="torch.compile backend of the step: inductor (fused kernels, fastest) or eager "
                         "(eager's kernels: bit-identical logits, eager's greedy tokens)")
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument("--bench", action="store_true",
                    help="time eager, compiled and (CUDA) compiled + CUDA graphs decoding with each backend; "
                         "compare tokens")
    opts = ap.parse_args(argv)

    device = torch.device(opts.device)
    dtype = _DTYPES[opts.dtype] if opts.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model, tokenizer = build_model(opts.preset, opts.checkpoint, device, dtype, seed=opts.seed)
    prompts = _prompts(opts, tokenizer, model.args.vocab_size)
    eos_id = opts.eos_id
    if eos_id is None and tokenizer is not None:
        eos_id = tokenizer.eos_token_id
    max_seq_len = max(len(p) for p in prompts) + opts.max_new_tokens
    print(f"model: {opts.checkpoint or opts.preset} ({describe(model.args)}), {device} {str(dtype)[6:]}; "
          f"mla kernel: {'CUDA' if device.type == 'cuda' and _has_kernel() else 'reference'}")

    if opts.bench:
        return _bench(opts, model, prompts, max_seq_len, eos_id, device)

    gen = Generator(model, len(prompts), max_seq_len, compile=opts.compile, cuda_graphs=opts.cuda_graphs,
                    prefill_chunk=opts.prefill_chunk, backend=opts.backend)
    if opts.compile:
        print("compiling the decode step on its first call (about 30 s on a 2-core CPU the first time, "
              "then cached; --no-compile skips it)", file=sys.stderr, flush=True)
    result = gen.generate(prompts, opts.max_new_tokens, opts.temperature, opts.top_p, opts.seed, eos_id,
                          progress=opts.max_new_tokens >= 256)
    for i, (p, toks) in enumerate(zip(prompts, result.tokens)):
        print(f"[{i}] prompt ({len(p)} tokens) -> {len(toks)} new tokens: {toks}")
        if tokenizer is not None:
            print(f"    {tokenizer.decode(toks)!r}")
    _print_result(_mode_name(opts.compile, gen.cuda_graphs, opts.backend), result)
    return 0


def _has_kernel() -> bool:
    import torch_mla

    return torch_mla.has_cuda_kernel()


def _mode_name(compile_: bool, graphs: bool, backend: str) -> str:
    if not compile_:
        return "eager"
    return ("compiled" if backend == "inductor" else f"compiled ({backend} backend)") + (" + CUDA graphs" if graphs else "")


def _bench(opts, model, prompts, max_seq_len, eos_id, device) -> int:
    """Each mode: one warm-up generation (compiles, captures), then a timed one with the same prompts."""
    from torch._dynamo.utils import counters

    modes = [(False, False, "inductor"), (True, False, "inductor")]
    if device.type == "cuda":
        modes += [(True, True, "inductor"), (True, True, "eager")]
        print(f"device: {torch.cuda.get_device_name(device)}")
    rows, reference = [], None
    for compile_, graphs, backend in modes:
        name = _mode_name(compile_, graphs, backend)
        torch._dynamo.reset()
        counters.clear()
        gen = Generator(model, len(prompts), max_seq_len, compile=compile_, cuda_graphs=graphs,
                        prefill_chunk=opts.prefill_chunk, backend=backend)
        gen.generate(prompts, min(opts.max_new_tokens, 4), eos_id=eos_id)  # warm-up
        r = gen.generate(prompts, opts.max_new_tokens, opts.temperature, opts.top_p, opts.seed, eos_id)
        _print_result(name, r)
        if graphs and counters["inductor"]["cudagraph_skips"]:
            print(f"warning: [{name}] the step did not run as a CUDA graph (see TORCH_LOGS=perf_hints)")
        if reference is None:
            reference = r.tokens
        same = sum(a == b for a, b in zip(r.tokens, reference))
        rows.append((name, r, f"{same}/{len(reference)}"))
        del gen
    print("\n| mode | decode tokens/s | ms/token | prefill ms | rows with eager's tokens |")
    print("|---|---|---|---|---|")
    for name, r, same in rows:
        print(f"| {name} | {r.tokens_per_s:.1f} | {r.ms_per_token:.2f} | {1000 * r.prefill_s:.1f} | {same} |")
    print("(batch {}, prompt {} tokens, {} new tokens; with inductor, in bf16, a row may leave eager's tokens "
          "after a near tie of its top two logits)".format(len(prompts), len(prompts[0]), opts.max_new_tokens))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
