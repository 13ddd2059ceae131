"""Benchmarks: ``python -m torch_mla.bench [--quick|--small] [--baseline ...] [--json PATH]`` times the
decode kernel; ``python -m torch_mla.bench decoder [options]`` times the reference decoder's modes.

Follows the protocol of docs/benchmarks.md: measures the device's ceilings (device-to-device copy
bandwidth, bf16 8192^3 matrix rate) in the same run, then for each shape builds random inputs
with pages scattered by a random permutation, checks each kernel's result against the reference,
and times ``mla.decode`` (metadata made once beforehand) two ways: ``triton.testing.do_bench``
(median) around the Python call, and the replay of a CUDA graph of the same call.

When FlashMLA (``flash_mla``) is importable, it is timed on the same inputs in the same process:
the two kernels alternate (a, b, a, b) and each keeps the better of its two medians, so a drift of
the device during the sweep hits both alike. Each row then prints both times and the ratio
(FlashMLA µs / torch-mla µs: above 1, torch-mla is faster); the end prints the geometric mean of
the ratio per class of rows.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import platform
import subprocess
import sys
import time

import torch

import torch_mla
from torch_mla import ops, reference
from torch_mla.testing import random_inputs
from torch_mla.ops import HEAD_DIM, HEAD_DIM_V

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.float8_e4m3fn}
# fp8: a bf16 q over an e4m3 cache (the op quantizes q row by row). Its rows also time torch-mla's
# bf16 kernel on the bf16 cache the e4m3 one was quantized from ("torch_mla_bf16"), alternating
# with the others, and FlashMLA (bf16: it has no FP8 dense path) on that bf16 cache.
FP8_SCALE = 1 / 64  # descale_k of the bench's e4m3 caches (randn values: |x| / scale well inside 448)
# The classes the summary reports (geometric mean of the ratio in each).
CLASSES = ("compute-bound (b=128, h_q*s_q >= 128)", "memory-bound (b=128, h_q*s_q <= 64)", "small batch (b < 128)")


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


def checked_sequences(lens: torch.Tensor, count: int = 8, seed: int = 0) -> torch.Tensor:
    """The sequences the reference check compares: the shortest (lse is a few scores: their errors
    show undamped) and the longest (the longest accumulation), then others in a seeded order."""
    lens = lens.cpu()
    ends = list(dict.fromkeys([int(lens.argmin()), int(lens.argmax())]))
    order = torch.randperm(lens.numel(), generator=torch.Generator().manual_seed(seed)).tolist()
    return torch.tensor((ends + [i for i in order if i not in ends])[:count], dtype=torch.long)


def check(q, kv_cache, block_table, lens, out, lse, causal, max_seqs=8, descale_k=None, seed=0):
    """Relative error of out and max abs error of lse against the reference, on a few sequences
    (:func:`checked_sequences`; bounds: 1e-2 / 1e-3, and the contract's FP8 bounds over an e4m3
    cache, ``ops.fp8_error_bounds``)."""
    idx = checked_sequences(lens, max_seqs, seed).to(q.device)
    args = (q[idx], kv_cache, block_table[idx], lens[idx])
    ref_out, ref_lse = reference.decode(*args, HEAD_DIM_V, HEAD_DIM ** -0.5, causal, descale_k=descale_k)
    got = out[idx].float()
    rel = ((got - ref_out.float()).norm() / ref_out.float().norm()).item()
    lse_err = (lse[idx] - ref_lse).abs()
    if descale_k is None:
        out_bound, lse_bound = 1e-2, torch.full_like(lse_err, 1e-3)
    else:
        mag, abs_out = reference.fp8_error_terms(*args, HEAD_DIM_V, HEAD_DIM ** -0.5, causal, descale_k=descale_k)
        out_err, lse_bound = ops.fp8_error_bounds(ref_out.float(), abs_out, mag)
        out_bound = (out_err.norm() / ref_out.float().norm()).item()  # (the contract's, as a norm like rel)
    ok = rel < out_bound and bool((lse_err < lse_bound).all()) and not out.isnan().any().item()
    return ok, rel, lse_err.max().item()


# --------------------------------------------------------------------------------------------
# The kernels under test: each turns one shape's inputs into a call with its metadata made once.
# --------------------------------------------------------------------------------------------


def torch_mla_call(q, kv_cache, block_table, lens, causal, descale_k=None):
    md, ns = torch_mla.get_metadata(lens, q.shape[1] * q.shape[2], 1)
    return lambda: torch_mla.decode(q, kv_cache, block_table, lens, causal=causal, tile_scheduler_metadata=md,
                                    num_splits=ns, descale_k=descale_k)


def load_baseline(choice: str):
    """The FlashMLA module for ``--baseline`` (auto: if importable), or None with the reason."""
    if choice == "none":
        return None, "not asked for (--baseline none)"
    try:
        return importlib.import_module("flash_mla"), None
    except ImportError as e:
        if choice == "flashmla":
            raise SystemExit(f"bench: --baseline flashmla: cannot import flash_mla ({e})")
        return None, f"flash_mla is not importable ({e})"


def flashmla_call(flash_mla, q, kv_cache, block_table, lens, causal):
    md, ns = flash_mla.get_mla_metadata(lens, q.shape[1] * q.shape[2], 1)
    return lambda: flash_mla.flash_mla_with_kvcache(q, kv_cache, block_table, lens, HEAD_DIM_V, md, ns, causal=causal)


def _graph_of(call):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return graph


def time_alternating(calls: dict, rounds: int = 2) -> dict:
    """{name: (eager µs, graph µs)}: the kernels take turns (a, b, a, b), each keeps its best median."""
    graphs = {name: _graph_of(call) for name, call in calls.items()}
    best = {name: [math.inf, math.inf] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            best[name][0] = min(best[name][0], _do_bench(call))
        for name, graph in graphs.items():
            best[name][1] = min(best[name][1], _do_bench(graph.replay))
    return {name: tuple(v) for name, v in best.items()}


def row_class(row: dict) -> str:
    if row["b"] < 128:
        return CLASSES[2]
    return CLASSES[0] if row["s_q"] * row["h_q"] >= 128 else CLASSES[1]


def bench_shape(batch, s_q, h_q, seqlen, varlen, ceilings, dtype=torch.bfloat16, flash_mla=None, causal=True,
                seed=0) -> dict:
    fp8 = dtype == torch.float8_e4m3fn
    q, kv_cache, block_table, lens = random_inputs(batch, s_q, h_q, seqlen, varlen=varlen,
                                                   dtype=torch.bfloat16 if fp8 else dtype, device="cuda", seed=seed)
    descale_k = torch.tensor([FP8_SCALE], device="cuda") if fp8 else None
    cache = torch_mla.quantize_fp8(kv_cache, descale_k) if fp8 else kv_cache
    calls = {"torch_mla": torch_mla_call(q, cache, block_table, lens, causal, descale_k)}
    if fp8:
        calls["torch_mla_bf16"] = torch_mla_call(q, kv_cache, block_table, lens, causal)
    if flash_mla is not None:
        calls["flashmla"] = flashmla_call(flash_mla, q, kv_cache, block_table, lens, causal)
    total_kv = int(lens.sum())
    nbytes = total_kv * HEAD_DIM * cache.element_size() + (batch * s_q * h_q * (HEAD_DIM + HEAD_DIM_V)) * 2
    flops = 2 * s_q * h_q * total_kv * (HEAD_DIM + HEAD_DIM_V)
    row = {"b": batch, "s_q": s_q, "seqlen": seqlen, "h_q": h_q, "varlen": varlen, "causal": causal,
           "dtype": "fp8" if fp8 else str(dtype).removeprefix("torch."), "total_kv": total_kv, "bytes": nbytes,
           "flops": flops}
    for name, call in calls.items():
        out, lse = call()
        ours_fp8 = name == "torch_mla" and fp8
        ok, rel, lse_err = check(q, cache if ours_fp8 else kv_cache, block_table, lens, out, lse, causal,
                                 descale_k=descale_k if ours_fp8 else None, seed=seed)
        row[name] = {"ok": ok, "out_rel_err": rel, "lse_abs_err": lse_err}
    for name, (eager_us, graph_us) in time_alternating(calls).items():
        row[name].update(us=eager_us, graph_us=graph_us)
    add_figures(row, ceilings)
    del q, kv_cache, block_table, lens, calls
    torch.cuda.empty_cache()
    return row


def add_figures(row: dict, ceilings: dict) -> None:
    """Rates, fractions of the ceilings and, with a baseline, the ratios (FlashMLA µs / ours)."""
    for name in ("torch_mla", "torch_mla_bf16", "flashmla"):
        k = row.get(name)
        if k is None:
            continue
        k["GBps"] = row["bytes"] / (k["us"] * 1e-6) / 1e9
        k["TFLOPs"] = row["flops"] / (k["us"] * 1e-6) / 1e12
        k["frac_copy"] = k["GBps"] / ceilings["copy_GBps"]
        k["frac_matmul"] = k["TFLOPs"] / ceilings["matmul_TFLOPs"]
    if "flashmla" in row:
        row["ratio"] = row["flashmla"]["us"] / row["torch_mla"]["us"]
        row["graph_ratio"] = row["flashmla"]["graph_us"] / row["torch_mla"]["graph_us"]
    if "torch_mla_bf16" in row:  # an fp8 row: the speed-up over torch-mla's own bf16 kernel
        row["fp8_speedup"] = row["torch_mla_bf16"]["us"] / row["torch_mla"]["us"]
        row["fp8_graph_speedup"] = row["torch_mla_bf16"]["graph_us"] / row["torch_mla"]["graph_us"]


def format_row(row: dict) -> str:
    ours = row["torch_mla"]
    line = (f"b={row['b']:<3} s_q={row['s_q']} seqlen={row['seqlen']:<5} h_q={row['h_q']:<3} "
            f"{'var' if row['varlen'] else 'fix'} ok={ours['ok']!s:<5} us={ours['us']:8.1f} "
            f"graph_us={ours['graph_us']:8.1f} {row['dtype']} TFLOP/s={ours['TFLOPs']:5.0f} "
            f"copy%={100 * ours['frac_copy']:4.0f} mm%={100 * ours['frac_matmul']:4.0f}")
    bf16 = row.get("torch_mla_bf16")
    if bf16 is not None:
        line += (f" | torch-mla bf16 us={bf16['us']:8.1f} graph_us={bf16['graph_us']:8.1f} "
                 f"fp8_x={row['fp8_speedup']:.2f} graph_fp8_x={row['fp8_graph_speedup']:.2f}")
    base = row.get("flashmla")
    if base is not None:
        line += (f" | flashmla ok={base['ok']!s:<5} us={base['us']:8.1f} graph_us={base['graph_us']:8.1f} "
                 f"mm%={100 * base['frac_matmul']:4.0f} copy%={100 * base['frac_copy']:4.0f} "
                 f"x={row['ratio']:.2f} graph_x={row['graph_ratio']:.2f}")
    return line


def _geomean(xs):
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def _per_class(rows: list[dict], keep, keys) -> dict:
    """Per class of the rows ``keep`` takes: the count, and the geometric mean, min and max of
    each of ``keys`` over the rows that have it."""
    out = {}
    for cls in CLASSES:
        mine = [r for r in rows if keep(r) and row_class(r) == cls]
        if not mine:
            continue
        out[cls] = {"rows": len(mine)}
        for key in keys:
            vals = [r[key] for r in mine if key in r]
            if vals:
                out[cls][key] = {"geomean": _geomean(vals), "min": min(vals), "max": max(vals)}
    return out


def summarize(rows: list[dict]) -> dict:
    """Per class of rows: count, geometric mean, min and max of the ratio on both timings.

    Empty when no row has a baseline. The ratio is FlashMLA µs / torch-mla µs (above 1: faster).
    fp8 rows are left to :func:`summarize_fp8`.
    """
    return _per_class(rows, lambda r: "ratio" in r and r["dtype"] != "fp8", ("ratio", "graph_ratio"))


def summarize_fp8(rows: list[dict]) -> dict:
    """Per class of fp8 rows: the speed-up over torch-mla's bf16 kernel (bf16 µs / fp8 µs) on both
    timings, and the ratio to FlashMLA's bf16 where it ran; geometric mean, min and max."""
    return _per_class(rows, lambda r: "fp8_speedup" in r,
                      ("fp8_speedup", "fp8_graph_speedup", "ratio", "graph_ratio"))


def format_fp8_summary(summary: dict) -> list[str]:
    lines = []
    for cls, s in summary.items():
        e, g = s["fp8_speedup"], s["fp8_graph_speedup"]
        line = (f"fp8 {cls}: {s['rows']} rows, torch-mla bf16 / fp8 geomean {e['geomean']:.3f} "
                f"(min {e['min']:.2f}, max {e['max']:.2f}); graph replay {g['geomean']:.3f} "
                f"(min {g['min']:.2f}, max {g['max']:.2f})")
        if "ratio" in s:
            line += f"; FlashMLA bf16 / torch-mla fp8 {s['ratio']['geomean']:.3f}"
        lines.append(line)
    return lines


def format_summary(summary: dict) -> list[str]:
    lines = []
    for cls, s in summary.items():
        r, g = s["ratio"], s["graph_ratio"]
        lines.append(f"{cls}: {s['rows']} rows, FlashMLA / torch-mla geomean {r['geomean']:.3f} "
                     f"(min {r['min']:.2f}, max {r['max']:.2f}); graph replay {g['geomean']:.3f} "
                     f"(min {g['min']:.2f}, max {g['max']:.2f})")
    return lines


def _run_line(run: dict) -> str:
    """The line above a run's table: its device, date, commit, torch and the run's ceilings."""
    c = run["ceilings"]
    return (f"{run['device']}, {run['date']}, torch-mla {run['commit']}, torch {run['torch']}; ceilings in this run: "
            f"copy {c['copy_GBps']:.0f} GB/s, bf16 matmul {c['matmul_TFLOPs']:.0f} TFLOP/s.")


def markdown_table(run: dict) -> str:
    """A run's JSON (``--json``) as the markdown table docs/benchmarks.md shows, summary included."""
    lines = [_run_line(run), "",
             "| b | s_q | seqlen | h_q | lengths | dtype | FlashMLA µs | torch-mla µs | ratio | FlashMLA graph µs "
             "| torch-mla graph µs | graph ratio | FlashMLA % mm / % copy | torch-mla % mm / % copy |",
             "|" + "---|" * 14]
    dash = "-"
    for r in run["rows"]:
        ours, base = r["torch_mla"], r.get("flashmla")
        frac = lambda k: f"{100 * k['frac_matmul']:.0f} / {100 * k['frac_copy']:.0f}"
        lines.append("| " + " | ".join([
            str(r["b"]), str(r["s_q"]), str(r["seqlen"]), str(r["h_q"]), "varlen" if r["varlen"] else "fixed",
            r["dtype"].replace("bfloat16", "bf16").replace("float16", "fp16"),
            f"{base['us']:.1f}" if base else dash, f"{ours['us']:.1f}", f"{r['ratio']:.2f}" if base else dash,
            f"{base['graph_us']:.1f}" if base else dash, f"{ours['graph_us']:.1f}",
            f"{r['graph_ratio']:.2f}" if base else dash, frac(base) if base else dash, frac(ours)]) + " |")
    summary = run.get("summary") or summarize(run["rows"])
    if summary:
        lines += ["", "| rows | count | ratio: geomean (min-max) | graph ratio: geomean (min-max) |", "|---|---|---|---|"]
        for cls, s in summary.items():
            r, g = s["ratio"], s["graph_ratio"]
            lines.append(f"| {cls} | {s['rows']} | {r['geomean']:.3f} ({r['min']:.2f}-{r['max']:.2f}) | "
                         f"{g['geomean']:.3f} ({g['min']:.2f}-{g['max']:.2f}) |")
    return "\n".join(lines)


def fp8_markdown_table(run: dict) -> str:
    """The fp8 rows of a run: torch-mla's FP8 kernel beside its bf16 kernel and FlashMLA's bf16 on
    the same inputs, and the summary per class."""
    lines = [_run_line(run) + " fp8: a bf16 q over an e4m3 cache; bf16: the bf16 cache it was quantized from.", "",
             "| b | s_q | seqlen | h_q | lengths | torch-mla fp8 µs | torch-mla bf16 µs | bf16 / fp8 | FlashMLA bf16 µs "
             "| FlashMLA / fp8 | fp8 graph µs | bf16 graph µs | graph bf16 / fp8 | fp8 % copy |",
             "|" + "---|" * 14]
    dash = "-"
    for r in run["rows"]:
        if "fp8_speedup" not in r:
            continue
        ours, bf16, base = r["torch_mla"], r["torch_mla_bf16"], r.get("flashmla")
        lines.append("| " + " | ".join([
            str(r["b"]), str(r["s_q"]), str(r["seqlen"]), str(r["h_q"]), "varlen" if r["varlen"] else "fixed",
            f"{ours['us']:.1f}", f"{bf16['us']:.1f}", f"{r['fp8_speedup']:.2f}",
            f"{base['us']:.1f}" if base else dash, f"{r['ratio']:.2f}" if base else dash,
            f"{ours['graph_us']:.1f}", f"{bf16['graph_us']:.1f}", f"{r['fp8_graph_speedup']:.2f}",
            f"{100 * ours['frac_copy']:.0f}"]) + " |")
    summary = run.get("fp8_summary") or summarize_fp8(run["rows"])
    if summary:
        lines += ["", "| rows | count | bf16 / fp8: geomean (min-max) | graph: geomean (min-max) | FlashMLA bf16 / fp8 |",
                  "|---|---|---|---|---|"]
        for cls, s in summary.items():
            e, g = s["fp8_speedup"], s["fp8_graph_speedup"]
            fm = f"{s['ratio']['geomean']:.3f}" if "ratio" in s else dash
            lines.append(f"| {cls} | {s['rows']} | {e['geomean']:.3f} ({e['min']:.2f}-{e['max']:.2f}) | "
                         f"{g['geomean']:.3f} ({g['min']:.2f}-{g['max']:.2f}) | {fm} |")
    return "\n".join(lines)


# b=1/8/32/64 at h_q 16 and 128, as (b, s_q, h_q, seqlen, varlen).
SMALL_BATCH_ROWS = [(1, 1, 16, 4096, False), (1, 1, 128, 32768, False), (8, 1, 16, 8192, False),
                    (8, 1, 128, 8192, False), (32, 1, 16, 4096, False), (32, 1, 128, 4096, False),
                    (64, 1, 16, 2048, False), (64, 1, 128, 2048, False)]


def shapes(quick: bool = False, small: bool = False):
    if small:
        return list(SMALL_BATCH_ROWS)
    if quick:
        rows = [(128, s_q, h_q, seqlen, False) for s_q, h_q, seqlen in
                ((1, 16, 8192), (1, 32, 4096), (1, 64, 4096), (1, 128, 4096), (2, 128, 4096))]
        return rows + [(1, 1, 16, 4096, False), (8, 1, 128, 8192, False), (64, 1, 128, 2048, False)]
    rows = [(128, s_q, h_q, seqlen, varlen) for seqlen in (4096, 8192, 16384) for h_q in (16, 32, 64, 128)
            for s_q in (1, 2) for varlen in (False, True)]
    return rows + SMALL_BATCH_ROWS


def _dtype_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in DTYPES]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(DTYPES)}, got {text!r}")
    return names


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def run_kernel_sweep(args) -> int:
    if not torch.cuda.is_available():
        print("bench: needs a CUDA GPU; none is visible", file=sys.stderr)
        return 2
    if not torch_mla.has_cuda_kernel():
        print(f"bench: the CUDA kernel is not loaded ({torch_mla.cuda_kernel_error()})", file=sys.stderr)
        return 2
    flash_mla, absent = load_baseline(args.baseline)
    torch.backends.cuda.matmul.allow_tf32 = False
    results = []
    with torch.inference_mode():
        ceilings = measure_ceilings()
        device = torch.cuda.get_device_name()
        print(f"device: {device}  copy {ceilings['copy_GBps']:.0f} GB/s  "
              f"bf16 matmul {ceilings['matmul_TFLOPs']:.0f} TFLOP/s", flush=True)
        print(f"baseline: {'FlashMLA ' + flash_mla.__file__ if flash_mla else 'absent: ' + absent}", flush=True)
        seed = 0
        for dtype in args.dtype:
            for b, s_q, h_q, seqlen, varlen in shapes(args.quick, args.small):
                seed += 1
                row = bench_shape(b, s_q, h_q, seqlen, varlen, ceilings, dtype=DTYPES[dtype], flash_mla=flash_mla,
                                  seed=seed)
                results.append(row)
                print(format_row(row), flush=True)
    summary, fp8_summary = summarize(results), summarize_fp8(results)
    for line in format_summary(summary) + format_fp8_summary(fp8_summary):
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "torch": torch.__version__, "commit": args.commit or _commit(),
                       "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host": platform.node(),
                       "baseline": flash_mla.__file__ if flash_mla else None, "ceilings": ceilings,
                       "summary": summary, "fp8_summary": fp8_summary, "rows": results}, f, indent=1)
    bad = [r for r in results for k in ("torch_mla", "torch_mla_bf16", "flashmla") if k in r and not r[k]["ok"]]
    if bad:
        print(f"bench: {len(bad)} results failed the reference check", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m torch_mla.bench", description="Time the decode kernel (and FlashMLA, when importable).",
        epilog="python -m torch_mla.bench decoder --help: the reference decoder's eager / compiled / CUDA-graph modes")
    parser.add_argument("--quick", action="store_true", help="a few representative shapes")
    parser.add_argument("--small", action="store_true", help="only the small-batch rows")
    parser.add_argument("--dtype", type=_dtype_list, default=["bf16"],
                        help="bf16, fp16, fp8 (a bf16 q over an e4m3 cache, beside torch-mla's bf16 kernel), "
                             "or a list: bf16,fp8")
    parser.add_argument("--baseline", choices=("auto", "flashmla", "none"), default="auto",
                        help="time FlashMLA on the same inputs: auto (when flash_mla is importable, the default), "
                             "flashmla (required), none")
    parser.add_argument("--json", help="write the rows, the ceilings and the summary as JSON here")
    parser.add_argument("--commit", help="the commit to record in the JSON (default: git rev-parse of this checkout)")
    parser.add_argument("--table", metavar="JSON", help="print an earlier run's JSON as a markdown table (no GPU)")
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["decoder"]:
        return bench_decoder(argv[1:])
    args = build_parser().parse_args(argv)
    if args.quick and args.small:
        build_parser().error("--quick and --small pick different rows: give one")
    if args.table:
        try:
            with open(args.table) as f:
                run = json.load(f)
            fp8 = any("fp8_speedup" in r for r in run["rows"])
            print(fp8_markdown_table(run) if fp8 else markdown_table(run))
        except (OSError, ValueError, KeyError, TypeError) as e:
            build_parser().error(f"--table {args.table}: not a benchmark JSON ({type(e).__name__}: {e})")
        return 0
    return run_kernel_sweep(args)


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
    from .generate import add_model_options, build_model, figures, kernel_name, resolve

    ap = argparse.ArgumentParser(prog="python -m torch_mla.bench decoder", description=bench_decoder.__doc__)
    add_model_options(ap)
    opts = ap.parse_args(argv)
    plan = resolve(ap, opts)
    model = build_model(plan)
    name = torch.cuda.get_device_name(plan.device) if plan.device.type == "cuda" else "cpu"
    print(f"decoder: {plan.weights}; {name}, {str(plan.dtype).removeprefix('torch.')}, "
          f"mla.decode by {kernel_name(plan.device)}", flush=True)
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
    sys.exit(main())
