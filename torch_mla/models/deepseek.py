"""A DeepSeek-V2/V3-shaped decoder whose attention runs through ``torch.ops.mla``.

The names follow the DeepSeek-V3 paper and its ``ModelArgs``: ``dim`` (hidden size),
``q_lora_rank`` / ``kv_lora_rank`` (the low-rank query / key-value compressions),
``qk_nope_head_dim`` / ``qk_rope_head_dim`` (the two parts of each query/key head), and so on.

Attention is always in absorbed form. Each token's key-value state is the 576-dim row
``[c_kv (kv_lora_rank = 512) | k_pe (qk_rope_head_dim = 64)]`` of the paged latent cache. The
up-projection ``kv_b_proj`` is split per head into ``w_uk`` (latent -> nope key) and ``w_uv``
(latent -> value): ``w_uk`` is folded into the query (``q_nope @ w_uk`` lives in the latent space),
``mla.decode`` attends over the latent rows, and ``w_uv`` maps the latent output to the values.
Prefill uses the same op with ``s_q`` = prompt chunk and ``causal=True``, so both phases write and
read one cache.

The mixture-of-experts layer computes every expert densely and weighs them with the routing
weights (zero for experts a token did not pick): no data-dependent shapes, so the decode step is a
single ``torch.compile(fullgraph=True)`` graph and replays in a CUDA graph. That is the right trade
for the small models this file is for; a large model wants a grouped-GEMM dispatch instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import torch_mla  # noqa: F401  defines torch.ops.mla.*

__all__ = ["ModelArgs", "PRESETS", "Transformer", "describe"]


@dataclass
class ModelArgs:
    """Dimensions and hyper-parameters, named as DeepSeek-V3 names them.

    ``kv_lora_rank`` must be 512 and ``qk_rope_head_dim`` 64: those are the latent and RoPE
    widths of the 576-dim rows that ``mla.decode`` reads.
    """

    vocab_size: int = 1024
    dim: int = 256
    inter_dim: int = 512  # dense FFN hidden size
    moe_inter_dim: int = 128  # hidden size of each routed / shared expert
    n_layers: int = 4
    n_dense_layers: int = 1  # the first n_dense_layers use the dense FFN, the rest MoE
    n_heads: int = 8
    # MoE
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    n_activated_experts: int = 2  # routed experts per token (top-k)
    n_expert_groups: int = 1
    n_limited_groups: int = 1  # groups a token may pick its experts from
    score_func: str = "sigmoid"  # "sigmoid" (V3, with bias correction) or "softmax" (V2)
    route_scale: float = 1.0  # routed_scaling_factor
    norm_topk_prob: bool = True  # renormalise the top-k weights to sum to 1 (V3)
    # MLA
    q_lora_rank: int = 0  # 0: queries are not compressed (DeepSeek-V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 64
    qk_rope_head_dim: int = 64
    v_head_dim: int = 64
    # RoPE, with YaRN when rope_factor > 1
    max_seq_len: int = 4096  # positions the RoPE tables cover
    rope_theta: float = 10000.0
    rope_interleave: bool = True  # RoPE pairs are (x0, x1), (x2, x3), ... as DeepSeek stores them
    rope_factor: float = 1.0
    original_seq_len: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0  # 0: no YaRN factor on the softmax scale
    norm_eps: float = 1e-6
    tie_word_embeddings: bool = False

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def __post_init__(self):
        if self.kv_lora_rank != torch_mla.ops.HEAD_DIM_V or self.qk_rope_head_dim != torch_mla.ops.ROPE_DIM:
            raise ValueError(
                f"mla.decode reads 576-dim latent rows: kv_lora_rank must be 512 and qk_rope_head_dim 64, "
                f"got {self.kv_lora_rank} and {self.qk_rope_head_dim}"
            )
        if self.score_func not in ("sigmoid", "softmax"):
            raise ValueError(f"score_func must be 'sigmoid' or 'softmax', got {self.score_func!r}")
        if self.n_routed_experts % self.n_expert_groups:
            raise ValueError("n_routed_experts must be a multiple of n_expert_groups")


PRESETS: dict[str, ModelArgs] = {
    # two layers (one dense, one MoE): the tests' model
    "tiny": ModelArgs(vocab_size=512, dim=128, inter_dim=256, moe_inter_dim=64, n_layers=2, n_heads=4,
                      n_routed_experts=8, n_activated_experts=2, n_expert_groups=2, n_limited_groups=1,
                      q_lora_rank=64, qk_nope_head_dim=32, v_head_dim=32, max_seq_len=1024),
    # the demo: runs on a CPU in seconds
    "small": ModelArgs(vocab_size=1024, dim=256, inter_dim=512, moe_inter_dim=128, n_layers=4, n_heads=8,
                       n_routed_experts=8, n_activated_experts=2, n_expert_groups=4, n_limited_groups=2,
                       q_lora_rank=128, route_scale=2.5, max_seq_len=4096),
    # GPU benchmark: DeepSeek-V3 head shapes (128 nope / 64 rope / 128 v), 16 heads, 8 layers
    "medium": ModelArgs(vocab_size=32000, dim=2048, inter_dim=5632, moe_inter_dim=512, n_layers=8, n_heads=16,
                        n_routed_experts=16, n_activated_experts=4, n_expert_groups=4, n_limited_groups=2,
                        q_lora_rank=768, qk_nope_head_dim=128, v_head_dim=128, route_scale=2.5,
                        max_seq_len=8192, rope_factor=4.0, original_seq_len=2048, mscale=1.0, mscale_all_dim=1.0),
}


# ------------------------------------------------------------------------------------------------
# RoPE with YaRN
# ------------------------------------------------------------------------------------------------


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature term ``0.1 * mscale * ln(factor) + 1`` (1 when not scaled)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_tables(args: ModelArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``, ``sin`` of every position: two ``[max_seq_len, qk_rope_head_dim // 2]`` float32 tables.

    With ``rope_factor > 1`` the frequencies are YaRN's: dims that turn fewer than ``beta_slow``
    times over ``original_seq_len`` are interpolated (divided by the factor), those turning more
    than ``beta_fast`` times are kept, and a linear ramp blends the dims in between.
    """
    dim, base = args.qk_rope_head_dim, args.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    scale = 1.0
    if args.rope_factor > 1:
        def dim_of(turns: float) -> float:  # the dim index that turns `turns` times over the original length
            return dim * math.log(args.original_seq_len / (turns * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(dim_of(args.beta_fast)), 0)
        high = min(math.ceil(dim_of(args.beta_slow)), dim - 1)
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
        freqs = freqs / args.rope_factor * ramp + freqs * (1 - ramp)
        # cos/sin carry the ratio of the two temperatures; the softmax scale carries the rest.
        if args.mscale and args.mscale_all_dim:
            scale = yarn_mscale(args.rope_factor, args.mscale) / yarn_mscale(args.rope_factor, args.mscale_all_dim)
        else:
            scale = yarn_mscale(args.rope_factor)
    angles = torch.outer(torch.arange(args.max_seq_len, dtype=torch.float32), freqs)
    return angles.cos() * scale, angles.sin() * scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate the last dim of ``x [..., s, heads, 64]`` by ``cos/sin [..., s, 32]``.

    ``interleave``: pairs are adjacent dims ``(x[2i], x[2i+1])``; else the two halves ``(x[i], x[i+32])``.
    q and k are rotated alike, so their dot product is the same in either layout.
    """
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    if interleave:
        pairs = x.float().unflatten(-1, (-1, 2))
        a, b = pairs[..., 0], pairs[..., 1]
        out = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    else:
        a, b = x.float().chunk(2, dim=-1)
        out = torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)
    return out.to(x.dtype)


# ------------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


@dataclass
class AttentionBatch:
    """What every layer's attention needs about the cache for one forward call.

    ``block_table [b, max_blocks]`` int32, ``cache_seqlens [b]`` int32 (lengths after this call's
    tokens are written), ``slot_mapping [b * s]`` int64 (negative: padding, not written), the
    split-KV plan from ``mla.get_metadata``, ``causal`` (True for prefill chunks), and an FP8
    cache's ``[1]`` float32 scale ``kv_scale`` (None for a bf16/fp16/fp32 cache).
    """

    block_table: torch.Tensor
    cache_seqlens: torch.Tensor
    slot_mapping: torch.Tensor
    tile_scheduler_metadata: torch.Tensor
    num_splits: torch.Tensor
    causal: bool
    kv_scale: torch.Tensor | None = None


class MLA(nn.Module):
    """Multi-head latent attention, absorbed form, over one layer of the paged latent cache."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        h, d = args.n_heads, args.dim
        if args.q_lora_rank == 0:
            self.wq = nn.Linear(d, h * args.qk_head_dim, bias=False)
        else:
            self.wq_a = nn.Linear(d, args.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(args.q_lora_rank)
            self.wq_b = nn.Linear(args.q_lora_rank, h * args.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(d, args.kv_lora_rank + args.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(args.kv_lora_rank)
        # kv_b_proj split per head: latent -> nope key (absorbed into q), latent -> value.
        self.w_uk = nn.Parameter(torch.empty(h, args.qk_nope_head_dim, args.kv_lora_rank))
        self.w_uv = nn.Parameter(torch.empty(h, args.v_head_dim, args.kv_lora_rank))
        self.wo = nn.Linear(h * args.v_head_dim, d, bias=False)
        self.softmax_scale = args.qk_head_dim ** -0.5
        if args.rope_factor > 1 and args.mscale_all_dim:
            self.softmax_scale *= yarn_mscale(args.rope_factor, args.mscale_all_dim) ** 2

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                batch: AttentionBatch) -> torch.Tensor:
        """``x [b, s, dim]`` -> ``[b, s, dim]``; writes the s new tokens' latent rows into ``kv_cache``."""
        a = self.args
        b, s, _ = x.shape
        q = self.wq(x) if a.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))
        q_nope, q_pe = q.view(b, s, a.n_heads, a.qk_head_dim).split([a.qk_nope_head_dim, a.qk_rope_head_dim], -1)
        q_pe = apply_rope(q_pe, cos, sin, a.rope_interleave)

        kv_c, k_pe = self.wkv_a(x).split([a.kv_lora_rank, a.qk_rope_head_dim], -1)
        kv_c = self.kv_norm(kv_c)
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin, a.rope_interleave).squeeze(2)
        torch.ops.mla.write_cache(kv_c.reshape(b * s, -1), k_pe.reshape(b * s, -1), kv_cache, batch.slot_mapping,
                                  batch.kv_scale)

        # Absorb W_UK: q_nope . (W_UK c) == (q_nope W_UK) . c, so queries meet the latent rows directly.
        q_latent = torch.einsum("bshn,hnc->bshc", q_nope, self.w_uk)
        q_full = torch.cat([q_latent, q_pe], dim=-1)
        out, _ = torch.ops.mla.decode(q_full, kv_cache, batch.block_table, batch.cache_seqlens,
                                      a.kv_lora_rank, self.softmax_scale, batch.causal and s > 1,
                                      batch.tile_scheduler_metadata, batch.num_splits, None, batch.kv_scale)
        out = torch.einsum("bshc,hvc->bshv", out, self.w_uv)  # W_UV after attention
        return self.wo(out.reshape(b, s, a.n_heads * a.v_head_dim))


class MLP(nn.Module):
    """SwiGLU feed-forward: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)
        self.w2 = nn.Linear(inter_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, inter_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Gate(nn.Module):
    """The router: top-k routed experts of each token and their weights.

    V3: sigmoid scores; ``bias`` (``e_score_correction_bias``) shifts the choice but not the
    weights; groups are ranked by the sum of their two best scores. V2: softmax scores, groups
    ranked by their best score. A token picks from its ``n_limited_groups`` best groups only.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim))
        self.bias = nn.Parameter(torch.zeros(args.n_routed_experts)) if args.score_func == "sigmoid" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [T, dim]`` -> dense routing weights ``[T, n_routed_experts]`` float32 (0 = not picked)."""
        a = self.args
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if a.score_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores if self.bias is None else scores + self.bias.float()
        if a.n_expert_groups > 1:
            grouped = choice.unflatten(-1, (a.n_expert_groups, -1))
            if self.bias is None:
                group_scores = grouped.amax(dim=-1)
            else:
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            best_groups = group_scores.topk(a.n_limited_groups, dim=-1).indices
            allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
            choice = grouped.masked_fill(~allowed[..., None], float("-inf")).flatten(-2)
        picked = choice.topk(a.n_activated_experts, dim=-1).indices
        weights = scores.gather(1, picked)
        if a.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return torch.zeros_like(scores).scatter_(1, picked, weights * a.route_scale)


class MoE(nn.Module):
    """Routed experts (computed densely, weighted by the router) plus always-on shared experts."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        e, d, i = args.n_routed_experts, args.dim, args.moe_inter_dim
        self.gate = Gate(args)
        self.w1 = nn.Parameter(torch.empty(e, i, d))  # gate_proj of each expert
        self.w3 = nn.Parameter(torch.empty(e, i, d))  # up_proj
        self.w2 = nn.Parameter(torch.empty(e, d, i))  # down_proj
        self.shared = MLP(d, args.n_shared_experts * i)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights = self.gate(x).to(x.dtype)  # [T, E]
        h = F.silu(torch.einsum("td,eid->tei", x, self.w1)) * torch.einsum("td,eid->tei", x, self.w3)
        routed = torch.einsum("tei,edi->td", h * weights[..., None], self.w2)
        return (routed + self.shared(x)).view(shape)


class Block(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.attn_norm = RMSNorm(args.dim, args.norm_eps)
        self.attn = MLA(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn = MLP(args.dim, args.inter_dim) if layer_id < args.n_dense_layers else MoE(args)

    def forward(self, x, cos, sin, kv_cache, batch: AttentionBatch):
        x = x + self.attn(self.attn_norm(x), cos, sin, kv_cache, batch)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    """The decoder. One forward call = one prefill chunk or one decode step of a batch."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.head = nn.Linear(args.dim, args.vocab_size, bias=False)
        cos, sin = rope_tables(args)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def keep_float32_parts(self) -> "Transformer":
        """Put back in float32 what must not be rounded to a bf16/fp16 model dtype: the RoPE tables
        (recomputed, which also fills them after ``to_empty``) and the router biases, which only
        shift top-k choices by small amounts (transformers keeps them in float32 too)."""
        cos, sin = rope_tables(self.args)
        self.rope_cos = cos.to(self.rope_cos.device)
        self.rope_sin = sin.to(self.rope_sin.device)
        for module in self.modules():
            if isinstance(module, Gate) and module.bias is not None:
                module.bias.data = module.bias.data.float()
        return self

    @torch.no_grad()
    def init_random(self, seed: int = 0, std: float = 0.02) -> "Transformer":
        """Seeded random weights (normal(0, std), norms 1, router bias small), reproducible on any device."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                value = torch.ones(p.shape)
            elif name.endswith("gate.bias"):
                value = torch.randn(p.shape, generator=g) * 0.01
            else:
                value = torch.randn(p.shape, generator=g) * std
            p.copy_(value)
        return self

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                block_table: torch.Tensor, cache_seqlens: torch.Tensor, slot_mapping: torch.Tensor,
                causal: bool = True, last_only: bool = False,
                kv_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Run ``tokens [b, s]`` at ``positions [b, s]`` (int64) and return float32 logits.

        Args:
            kv_cache: ``[n_layers, num_blocks, block_size, 1, 576]``, written in place: the
                model's dtype, or float8_e4m3fn with its ``kv_scale`` (``[1]`` float32).
            block_table, cache_seqlens: as ``mla.decode`` takes them; ``cache_seqlens`` counts
                this call's tokens. A row of length 0 is padding: its logits are meaningless.
            slot_mapping: ``[b * s]`` cache slot of each token (negative: do not write).
            causal: query i of a chunk sees only keys up to its own position (prefill).
            last_only: return logits of the last position only, ``[b, 1, vocab]``.

        Returns ``[b, s, vocab_size]`` float32 logits.
        """
        b, s = tokens.shape
        metadata, num_splits = torch.ops.mla.get_metadata(cache_seqlens, s * self.args.n_heads, 1)
        batch = AttentionBatch(block_table, cache_seqlens, slot_mapping, metadata, num_splits, causal, kv_scale)
        pos = positions.clamp(0, self.args.max_seq_len - 1)
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]
        x = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, kv_cache[i], batch)
        if last_only:
            x = x[:, -1:]
        return self.head(self.norm(x)).float()


def describe(args: ModelArgs) -> str:
    """One line: the size of the model."""
    fields = ("dim", "n_layers", "n_heads", "n_routed_experts", "n_activated_experts", "vocab_size")
    return ", ".join(f"{f}={getattr(args, f)}" for f in fields)
