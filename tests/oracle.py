"""An independent float64 MLA decode, written for the tests.

It shares no code with torch_mla.reference: it walks each sequence token by token through the
block table (no gather tricks, no masking), so a bug in the vectorised reference or in a kernel
cannot be mirrored here.
"""

import math

import torch


def naive_decode(q, kv_cache, block_table, cache_seqlens, softmax_scale=None, causal=False, head_dim_v=512,
                 fp8_terms=False):
    """Returns (out [b, s_q, h_q, dv] float64, lse [b, h_q, s_q] float64) on the CPU; with
    fp8_terms also what ops.fp8_error_bounds states the FP8 error against: each row's score
    magnitude M [b, h_q, s_q] (softmax_scale * the largest sum_i |q_i| |k_i| over the keys it
    sees; 0 if none) and abs_out [b, s_q, h_q, dv] (its probabilities times |v|)."""
    q = q.detach().cpu().double()
    kv_cache = kv_cache.detach().cpu().double()
    block_table = block_table.cpu().tolist()
    seqlens = cache_seqlens.cpu().tolist()
    batch, s_q, h_q, d = q.shape
    block_size = kv_cache.shape[1]
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    out = torch.zeros(batch, s_q, h_q, head_dim_v, dtype=torch.float64)
    lse = torch.full((batch, h_q, s_q), math.inf, dtype=torch.float64)
    mag = torch.zeros(batch, h_q, s_q, dtype=torch.float64)
    abs_out = torch.zeros_like(out)
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
            if fp8_terms:
                mag[b, :, i] = (q[b, i].abs() @ k.abs().T).amax(dim=-1) * scale
                abs_out[b, i] = (torch.exp(scores - m) / denom) @ k[:, :head_dim_v].abs()
    return (out, lse, mag, abs_out) if fp8_terms else (out, lse)


