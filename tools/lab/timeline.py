"""Where a page's time goes inside the decode kernel: per-page event clocks of a measuring build.

    TORCH_MLA_TIMELINE=1 python3 setup.py build_ext --inplace
    python3 tools/lab/timeline.py [--json PATH] [--fp8] [--shape B,S_Q,SEQLEN,H_Q ...]

The measuring build (csrc/sm90/decode/timeline.cuh) has one thread of each role write clock64()
at fixed points of every page, for the CTAs of the first 4 query tiles x 8 stretches. For each
shape this runs one decode call and prints, in µs (medians over pages and CTAs, the first two
pages of a stretch left out): the period (from one S issue to the next), each phase, and the
hand-offs between them. Clocks convert to time by the CTA's own globaltimer over its lifetime.
--fp8: the FP8 kernel (a bf16 q over an e4m3 cache), whose stamps sit at the same points; its
refill is issued by the producer once S and both value warpgroups are done with the stage, and a
stage comes back kStages pages later: 3 in the 64-row form, 4 in the narrow form (h_q * s_q <=
32; kernel_fp8.cuh's Smem). In the narrow form WG0 issues S of a sequence's next page before this
page's softmax (at kN = 32 in groups during it): its "S" phase spans that softmax. --shape: these
shapes instead of SHAPES.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # run from anywhere

import torch_mla
from torch_mla.testing import random_inputs

PARTS, TILES, ROWS, EVENTS = 8, 4, 256, 8  # timeline.cuh
(WAIT_FULL, S_ISSUE, S_DONE, P_READY, PV_ISSUE, PV_DONE, REFILL, PV2_DONE) = range(EVENTS)
START_CLOCK, START_NS, END_CLOCK, END_NS, PAGES_DONE, SM_ID, FIRST_LOADS = range(7)

SHAPES = [  # (batch, s_q, seqlen, h_q)
    (128, 1, 4096, 128),
    (128, 2, 4096, 128),
    (128, 1, 4096, 64),
    (128, 1, 8192, 16),
    (8, 1, 8192, 128),
]

# name: (later event, its page offset, earlier event): a phase of page g is
# event(g + offset) - earlier event(g).
PHASES = {
    "period (S issue to next S issue)": (S_ISSUE, 1, S_ISSUE),
    "WG0 waits for the page to land": (S_ISSUE, 0, WAIT_FULL),
    "S = Q K^T": (S_DONE, 0, S_ISSUE),
    "softmax + P written": (P_READY, 0, S_DONE),
    "P ready -> P.V issued (WG1)": (PV_ISSUE, 0, P_READY),
    "P.V (WG1)": (PV_DONE, 0, PV_ISSUE),
    "P.V (WG2), from WG1's issue": (PV2_DONE, 0, PV_ISSUE),
    "P.V done -> refill issued": (REFILL, 0, PV_DONE),
    "refill issued -> S of that page issued": (S_ISSUE, 2, REFILL),
    "S issue of page g+1 - P.V issue of page g": (S_ISSUE, 1, PV_ISSUE),
    "P ready (g) -> S issue (g+1)": (S_ISSUE, 1, P_READY),
    "P.V (WG1) done (g) -> P ready (g+1)": (P_READY, 1, PV_DONE),
}


def library():
    if not torch.cuda.is_available() or not torch_mla.has_cuda_kernel():
        sys.exit(f"needs a GPU and the compiled kernel ({torch_mla.cuda_kernel_error()})")
    lib = ctypes.CDLL(torch_mla._C.__file__)
    if not hasattr(lib, "mla_timeline_read"):
        sys.exit("torch_mla._C is not a measuring build: rebuild with TORCH_MLA_TIMELINE=1")
    lib.mla_timeline_size.restype = ctypes.c_longlong
    assert lib.mla_timeline_size() == PARTS * TILES * ROWS * EVENTS
    return lib


def read(lib) -> torch.Tensor:
    torch.cuda.synchronize()
    buf = torch.empty(PARTS * TILES * ROWS * EVENTS, dtype=torch.int64)
    err = lib.mla_timeline_read(ctypes.c_void_p(buf.data_ptr()))
    assert err == 0, f"mla_timeline_read: cudaError {err}"
    return buf.view(PARTS, TILES, ROWS, EVENTS)


def fp8_stages(rows: int) -> int:
    """The FP8 kernel's stages for `rows` query rows (s_q * h_q): kernel_fp8.cuh's Smem."""
    return 4 if rows <= 32 else 3


def phases_for(fp8: bool, stages: int = 3) -> dict:
    """PHASES, with the FP8 kernel's refill phase where fp8: its stage comes back `stages` pages on."""
    phases = dict(PHASES)
    if fp8:
        del phases["refill issued -> S of that page issued"]
        phases[f"refill issued -> S of that page issued ({stages} stages)"] = (S_ISSUE, stages, REFILL)
    return phases


def shape_arg(text: str) -> tuple:
    try:
        b, s_q, seqlen, h_q = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected B,S_Q,SEQLEN,H_Q (four integers), got {text!r}") from None
    return b, s_q, seqlen, h_q


def analyse(tl: torch.Tensor, tiles: int, phases: dict = PHASES) -> dict:
    samples = {name: [] for name in phases}
    ctas = []
    for part in range(PARTS):
        for tile in range(tiles):
            h = tl[part, tile, 0].tolist()
            pages = h[PAGES_DONE]
            if pages <= 2 or h[END_CLOCK] <= h[START_CLOCK]:
                continue
            ns_per_clock = (h[END_NS] - h[START_NS]) / (h[END_CLOCK] - h[START_CLOCK])
            traced = min(pages, ROWS - 1)  # pages past the buffer's rows go untraced
            ev = tl[part, tile, 1 : traced + 1].tolist()
            ctas.append({"part": part, "tile": tile, "sm": h[SM_ID], "pages": pages,
                         "us": (h[END_NS] - h[START_NS]) / 1e3, "ns_per_clock": ns_per_clock,
                         "events_us": [[(e - h[START_CLOCK]) * ns_per_clock / 1e3 if e >= 0 else None for e in row]
                                       for row in ev]})
            for name, (late, off, early) in phases.items():
                for g in range(2, traced - off):
                    a, b = ev[g + off][late], ev[g][early]
                    if a >= 0 and b >= 0:
                        samples[name].append((a - b) * ns_per_clock / 1e3)
    summary = {name: statistics.median(v) if v else None for name, v in samples.items()}
    return {"summary_us": summary, "ctas": ctas}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write every CTA's events here")
    parser.add_argument("--fp8", action="store_true", help="the FP8 kernel: a bf16 q over an e4m3 cache")
    parser.add_argument("--shape", type=shape_arg, action="append", metavar="B,S_Q,SEQLEN,H_Q",
                        help="a shape to trace instead of the built-in ones (repeatable)")
    args = parser.parse_args()
    lib = library()
    results = []
    import triton.testing

    for (b, s_q, seqlen, h_q) in args.shape or SHAPES:
        phases = phases_for(args.fp8, fp8_stages(s_q * h_q))
        with torch.inference_mode():
            q, kv, bt, lens = random_inputs(b, s_q, h_q, seqlen, device="cuda", seed=1)
            md, ns = torch_mla.get_metadata(lens, s_q * h_q, 1)
            descale_k = None
            if args.fp8:  # (as the bench makes its FP8 rows)
                descale_k = torch.tensor([1 / 64], device="cuda")
                kv = torch_mla.quantize_fp8(kv, descale_k)
            call = lambda: torch_mla.decode(q, kv, bt, lens, causal=True, tile_scheduler_metadata=md, num_splits=ns,
                                            descale_k=descale_k)
            us = triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median") * 1e3
            assert lib.mla_timeline_reset() == 0
            call()
            tl = read(lib)
        tiles = min(TILES, (s_q * h_q + 63) // 64)
        r = analyse(tl, tiles, phases)
        r.update(shape={"batch": b, "s_q": s_q, "seqlen": seqlen, "h_q": h_q}, do_bench_us=us, fp8=args.fp8)
        results.append(r)
        pages = [c["pages"] for c in r["ctas"]]
        print(f"\nb={b} s_q={s_q} seqlen={seqlen} h_q={h_q}: do_bench {us:.1f} µs (measuring build); "
              f"{len(pages)} CTAs traced, {min(pages)}-{max(pages)} pages each, "
              f"CTA lifetime {statistics.median(c['us'] for c in r['ctas']):.1f} µs, "
              f"{1 / statistics.median(c['ns_per_clock'] for c in r['ctas']):.2f} GHz")
        for name, v in r["summary_us"].items():
            print(f"  {name:45s} {v:7.3f}" if v is not None else f"  {name:45s}       -")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "results": results}, f)


if __name__ == "__main__":
    main()
