"""One shape of mla.decode, called a few times: a target for ncu / compute-sanitizer.

    ncu --kernel-name regex:decode_kernel --launch-skip 2 --launch-count 1 --section SpeedOfLight \
        python3 tools/profile_decode.py --batch 128 --s-q 1 --h-q 128 --seqlen 4096
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

import torch_mla
from torch_mla.testing import random_inputs

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--batch", type=int, default=128)
parser.add_argument("--s-q", type=int, default=1)
parser.add_argument("--h-q", type=int, default=128)
parser.add_argument("--seqlen", type=int, default=4096)
parser.add_argument("--calls", type=int, default=4)
parser.add_argument("--fp8", action="store_true", help="an e4m3 cache (the bench's descale_k), a bf16 q")
args = parser.parse_args()

with torch.inference_mode():
    q, kv_cache, block_table, lens = random_inputs(args.batch, args.s_q, args.h_q, args.seqlen, device="cuda", seed=1)
    descale_k = None
    if args.fp8:
        from torch_mla.bench import FP8_SCALE

        descale_k = torch.tensor([FP8_SCALE], device="cuda")
        kv_cache = torch_mla.quantize_fp8(kv_cache, descale_k)
    md, ns = torch_mla.get_metadata(lens, args.s_q * args.h_q, 1)
    for _ in range(args.calls):
        torch_mla.decode(q, kv_cache, block_table, lens, causal=True, tile_scheduler_metadata=md, num_splits=ns,
                         descale_k=descale_k)
    torch.cuda.synchronize()
