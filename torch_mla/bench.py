"""Kernel benchmark: ``python -m torch_mla.bench [--quick] [--json PATH]``.

Follows the protocol of BENCHMARKS.md: measures the device's ceilings (device-to-device copy
bandwidth, bf16 8192^3 matrix rate) in the same run, then for each shape builds random inputs
with pages scattered by a random permutation, checks the result against the reference, and
times ``mla.decode`` (metadata made once beforehand, as FlashMLA is timed) two ways:
``triton.testing.do_bench`` (median) around the Python call, and the replay of a CUDA graph of
the same call. Each row: µs, GB/s, TFLOP/s, fractions of the ceilings, FlashMLA's figure (measured
on an H100 80GB HBM3; on another device the bench says so, since the comparison then crosses
devices) and our speed-up over it (its µs / ours).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time

import torch

import torch_mla
from torch_mla import reference

HEAD_DIM, HEAD_DIM_V, PAGE = 576, 512, 64

# FlashMLA (April 2025), H100 80GB HBM3, BENCHMARKS.md: (b, s_q, seqlen, h_q) -> (µs fixed, µs varlen)
FLASHMLA_DEVICE = "NVIDIA H100 80GB HBM3"
FLASHMLA_US = {
    (128, 1, 4096, 16): (231, 244), (128, 1, 4096, 64): (234, 252), (128, 1, 4096, 128): (266, 304),
    (128, 2, 4096, 128): (483, 500), (128, 1, 8192, 16): (441, 450), (128, 1, 8192, 128): (544, 575),
    (128, 2, 8192, 128): (950, 957), (128, 1, 16384, 16): (850, 843), (128, 1, 16384, 64): (879, 873),
    (128, 1, 16384, 128): (1065, 998), (128, 2, 16384, 128): (1869, 1820),
    (1, 1, 4096, 16): (28.3, None), (1, 1, 32768, 128): (72.9, None), (8, 1, 8192, 128): (56.7, None),
    (32, 1, 4096, 128): (85.3, None), (64, 1, 2048, 128): (75.6, None),
}


def _do_bench(fn, warmup=25, rep=100):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median") * 1e3  # µs


def measure_ceilings() -> dict:
    n = (2 << 30) // 2  # 2 GiB of bf16
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_us = _do_bench(lambda: dst.copy_(src))
    copy_gbs = 2 * src.numel() * 2 / (copy_us * 1e-6) / 1e9
    del src, dst
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_us = _do_bench(lambda: a @ b)
    mm_tflops = 2 * 8192 ** 3 / (mm_us * 1e-6) / 1e12
    del a, b
    torch.cuda.empty_cache()
    return {"copy_GBps": copy_gbs, "matmul_TFLOPs": mm_tflops}


def make_inputs(batch, s_q, h_q, seqlen, varlen, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    if varlen:
        lens = torch.normal(float(seqlen), seqlen / 2, (batch,), generator=g).round().clamp_min(s_q).int()
    else:
        lens = torch.full((batch,), seqlen, dtype=torch.int32)
    pages = (lens + PAGE - 1) // PAGE
    max_blocks = int(pages.max())
    num_blocks = int(pages.sum())
    perm = torch.randperm(num_blocks, generator=g).int()
    block_table = torch.zeros(batch, max_blocks, dtype=torch.int32)
    offset = 0
    for b in range(batch):
        n = int(pages[b])
        block_table[b, :n] = perm[offset:offset + n]
        offset += n
    torch.manual_seed(seed)
    kv_cache = torch.randn(num_blocks, PAGE, 1, HEAD_DIM, device="cuda", dtype=dtype)
    q = torch.randn(batch, s_q, h_q, HEAD_DIM, device="cuda", dtype=dtype)
    return q, kv_cache, block_table.cuda(), lens.cuda()


def check(q, kv_cache, block_table, lens, out, lse, causal, max_seqs=8):
    """Relative error of out and max abs error of lse against the reference, on a few sequences."""
    idx = torch.randperm(q.shape[0])[:max_seqs].cuda()
    ref_out, ref_lse = reference.decode(q[idx], kv_cache, block_table[idx], lens[idx], HEAD_DIM_V, HEAD_DIM ** -0.5, causal)
    got = out[idx].float()
    rel = ((got - ref_out.float()).norm() / ref_out.float().norm()).item()
    lse_err = (lse[idx] - ref_lse).abs().max().item()
    ok = rel < 1e-2 and lse_err < 1e-3 and not out.isnan().any().item()
    return ok, rel, lse_err


def bench_shape(batch, s_q, h_q, seqlen, varlen, ceilings, causal=True, seed=0) -> dict:
    q, kv_cache, block_table, lens = make_inputs(batch, s_q, h_q, seqlen, varlen, seed=seed)
    md, ns = torch_mla.get_metadata(lens, s_q * h_q, 1)
    call = lambda: torch_mla.decode(q, kv_cache, block_table, lens, causal=causal, tile_scheduler_metadata=md,
                                    num_splits=ns)
    out, lse = call()
    ok, rel, lse_err = check(q, kv_cache, block_table, lens, out, lse, causal)
    eager_us = _do_bench(call)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    graph_us = _do_bench(graph.replay)
    total_kv = int(lens.sum())
    nbytes = (total_kv * HEAD_DIM + batch * s_q * h_q * HEAD_DIM + batch * s_q * h_q * HEAD_DIM_V) * 2
    flops = 2 * s_q * h_q * total_kv * (HEAD_DIM + HEAD_DIM_V)
    peer = FLASHMLA_US.get((batch, s_q, seqlen, h_q), (None, None))[1 if varlen else 0]
    row = {
        "b": batch, "s_q": s_q, "seqlen": seqlen, "h_q": h_q, "varlen": varlen, "causal": causal,
        "total_kv": total_kv, "ok": ok, "out_rel_err": rel, "lse_abs_err": lse_err,
        "us": eager_us, "graph_us": graph_us,
        "GBps": nbytes / (eager_us * 1e-6) / 1e9, "TFLOPs": flops / (eager_us * 1e-6) / 1e12,
        "graph_GBps": nbytes / (graph_us * 1e-6) / 1e9, "graph_TFLOPs": flops / (graph_us * 1e-6) / 1e12,
        "flashmla_us": peer,
        "speedup_vs_flashmla": (peer / eager_us) if peer else None,
        "graph_speedup_vs_flashmla": (peer / graph_us) if peer else None,
    }
    row["frac_copy"] = row["GBps"] / ceilings["copy_GBps"]
    row["frac_matmul"] = row["TFLOPs"] / ceilings["matmul_TFLOPs"]
    del q, kv_cache, block_table, lens, out, lse, graph
    torch.cuda.empty_cache()
    return row


SMALL_BATCH_ROWS = [(1, 1, 16, 4096, False), (1, 1, 128, 32768, False), (8, 1, 128, 8192, False),
                    (32, 1, 128, 4096, False), (64, 1, 128, 2048, False)]


def shapes(quick: bool, small: bool = False):
    rows = []
    if small:
        return list(SMALL_BATCH_ROWS)
    if quick:
        for s_q, h_q, seqlen in ((1, 16, 8192), (1, 64, 4096), (1, 128, 4096), (2, 128, 4096)):
            rows.append((128, s_q, h_q, seqlen, False))
        rows += [(1, 1, 16, 4096, False), (8, 1, 128, 8192, False)]
        return rows
    for seqlen in (4096, 8192, 16384):
        for h_q in (16, 32, 64, 128):
            for s_q in (1, 2):
                for varlen in (False, True):
                    rows.append((128, s_q, h_q, seqlen, varlen))
    return rows + SMALL_BATCH_ROWS


def _fmt(x, spec):
    return format(x, spec) if x is not None else "-"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few representative shapes")
    parser.add_argument("--small", action="store_true", help="only the small-batch rows")
    parser.add_argument("--json", help="write the rows (and ceilings) as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or not torch_mla.has_cuda_kernel():
        sys.exit(f"needs a GPU and the compiled kernel ({torch_mla._CUDA_KERNEL_ERROR})")
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.inference_mode():
        ceilings = measure_ceilings()
        device = torch.cuda.get_device_name()
        print(f"device: {device}  copy {ceilings['copy_GBps']:.0f} GB/s  "
              f"bf16 matmul {ceilings['matmul_TFLOPs']:.0f} TFLOP/s", flush=True)
        if device != FLASHMLA_DEVICE:
            print(f"note: the FlashMLA figures (flashmla_us, x, graph_x) were measured on an {FLASHMLA_DEVICE}, "
                  f"not on this {device}: those columns compare across devices", flush=True)
        results = []
        for i, (b, s_q, h_q, seqlen, varlen) in enumerate(shapes(args.quick, args.small)):
            row = bench_shape(b, s_q, h_q, seqlen, varlen, ceilings, seed=i + 1)
            results.append(row)
            print(f"b={b:<3} s_q={s_q} seqlen={seqlen:<5} h_q={h_q:<3} {'var' if varlen else 'fix'} "
                  f"ok={row['ok']!s:<5} us={row['us']:8.1f} graph_us={row['graph_us']:8.1f} "
                  f"GB/s={row['GBps']:6.0f} TFLOP/s={row['TFLOPs']:5.0f} copy%={100 * row['frac_copy']:4.0f} "
                  f"mm%={100 * row['frac_matmul']:4.0f} flashmla_us={_fmt(row['flashmla_us'], '.1f')} "
                  f"x={_fmt(row['speedup_vs_flashmla'], '.2f')} graph_x={_fmt(row['graph_speedup_vs_flashmla'], '.2f')}",
                  flush=True)
    if args.json:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        except OSError:
            commit = ""
        with open(args.json, "w") as f:
            json.dump({"device": device, "flashmla_device": FLASHMLA_DEVICE,
                       "torch": torch.__version__, "commit": commit,
                       "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host": platform.node(),
                       "ceilings": ceilings, "rows": results}, f, indent=1)
    bad = [r for r in results if not r["ok"]]
    if bad:
        sys.exit(f"{len(bad)} shapes failed the reference check")


# ------------------------------------------------------------------------------------------------
# The decoder: python -m torch_mla.bench decoder [options of python -m torch_mla.generate]
# ------------------------------------------------------------------------------------------------


def decoder_modes(device: torch.device) -> list[tuple[bool, bool, str]]:
    """(compile, cuda_graphs, backend) of each decoder mode timed: eager and compiled; on CUDA also
    compiled + CUDA graphs with each backend."""
    modes = [(False, False, "inductor"), (True, False, "inductor")]
    if device.type == "cuda":
        modes += [(True, True, "inductor"), (True, True, "eager")]
    return modes


def bench_decoder(argv: list[str]) -> int:
    """Each mode: a warm-up generation (it compiles and captures; its first step is the compile
    time), then a timed greedy one on the same prompts; a table of the figures, and how many rows
    gave eager's tokens."""
    from torch._dynamo.utils import counters

    from .engine import Generator
    from .generate import add_model_options, build_model, figures, resolve

    ap = argparse.ArgumentParser(prog="python -m torch_mla.bench decoder", description=bench_decoder.__doc__)
    add_model_options(ap)
    opts = ap.parse_args(argv)
    plan = resolve(ap, opts)
    model = build_model(plan)
    name = torch.cuda.get_device_name(plan.device) if plan.device.type == "cuda" else "cpu"
    print(f"decoder: {plan.weights}; {name}, {str(plan.dtype).removeprefix('torch.')}, "
          f"kernel {'CUDA' if plan.device.type == 'cuda' and torch_mla.has_cuda_kernel() else 'reference'}", flush=True)
    rows, eager_tokens = [], None
    for compile_, graphs, backend in decoder_modes(plan.device):
        torch._dynamo.reset()
        counters.clear()
        gen = Generator(model, len(plan.prompts), plan.max_seq_len, compile=compile_, cuda_graphs=graphs,
                        prefill_chunk=opts.prefill_chunk, backend=backend)
        print(f"[{gen.mode}] warm-up{' (compiling)' if compile_ else ''} ...", file=sys.stderr, flush=True)
        warm = gen.generate(plan.prompts, min(opts.max_new_tokens, 4), eos_id=plan.eos_id)
        r = gen.generate(plan.prompts, opts.max_new_tokens, eos_id=plan.eos_id)
        if graphs and counters["inductor"]["cudagraph_skips"]:
            print(f"warning: [{gen.mode}] the step did not run as a CUDA graph (see TORCH_LOGS=perf_hints)")
        eager_tokens = eager_tokens or r.tokens
        row = {"mode": gen.mode, **figures(r), "compile_s": warm.compile_s,
               "rows_with_eager_tokens": sum(a == b for a, b in zip(r.tokens, eager_tokens))}
        rows.append(row)
        del gen
    fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    print("\n| mode | TTFT ms | prefill tokens/s | ms/step | decode tokens/s | compile s | peak MiB "
          "| rows with eager's tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        peak = None if row["peak_memory_bytes"] is None else row["peak_memory_bytes"] / 2 ** 20
        print(f"| {row['mode']} | {row['ttft_ms']:.1f} | {row['prefill_tokens_per_s']:.0f} "
              f"| {fmt(row['decode_ms_per_step'], '.2f')} | {fmt(row['decode_tokens_per_s'], '.1f')} "
              f"| {fmt(row['compile_s'], '.1f')} | {fmt(peak, '.0f')} "
              f"| {row['rows_with_eager_tokens']}/{len(eager_tokens)} |")
    print(f"(batch {len(plan.prompts)}, longest prompt {max(map(len, plan.prompts))} tokens, {opts.max_new_tokens} new "
          "tokens, greedy; peak memory on the CPU is the process's, so it only grows from row to row; with inductor "
          "in bf16 a row may leave eager's tokens after a near tie of its top two logits)")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"device": name, "weights": plan.weights, "dtype": str(plan.dtype).removeprefix("torch."),
                       "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       "batch_size": len(plan.prompts), "max_new_tokens": opts.max_new_tokens, "rows": rows},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["decoder"]:
        sys.exit(bench_decoder(sys.argv[2:]))
    main()
