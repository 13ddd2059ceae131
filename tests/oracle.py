"""An independent float64 MLA decode, written for the tests.

It shares no code with torch_mla.reference: it walks each sequence token by token through the
block table (no gather tricks, no masking), so a bug in the vectorised reference or in a kernel
cannot be mirrored here.
"""

import math

import torch


def naive_decode(q, kv_cache, block_table, cache_seqlens, softmax_scale=None, causal=False, head_dim_v=512):
    """Returns (out [b, s_q, h_q, dv] float64, lse [b, h_q, s_q] float64) on the CPU."""
    q = q.detach().cpu().double()
    kv_cache = kv_cache.detach().cpu().double()
    block_table = block_table.cpu().tolist()
    seqlens = cache_seqlens.cpu().tolist()
    batch, s_q, h_q, d = q.shape
    block_size = kv_cache.shape[1]
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    out = torch.zeros(batch, s_q, h_q, head_dim_v, dtype=torch.float64)
    lse = torch.full((batch, h_q, s_q), math.inf, dtype=torch.float64)
    for b in range(batch):
        length = seqlens[b]
        rows = [kv_cache[block_table[b][t // block_size], t % block_size, 0] for t in range(length)]
        if not rows:
            continue
        keys = torch.stack(rows)  # [L, d]
        for i in range(s_q):
            n_visible = length - s_q + i + 1 if causal else length
            if n_visible <= 0:
                continue
            k = keys[:n_visible]
            scores = (q[b, i] @ k.T) * scale  # [h_q, n]
            m = scores.max(dim=-1, keepdim=True).values
            denom = torch.exp(scores - m).sum(dim=-1, keepdim=True)
            out[b, i] = (torch.exp(scores - m) / denom) @ k[:, :head_dim_v]
            lse[b, :, i] = (m + torch.log(denom)).squeeze(-1)
    return out, lse


def paged_inputs(seqlens, *, s_q=1, h_q=16, block_size=64, dtype=torch.bfloat16, device="cpu",
                 extra_blocks=3, spare_table_cols=1, generator=None, poison=float("nan")):
    """Random q and a paged cache holding `seqlens` tokens per sequence, pages scattered.

    Pages are given in a random order from a pool larger than needed; every cache row that no
    sequence owns (whole unused pages and the tail of each last page) holds `poison`, and block
    table entries past each sequence's pages point at unused pages.
    """
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    batch = len(seqlens)
    pages = [-(-n // block_size) for n in seqlens]
    max_blocks = max(pages + [0]) + spare_table_cols
    num_blocks = sum(pages) + extra_blocks
    perm = torch.randperm(num_blocks, generator=g)
    kv_cache = torch.full((num_blocks, block_size, 1, 576), poison, dtype=torch.float32)
    block_table = torch.empty(batch, max_blocks, dtype=torch.int32)
    used = 0
    for b, n in enumerate(seqlens):
        ids = perm[used:used + pages[b]]
        used += pages[b]
        # unused table entries point at pages nobody owns (or repeat a spare one)
        spare = perm[sum(pages) + (torch.arange(max_blocks - pages[b]) % max(extra_blocks, 1))] if extra_blocks else torch.zeros(max_blocks - pages[b], dtype=torch.long)
        block_table[b] = torch.cat([ids, spare]).int()
        t = torch.arange(n)
        kv_cache[ids[t // block_size], t % block_size, 0] = torch.randn(n, 576, generator=g)
    q = torch.randn(batch, s_q, h_q, 576, generator=g)
    cache_seqlens = torch.tensor(seqlens, dtype=torch.int32)
    return (q.to(dtype).to(device), kv_cache.to(dtype).to(device), block_table.to(device), cache_seqlens.to(device))
