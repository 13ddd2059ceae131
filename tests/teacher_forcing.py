"""Teacher-forced decoding for the drift tests of an FP8 cache (CPU: test_fp8_decoder.py; GPU:
test_model_gpu.py): logits at the same positions for two caches, and how far apart they are."""

import torch

from torch_mla.cache import PagedKVCache
from torch_mla.engine import decode_step, prefill


def teacher_forced_logits(model, prompts, steps, kv_dtype, forced=None, *, num_blocks=16, max_seq_len=128,
                          device="cpu"):
    """Logits ``[steps + 1, batch, vocab]`` after prefill and each decode step, over a fresh cache
    of ``kv_dtype``; tokens fed are ``forced`` (else this run's greedy tokens)."""
    cache = PagedKVCache(model.args.n_layers, num_blocks, len(prompts), max_seq_len, dtype=kv_dtype, device=device)
    for row, p in enumerate(prompts):
        cache.reserve(row, len(p) + steps)
    logits = [prefill(model, cache, prompts)]
    positions = torch.tensor([len(p) for p in prompts], device=device)
    for i in range(steps):
        tokens = logits[-1].argmax(-1) if forced is None else forced[i]
        logits.append(decode_step(model, cache.kv, cache.block_table, tokens, positions, cache.kv_scale))
        positions = positions + 1
    return torch.stack(logits)


def drift(logits, reference):
    """(largest |logit difference|, mean |logit difference|, share of positions whose greedy token agrees)."""
    diff = (logits - reference).abs()
    agreement = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    return diff.max().item(), diff.mean().item(), agreement
