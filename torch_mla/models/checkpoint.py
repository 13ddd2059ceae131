"""Hugging Face DeepSeek-V2/V3 checkpoints: ``config.json`` -> :class:`ModelArgs`, the safetensors
shards -> the weights of a :class:`Transformer`, and the folder's tokenizer.

What the decoder cannot represent is refused with a :class:`CheckpointError` naming the config
field or the tensor, never loaded approximately. Reading needs ``safetensors``, the tokenizer
``transformers`` (``pip install torch-mla[hf]``).
"""

from __future__ import annotations

import importlib
import json
import os
import re

import torch

from .deepseek import ModelArgs, Transformer

__all__ = ["CheckpointError", "HF_EXTRA", "read_config", "args_from_hf_config", "load_checkpoint",
           "has_tokenizer", "load_tokenizer"]

HF_EXTRA = "pip install torch-mla[hf]"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class CheckpointError(ValueError):
    """A checkpoint folder this decoder cannot load as it is; the message says what and where."""


def _require(module: str, purpose: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{purpose} needs the {module} package: {HF_EXTRA}") from None


def read_config(path: str) -> dict:
    """The folder's ``config.json`` as a dict."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a folder")
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise CheckpointError(f"{path} has no config.json")
    try:
        with open(file) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None


_ROPE_FIELDS = {  # fields each rope type may carry; any other one changes RoPE in a way not implemented here
    "default": {"rope_type", "type", "rope_theta"},
    "yarn": {"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings", "beta_fast",
             "beta_slow", "mscale", "mscale_all_dim"},
}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


def fp8_block_size(config: dict) -> tuple[int, int]:
    """The block of DeepSeek's fp8 weights (``quantization_config.weight_block_size``); other
    quantization methods are refused. 128 x 128 when the config names no quantization."""
    quant = config.get("quantization_config")
    if not quant:
        return (128, 128)
    method = quant.get("quant_method")
    if method != "fp8":
        raise CheckpointError(f"quantization_config.quant_method {method!r} is not supported: only DeepSeek's "
                              "block-wise fp8 (quant_method 'fp8' with weight_block_size)")
    block = quant.get("weight_block_size")
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise CheckpointError(f"quantization_config.weight_block_size must be two positive ints, got {block!r} "
                              "(per-tensor or per-channel fp8 is not supported)")
    if quant.get("fmt", "e4m3") != "e4m3":
        raise CheckpointError(f"quantization_config.fmt {quant['fmt']!r} is not supported (e4m3)")
    return tuple(block)


def args_from_hf_config(config: dict, max_seq_len: int | None = None) -> ModelArgs:
    """ModelArgs from a Hugging Face ``config.json`` of ``deepseek_v2`` or ``deepseek_v3``."""
    model_type = config.get("model_type", "deepseek_v3")
    if model_type not in ("deepseek_v2", "deepseek_v3"):
        raise CheckpointError(f"model_type must be deepseek_v2 or deepseek_v3, got {model_type!r}")
    missing = [k for k in _REQUIRED if config.get(k) is None]
    if missing:
        raise CheckpointError(f"config.json has no {', '.join(missing)}")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise CheckpointError(f"{key}=true is not supported (the model has no biases)")
    if config.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"hidden_act must be silu, got {config.get('hidden_act')!r}")
    if (config.get("moe_layer_freq") or 1) != 1:
        raise CheckpointError(f"moe_layer_freq={config['moe_layer_freq']} is not supported: every layer after "
                              "first_k_dense_replace must be MoE (moe_layer_freq=1)")
    fp8_block_size(config)
    v3 = model_type == "deepseek_v3"
    # transformers >= 5 writes rope_parameters; older configs (and DeepSeek's own) rope_scaling + rope_theta
    rope = dict(config.get("rope_scaling") or {})
    rope.update(config.get("rope_parameters") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in _ROPE_FIELDS:
        raise CheckpointError(f"rope_scaling type {rope_type!r} is not supported (default or yarn)")
    unknown = sorted(set(rope) - _ROPE_FIELDS[rope_type])
    if unknown:
        raise CheckpointError(f"rope_scaling field(s) {', '.join(unknown)} not supported for rope type {rope_type!r} "
                              f"(supported: {', '.join(sorted(_ROPE_FIELDS[rope_type] - {'type', 'rope_type'}))})")
    max_pos = config.get("max_position_embeddings") or 4096
    yarn = rope_type == "yarn"
    factor = rope.get("factor") if yarn else 1.0
    if yarn and factor is None:
        if "original_max_position_embeddings" not in rope:
            raise CheckpointError("rope_scaling (yarn) needs factor or original_max_position_embeddings")
        factor = max_pos / rope["original_max_position_embeddings"]
    if v3:
        groups, limited = config.get("n_group") or 1, config.get("topk_group") or 1
    elif config.get("topk_method", "greedy") == "group_limited_greedy":
        groups, limited = config["n_group"], config["topk_group"]
    elif config.get("topk_method", "greedy") == "greedy":
        groups, limited = 1, 1
    else:
        raise CheckpointError(f"topk_method {config['topk_method']!r} is not supported (greedy, group_limited_greedy)")
    n_routed = config.get("n_routed_experts") or 0
    try:
        return ModelArgs(
            vocab_size=config["vocab_size"],
            dim=config["hidden_size"],
            inter_dim=config["intermediate_size"],
            moe_inter_dim=config.get("moe_intermediate_size") or 1,
            n_layers=config["num_hidden_layers"],
            n_dense_layers=(config.get("first_k_dense_replace") or 0) if n_routed else config["num_hidden_layers"],
            n_heads=config["num_attention_heads"],
            n_routed_experts=max(n_routed, 1),
            n_shared_experts=config.get("n_shared_experts") or 0,
            n_activated_experts=config.get("num_experts_per_tok") or 1,
            n_expert_groups=groups,
            n_limited_groups=limited,
            score_func="sigmoid" if v3 else "softmax",
            route_scale=config.get("routed_scaling_factor", 1.0),
            norm_topk_prob=bool(config.get("norm_topk_prob", True)) if v3 else False,
            q_lora_rank=config.get("q_lora_rank") or 0,
            kv_lora_rank=config["kv_lora_rank"],
            qk_nope_head_dim=config["qk_nope_head_dim"],
            qk_rope_head_dim=config["qk_rope_head_dim"],
            v_head_dim=config["v_head_dim"],
            max_seq_len=max_seq_len or max_pos,
            rope_theta=rope.get("rope_theta", config.get("rope_theta") or 10000.0),
            rope_interleave=bool(config.get("rope_interleave", True)) if v3 else True,
            rope_factor=factor,
            original_seq_len=rope.get("original_max_position_embeddings", max_pos),
            beta_fast=rope.get("beta_fast") or 32.0,
            beta_slow=rope.get("beta_slow") or 1.0,
            mscale=(rope.get("mscale") or 0.0) if yarn else 1.0,
            mscale_all_dim=(rope.get("mscale_all_dim") or 0.0) if yarn else 0.0,
            norm_eps=config.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        )
    except ValueError as e:  # ModelArgs' own rules (the 576-dim rows, expert groups)
        raise CheckpointError(f"config.json: {e}") from None


_DIRECT = {  # Hugging Face name (after "model.layers.N.") -> ours (after "layers.N.")
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn.wq.weight",
    "self_attn.q_a_proj.weight": "attn.wq_a.weight",
    "self_attn.q_a_layernorm.weight": "attn.q_norm.weight",
    "self_attn.q_b_proj.weight": "attn.wq_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn.wkv_a.weight",
    "self_attn.kv_a_layernorm.weight": "attn.kv_norm.weight",
    "self_attn.o_proj.weight": "attn.wo.weight",
    "mlp.gate_proj.weight": "ffn.w1.weight",
    "mlp.up_proj.weight": "ffn.w3.weight",
    "mlp.down_proj.weight": "ffn.w2.weight",
    "mlp.gate.weight": "ffn.gate.weight",
    "mlp.gate.e_score_correction_bias": "ffn.gate.bias",
    "mlp.shared_experts.gate_proj.weight": "ffn.shared.w1.weight",
    "mlp.shared_experts.up_proj.weight": "ffn.shared.w3.weight",
    "mlp.shared_experts.down_proj.weight": "ffn.shared.w2.weight",
}
_TOP = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
        "lm_head.weight": "head.weight"}
_EXPERT = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_PER_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
_FUSED_EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")  # transformers' fused layout
_SCALE_LIKE = re.compile(r"(_scale|\.scales?|_zero_point|\.qzeros|\.qweight|\.g_idx|_amax)$")


def _plan(names: list[str], args: ModelArgs, config: dict) -> list[str]:
    """The tensor names to read, from the shards' headers alone: skips what the model does not use
    (multi-token-prediction layers, RoPE buffers) and refuses names it cannot place."""
    mtp = config.get("num_nextn_predict_layers") or 0
    present = set(names)
    wanted = []
    for name in names:
        if name.endswith("_scale_inv"):
            if name[: -len("_scale_inv")] not in present:
                raise CheckpointError(f"tensor {name} scales no weight of the checkpoint")
            continue  # read with its weight
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if _SCALE_LIKE.search(name):
            raise CheckpointError(f"tensor {name}: quantization scales other than DeepSeek's block-wise "
                                  "weight_scale_inv are not supported")
        if name in _TOP:
            wanted.append(name)
            continue
        m = re.match(r"model\.layers\.(\d+)\.(.+)", name)
        if m is None:
            raise CheckpointError(f"tensor {name} has no place in a DeepSeek-V2/V3 model")
        layer, rest = int(m.group(1)), m.group(2)
        if layer >= args.n_layers:
            if layer < args.n_layers + mtp:
                continue  # a multi-token-prediction layer: generation does not use it
            raise CheckpointError(f"tensor {name}: layer {layer} is beyond num_hidden_layers={args.n_layers} "
                                  f"(+ num_nextn_predict_layers={mtp})")
        if rest in _DIRECT or rest in _FUSED_EXPERTS or rest == "self_attn.kv_b_proj.weight" \
                or _PER_EXPERT.fullmatch(rest):
            wanted.append(name)
        else:
            raise CheckpointError(f"tensor {name} has no place in a DeepSeek-V2/V3 model")
    return wanted


def _dequantize_fp8(name: str, weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Block-wise fp8 weights (DeepSeek-V3's release format): each block times its ``weight_scale_inv``."""
    rows, cols = weight.shape
    grid = (-(-rows // block[0]), -(-cols // block[1]))
    if tuple(scale_inv.shape) != grid:
        raise CheckpointError(f"tensor {name}_scale_inv: shape {tuple(scale_inv.shape)}, expected {grid} for a "
                              f"{rows} x {cols} weight in {block[0]} x {block[1]} blocks "
                              "(quantization_config.weight_block_size)")
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return weight.float() * scale


def _tensors(path: str, args: ModelArgs, config: dict):
    """Yield ``(name, tensor)`` of the shards' tensors the model needs, fp8 weights dequantized."""
    safetensors = _require("safetensors", "reading a checkpoint")
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{path} has no *.safetensors files")
    handles = [safetensors.safe_open(os.path.join(path, f), framework="pt") for f in files]
    where = {name: h for h in handles for name in h.keys()}
    block = fp8_block_size(config)
    for name in _plan(list(where), args, config):
        tensor = where[name].get_tensor(name)
        scale_name = name + "_scale_inv"
        if scale_name in where:
            tensor = _dequantize_fp8(name, tensor, where[scale_name].get_tensor(scale_name), block)
        elif tensor.dtype.is_floating_point and tensor.dtype.itemsize == 1:
            raise CheckpointError(f"tensor {name} is {tensor.dtype} without a {scale_name}")
        yield name, tensor


def load_checkpoint(path: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                    max_seq_len: int | None = None) -> Transformer:
    """Build a :class:`Transformer` from a Hugging Face DeepSeek-V2/V3 folder.

    Maps the names, splits each ``kv_b_proj`` into ``w_uk`` / ``w_uv`` for absorption, stacks the
    routed experts, and skips DeepSeek-V3's multi-token-prediction layers without reading them.
    Raises :class:`CheckpointError` for a tensor of the wrong shape, one it cannot place, or a
    parameter left unset.
    """
    config = read_config(path)
    args = args_from_hf_config(config, max_seq_len)
    with torch.device("meta"):
        model = Transformer(args).to(dtype)  # cast while on meta: no memory is touched yet
    model.to_empty(device=device)
    model.keep_float32_parts()
    params = dict(model.named_parameters())
    unset = set(params)
    a = args

    def put(hf_name: str, name: str, value: torch.Tensor, index=None):
        if name not in params:
            raise CheckpointError(f"tensor {hf_name} has no place in the model config.json describes "
                                  f"(q_lora_rank={a.q_lora_rank}, first_k_dense_replace={a.n_dense_layers}, "
                                  f"n_routed_experts={config.get('n_routed_experts')})")
        target = params[name] if index is None else params[name][index]
        if target.shape != value.shape:
            raise CheckpointError(f"tensor {hf_name}: shape {tuple(value.shape)} in the checkpoint, "
                                  f"{tuple(target.shape)} from config.json")
        with torch.no_grad():
            target.copy_(value)
        unset.discard(name)

    expert_parts: dict[str, set[int]] = {}
    for name, tensor in _tensors(path, args, config):
        if name in _TOP:
            put(name, _TOP[name], tensor)
            continue
        layer, rest = name[len("model.layers."):].split(".", 1)
        prefix = f"layers.{layer}."
        if rest in _DIRECT:
            put(name, prefix + _DIRECT[rest], tensor)
        elif rest == "self_attn.kv_b_proj.weight":
            want = (a.n_heads * (a.qk_nope_head_dim + a.v_head_dim), a.kv_lora_rank)
            if tuple(tensor.shape) != want:
                raise CheckpointError(
                    f"tensor {name}: shape {tuple(tensor.shape)} in the checkpoint, {want} from config.json "
                    f"(num_attention_heads={a.n_heads} x (qk_nope_head_dim={a.qk_nope_head_dim} + "
                    f"v_head_dim={a.v_head_dim}), kv_lora_rank={a.kv_lora_rank})")
            kv_b = tensor.view(a.n_heads, a.qk_nope_head_dim + a.v_head_dim, a.kv_lora_rank)
            put(name, prefix + "attn.w_uk", kv_b[:, : a.qk_nope_head_dim])
            put(name, prefix + "attn.w_uv", kv_b[:, a.qk_nope_head_dim:])
        elif rest == "mlp.experts.gate_up_proj":  # fused [E, 2 * moe_inter_dim, dim]
            if tensor.dim() != 3 or tensor.shape[1] != 2 * a.moe_inter_dim:
                raise CheckpointError(f"tensor {name}: shape {tuple(tensor.shape)} in the checkpoint, expected [n_routed_"
                                      f"experts, 2 * moe_intermediate_size={2 * a.moe_inter_dim}, hidden_size]")
            put(name, prefix + "ffn.w1", tensor[:, : a.moe_inter_dim])
            put(name, prefix + "ffn.w3", tensor[:, a.moe_inter_dim:])
        elif rest == "mlp.experts.down_proj":  # fused [E, dim, moe_inter_dim]
            put(name, prefix + "ffn.w2", tensor)
        else:  # per expert: mlp.experts.E.{gate,up,down}_proj.weight
            expert, proj = _PER_EXPERT.fullmatch(rest).groups()
            ours = prefix + "ffn." + _EXPERT[proj]
            if ours in params and int(expert) >= a.n_routed_experts:
                raise CheckpointError(f"tensor {name}: expert {expert} is beyond n_routed_experts={a.n_routed_experts}")
            put(name, ours, tensor, int(expert))
            expert_parts.setdefault(ours, set()).add(int(expert))
            if len(expert_parts[ours]) < a.n_routed_experts:
                unset.add(ours)  # complete only once every expert is in
    if "head.weight" in unset and a.tie_word_embeddings:
        put("model.embed_tokens.weight", "head.weight", params["embed.weight"].detach())
    if unset:
        raise CheckpointError(f"checkpoint {path} left parameters unset: {sorted(unset)[:8]}")
    model.eval()
    return model


def has_tokenizer(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, n)) for n in TOKENIZER_FILES)


def load_tokenizer(path: str):
    """The folder's tokenizer through ``transformers.AutoTokenizer``, or None when it has none.

    Raises ImportError (naming the ``[hf]`` extra) when it has one but transformers is missing.
    """
    if not has_tokenizer(path):
        return None
    transformers = _require("transformers", "the checkpoint's tokenizer")
    return transformers.AutoTokenizer.from_pretrained(path)
