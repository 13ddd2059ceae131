"""Generation with the reference DeepSeek decoder: prefill, the compiled decode step, sampling,
CUDA-graph replay, and :class:`Generator`, which runs them over a paged latent cache.

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

import sys
import time
from dataclasses import dataclass, field

import torch

from .cache import BLOCK_SIZE, PagedKVCache, slot_mapping
from .models.deepseek import Transformer
from .ops import FP8

BACKENDS = ("inductor", "eager")  # torch.compile backends of the decode step (see the module docstring)

__all__ = ["BACKENDS", "decode_step", "prefill", "sample", "CudaGraphStep", "Generator", "GenerationResult"]


def decode_step(model: Transformer, kv_cache: torch.Tensor, block_table: torch.Tensor,
                tokens: torch.Tensor, positions: torch.Tensor, kv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """One token for every row: ``tokens [b]`` int64 at ``positions [b]`` int64 -> logits ``[b, vocab]``.

    A row with position -1 is idle (padding): nothing is written, its logits are meaningless.
    Lengths and slots are derived on the device, so the step has static shapes and no host sync.
    ``kv_scale``: an FP8 cache's ``[1]`` float32 scale (``PagedKVCache.kv_scale``).
    """
    pos = positions[:, None]
    seqlens = torch.where(positions >= 0, positions + 1, 0).to(torch.int32)
    slots = slot_mapping(block_table, pos)
    return model(tokens[:, None], pos, kv_cache, block_table, seqlens, slots, causal=False, kv_scale=kv_scale)[:, 0]


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
                           causal=True, last_only=True, kv_scale=cache.kv_scale)
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
                 tokens: torch.Tensor, positions: torch.Tensor, kv_scale: torch.Tensor | None = None) -> torch.Tensor:
        key = (id(model), kv_cache.data_ptr(), kv_cache.shape, block_table.data_ptr(), block_table.shape,
               tokens.shape, positions.shape, None if kv_scale is None else kv_scale.data_ptr())
        if key != self._key:
            self._capture(model, kv_cache, block_table, tokens, positions, kv_scale)
            self._key = key
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.graph.replay()
        return self.logits

    def _capture(self, model, kv_cache, block_table, tokens, positions, kv_scale) -> None:
        self.graph = None
        self.tokens, self.positions = tokens.clone(), positions.clone()
        side = torch.cuda.Stream(device=tokens.device)
        side.wait_stream(torch.cuda.current_stream(tokens.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.step(model, kv_cache, block_table, self.tokens, self.positions, kv_scale)
        torch.cuda.current_stream(tokens.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self.step(model, kv_cache, block_table, self.tokens, self.positions, kv_scale)
        self.graph = graph


@dataclass
class GenerationResult:
    """Generated tokens per prompt (stopping at and including EOS), timings in seconds.

    The first token of each row comes from prefill; each decode step adds one to every row. When
    the step is compiled, its first calls (compiling; with inductor's CUDA graphs also the second,
    which records the graph) are timed on their own, ``compile_s``, and the decode figures cover
    the steps after them; eager, they cover every step.
    """

    tokens: list[list[int]]
    batch_size: int
    prompt_tokens: int
    prefill_s: float  # prefill and sampling the first tokens: the time to first token
    compile_s: float | None  # the decode steps that compile / capture; None when eager (or none ran)
    decode_s: float  # the timed decode steps
    decode_steps: int
    decode_tokens: int  # tokens those steps generated, rows already stopped at EOS not counted
    peak_memory_bytes: int | None = None  # CUDA allocator peak of the generation; None on the CPU
    step_margins: list[list[float]] = field(default_factory=list)  # greedy: top-1 minus top-2 logit

    @property
    def ttft_s(self) -> float:
        """Time to first token: prefill of the whole batch plus sampling."""
        return self.prefill_s

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s

    @property
    def ms_per_step(self) -> float | None:
        """Latency of one decode step (one token for every row); None without timed steps."""
        return 1000 * self.decode_s / self.decode_steps if self.decode_steps else None

    @property
    def tokens_per_s(self) -> float | None:
        """Generated tokens per second over the timed steps; None without timed steps."""
        return self.decode_tokens / self.decode_s if self.decode_steps and self.decode_s > 0 else None


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

                self.bar = tqdm(total=total, unit="step", desc="decode", file=sys.stderr, leave=False)
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
        kv_cache_dtype: the cache's dtype: None (the model's) or ``torch.float8_e4m3fn`` (an FP8
            cache, half the bytes of bf16; its rows are quantized with ``kv_scale``).
        kv_scale: an FP8 cache's dequantization scale (see :class:`PagedKVCache`).
    """

    def __init__(self, model: Transformer, max_batch_size: int, max_seq_len: int, num_blocks: int | None = None,
                 compile: bool = True, cuda_graphs: bool | None = None, prefill_chunk: int = 512,
                 backend: str = "inductor", kv_cache_dtype: torch.dtype | None = None, kv_scale: float = 1.0):
        self.model = model
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_seq_len < 1 or max_seq_len > model.args.max_seq_len:
            raise ValueError(f"max_seq_len must be in [1, {model.args.max_seq_len}] (the model's RoPE tables), "
                             f"got {max_seq_len}")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if kv_cache_dtype not in (None, self.dtype, FP8):
            raise ValueError(f"kv_cache_dtype must be None (the model's {self.dtype}) or torch.float8_e4m3fn, "
                             f"got {kv_cache_dtype}")
        if num_blocks is None:
            num_blocks = max_batch_size * -(-max_seq_len // BLOCK_SIZE)
        self.cache = PagedKVCache(model.args.n_layers, num_blocks, max_batch_size, max_seq_len,
                                  dtype=kv_cache_dtype or self.dtype, device=self.device, kv_scale=kv_scale)
        self.prefill_chunk = prefill_chunk
        if cuda_graphs and not compile:
            raise ValueError("cuda_graphs replays the compiled step: it needs compile=True")
        self.compiled = compile
        self.cuda_graphs = bool(compile and (self.device.type == "cuda" if cuda_graphs is None else cuda_graphs))
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs needs a CUDA model, got {self.device}")
        self.backend = backend if compile else None
        self.step = decode_step
        if compile:
            # Static addresses: CUDA graphs may then mutate / read them in place without copies.
            torch._dynamo.mark_static_address(self.cache.kv)
            torch._dynamo.mark_static_address(self.cache.block_table)
            if self.cache.kv_scale is not None:
                torch._dynamo.mark_static_address(self.cache.kv_scale)
            mode = "reduce-overhead" if self.cuda_graphs and backend == "inductor" else None
            self.step = torch.compile(decode_step, fullgraph=True, dynamic=False, backend=backend, mode=mode)
            if self.cuda_graphs and backend != "inductor":
                self.step = CudaGraphStep(self.step)

    @property
    def mode(self) -> str:
        """How the decode step runs, in words: "eager", "compiled (inductor) + CUDA graphs", ..."""
        if not self.compiled:
            return "eager"
        return f"compiled ({self.backend})" + (" + CUDA graphs" if self.cuda_graphs else "")

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, eos_id: int | None = None,
                 progress: bool = False, record_margins: bool = False) -> GenerationResult:
        """Generate up to ``max_new_tokens`` tokens after each prompt (fewer when a row hits ``eos_id``).

        ``progress``: a progress bar on stderr, and a line before and after the first compiled
        step saying that it compiles and how long it took.
        """
        cache, device = self.cache, self.device
        n = len(prompts)
        if not 1 <= n <= cache.max_batch_size:
            raise ValueError(f"need 1 to max_batch_size={cache.max_batch_size} prompts, got {n}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0 or temperature != temperature:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        vocab = self.model.args.vocab_size
        for i, p in enumerate(prompts):
            if any(not 0 <= t < vocab for t in p):
                raise ValueError(f"prompt {i} has token ids outside [0, {vocab})")
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
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

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

        # Compiled, the first step compiles (and captures), and inductor's CUDA graphs record on the
        # second: time those calls apart from the steady steps.
        first_timed = 1 + self.compiled + (self.cuda_graphs and self.backend == "inductor")
        if self.compiled and progress and max_new_tokens > 1:
            graphs = " and capturing its CUDA graph" if self.cuda_graphs else ""
            print(f"compiling the decode step with {self.backend}{graphs} (the first decode steps) ...",
                  file=sys.stderr, flush=True)
        bar = None if self.compiled else _Progress(max_new_tokens - 1, progress)  # compiled: after the first step
        compile_s, t2, steps = None, t1, 0
        for i in range(1, max_new_tokens):
            if eos_id is not None and i % 8 == 0 and bool(done.all()):
                break  # checked every few steps: each check is a host sync
            if self.cuda_graphs and self.backend == "inductor":
                torch.compiler.cudagraph_mark_step_begin()
            logits = self.step(self.model, cache.kv, cache.block_table, tokens, positions, cache.kv_scale)[:n]
            if record_margins:
                margins.append(logits.topk(2, dim=-1).values.diff(dim=-1).neg().squeeze(-1))
            next_tokens = sample(logits, temperature, top_p, generator)
            tokens = torch.zeros_like(tokens)
            tokens[:n] = next_tokens
            positions[:n] += 1
            out.append(next_tokens)
            if eos_id is not None:
                done |= next_tokens == eos_id
            if i == first_timed - 1:
                _sync(device)
                t2 = time.perf_counter()
                compile_s = t2 - t1
                if progress:
                    print(f"compiled in {compile_s:.1f} s", file=sys.stderr, flush=True)
                bar = _Progress(max_new_tokens - first_timed, progress)
            elif i >= first_timed:
                steps += 1
                bar.update()
        _sync(device)
        t3 = time.perf_counter()
        if bar is not None:
            bar.close()

        generated = torch.stack(out, dim=1).tolist()
        if eos_id is not None:
            generated = [row[: row.index(eos_id) + 1] if eos_id in row else row for row in generated]
        result = GenerationResult(
            tokens=generated, batch_size=n, prompt_tokens=sum(len(p) for p in prompts), prefill_s=t1 - t0,
            compile_s=compile_s, decode_s=t3 - t2, decode_steps=steps,
            decode_tokens=sum(max(0, len(row) - first_timed) for row in generated),
            peak_memory_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None)
        if record_margins:
            result.step_margins = torch.stack(margins, dim=1).tolist()
        return result
