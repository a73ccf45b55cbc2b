"""Exports to transformers' own architectures (`moe-export --format mixtral | qwen3_moe | qwen2_moe | deepseek_v3`):
the config and the renamed weights of a model that computes this project's function, or the reasons it cannot.

Each format has a blockers function (what in the config the stock class cannot compute; empty: it can) and a
converter. The weights are written in each model's original checkpoint layout (one tensor per expert projection:
`block_sparse_moe.experts.N.w1` for Mixtral, `mlp.experts.N.gate_proj` for the others), which transformers fuses
on load; so the folders load with the stock classes, without this project. Neither side drops tokens at inference,
so the logits are the training model's (tests/unit/test_stock_export.py checks each format at 1e-4 in fp32).

| format | stock class | needs |
| --- | --- | --- |
| mixtral | MixtralForCausalLM | GQA without qk_norm; every layer MoE, no shared experts; softmax, top-k weights renormalised |
| qwen3_moe | Qwen3MoeForCausalLM | GQA with qk_norm; no shared experts; softmax (renormalised or not) |
| qwen2_moe | Qwen2MoeForCausalLM | GQA without qk_norm; shared experts; softmax (renormalised or not) |
| deepseek_v3 | DeepseekV3ForCausalLM | MLA; shared experts; dense layers only first; sigmoid scores |

None of them has the residual MoE (use_residual), the autoep backend's checkpoints hold no portable weights, and only
DeepSeek-V3 has the expert bias, group-limited routing and a routed scaling factor.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DeepseekV3Config, MixtralConfig, PretrainedConfig, Qwen2MoeConfig, Qwen3MoeConfig

from moe_model import MoeConfig

_LAYER = r"(model\.layers\.\d+)"
_MOE = _LAYER + r"\.mlp\.moe\.deepspeed_moe"
_EXPERT = _MOE + r"\.experts\.deepspeed_experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight"
_SAME = [  # names every stock model shares with this one
    (r"(model\.embed_tokens\.weight|model\.norm\.weight|lm_head\.weight)", r"\1"),
    (_LAYER + r"\.(input_layernorm|post_attention_layernorm)\.weight", r"\1.\2.weight"),
    (_LAYER + r"\.(self_attn\.\w+)\.weight", r"\1.\2.weight"),  # q/k/v/o, q_norm/k_norm, MLA's projections and norms
    (_LAYER + r"\.mlp\.(gate_proj|up_proj|down_proj)\.weight", r"\1.mlp.\2.weight"),  # dense layers
]
_QWEN_DEEPSEEK_EXPERTS = [
    (_MOE + r"\.gate\.wg\.weight", r"\1.mlp.gate.weight"),
    (_MOE + r"\.gate\.e_score_correction_bias", r"\1.mlp.gate.e_score_correction_bias"),
    (_EXPERT, r"\1.mlp.experts.\2.\3.weight"),
]
_MIXTRAL_NAMES = [
    (_MOE + r"\.gate\.wg\.weight", r"\1.block_sparse_moe.gate.weight"),
    (_EXPERT.replace("(gate_proj|up_proj|down_proj)", "gate_proj"), r"\1.block_sparse_moe.experts.\2.w1.weight"),
    (_EXPERT.replace("(gate_proj|up_proj|down_proj)", "up_proj"), r"\1.block_sparse_moe.experts.\2.w3.weight"),
    (_EXPERT.replace("(gate_proj|up_proj|down_proj)", "down_proj"), r"\1.block_sparse_moe.experts.\2.w2.weight"),
    *_SAME,
]


def _common_blockers(config: MoeConfig) -> list[str]:
    blockers = []
    if config.use_residual:
        blockers.append("residual MoE (use_residual=true)")
    if not config.backend_support.mixtral_export:
        blockers.append(f"moe_backend={config.moe_backend!r}")
    return blockers


def _softmax_router_blockers(config: MoeConfig, name: str) -> list[str]:
    """What a router with softmax scores over all experts and a plain top-k (Mixtral's, Qwen's) cannot compute."""
    blockers = []
    if config.router_score_func != "softmax":
        blockers.append(f"router_score_func={config.router_score_func!r} ({name}'s scores are a softmax)")
    if config.uses_expert_bias:
        blockers.append(f"the expert bias (router_expert_bias=True; {name}'s router has none)")
    if config.router_n_group is not None:
        blockers.append(f"group-limited routing (router_n_group={config.router_n_group}, router_topk_group="
                        f"{config.router_topk_group})")
    if config.router_scaling_factor != 1.0:
        blockers.append(f"router_scaling_factor={config.router_scaling_factor} ({name}'s is 1)")
    return blockers


def _gqa_blockers(config: MoeConfig, name: str, qk_norm: bool) -> list[str]:
    if config.attention != "gqa":
        return [f"attention={config.attention!r} ({name} has grouped-query attention)"]
    if config.qk_norm != qk_norm:
        return [f"qk_norm={config.qk_norm} ({name} " + ("normalises each head of q and k; train with qk_norm=true)"
                                                         if qk_norm else "has no norm on q and k)")]
    return []


def mixtral_blockers(config: MoeConfig) -> list[str]:
    """What keeps this model from being a MixtralForCausalLM (empty: it is one): its architecture, or routing that
    Mixtral's router (softmax over all experts, top-k, weights divided by their sum) does not compute."""
    blockers = _gqa_blockers(config, "Mixtral", qk_norm=False)
    if config.num_shared_experts:
        blockers.append(f"shared experts (num_shared_experts={config.num_shared_experts})")
    if len(config.moe_layer_indices) != config.num_hidden_layers:
        blockers.append(f"dense layers (first_k_dense_replace={config.first_k_dense_replace}, "
                        f"moe_layer_freq={config.moe_layer_freq})")
    blockers += _softmax_router_blockers(config, "Mixtral")
    if not config.norm_topk:
        blockers.append("top-1 routing (the weight is the softmax probability, Mixtral's is 1; "
                        "router_norm_topk_prob=true would match)" if config.num_experts_per_tok == 1 else
                        "router_norm_topk_prob=false (Mixtral divides the top-k weights by their sum)")
    return blockers + _common_blockers(config)


def qwen3_moe_blockers(config: MoeConfig) -> list[str]:
    """What keeps this model from being a Qwen3MoeForCausalLM: GQA with per-head q/k RMSNorm, no shared expert,
    softmax routing (the top-k weights renormalised or not)."""
    blockers = _gqa_blockers(config, "Qwen3-MoE", qk_norm=True)
    if config.num_shared_experts:
        blockers.append(f"shared experts (num_shared_experts={config.num_shared_experts}; Qwen3-MoE has none)")
    return blockers + _softmax_router_blockers(config, "Qwen3-MoE") + _common_blockers(config)


def qwen2_moe_blockers(config: MoeConfig) -> list[str]:
    """What keeps this model from being a Qwen2MoeForCausalLM: GQA without q/k norm, a shared expert, softmax routing.

    Qwen2-MoE weighs its shared expert by sigmoid(shared_expert_gate(x)); this model adds its shared experts
    unweighted. The export sets that gate's weight to zero (sigmoid(0) = 1/2) and doubles the shared expert's
    down projection, which computes the same function exactly (scaling by 2 is exact in floating point).
    """
    blockers = _gqa_blockers(config, "Qwen2-MoE", qk_norm=False)
    if not config.num_shared_experts:
        blockers.append("no shared expert (Qwen2-MoE always has one; --format qwen3_moe or mixtral may fit)")
    return blockers + _softmax_router_blockers(config, "Qwen2-MoE") + _common_blockers(config)


def deepseek_v3_blockers(config: MoeConfig) -> list[str]:
    """What keeps this model from being a DeepseekV3ForCausalLM: MLA, shared experts, the dense layers first and
    then only MoE layers, sigmoid scores (the expert bias, groups, scaling and renormalisation are all its own)."""
    blockers = []
    if config.attention != "mla":
        blockers.append(f"attention={config.attention!r} (DeepSeek-V3 has Multi-head Latent Attention: "
                        "attention=mla)")
    elif config.rms_norm_eps != 1e-6:
        blockers.append(f"rms_norm_eps={config.rms_norm_eps} (DeepSeek-V3's latent norms use 1e-6 whatever its "
                        "rms_norm_eps)")
    if not config.num_shared_experts:
        blockers.append("no shared expert (DeepSeek-V3 always has one)")
    if config.moe_layer_freq != 1:
        blockers.append(f"moe_layer_freq={config.moe_layer_freq} (DeepSeek-V3's dense layers are the first "
                        "first_k_dense_replace only)")
    if config.router_score_func != "sigmoid":
        blockers.append(f"router_score_func={config.router_score_func!r} (DeepSeek-V3's scores are sigmoids)")
    return blockers + _common_blockers(config)


def _rename(weights: dict[str, torch.Tensor], names: list[tuple[str, str]], fmt: str) -> dict[str, torch.Tensor]:
    renamed = {}
    for name, tensor in weights.items():
        for pattern, target in names:
            if re.fullmatch(pattern, name):
                renamed[re.sub(pattern, target, name)] = tensor
                break
        else:
            raise ValueError(f"{name} has no place in the {fmt} format; export with --format hf.")
    return renamed


def _shared_config(config: MoeConfig) -> dict:
    return dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, hidden_act="silu",
        max_position_embeddings=config.max_position_embeddings, initializer_range=config.initializer_range,
        rms_norm_eps=config.rms_norm_eps, use_cache=config.use_cache, tie_word_embeddings=config.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        num_experts_per_tok=config.num_experts_per_tok, router_aux_loss_coef=config.router_aux_loss_coef,
        pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
    )


def _dense_layers(config: MoeConfig) -> list[int]:
    return [i for i in range(config.num_hidden_layers) if not config.is_moe_layer(i)]


def to_mixtral(config: MoeConfig, weights: dict[str, torch.Tensor]) -> tuple[PretrainedConfig, dict]:
    mixtral = MixtralConfig(
        **_shared_config(config), intermediate_size=config.moe_intermediate_size,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim,
        num_local_experts=config.num_experts,
    )
    return mixtral, _rename(weights, _MIXTRAL_NAMES, "mixtral")


def to_qwen3_moe(config: MoeConfig, weights: dict[str, torch.Tensor]) -> tuple[PretrainedConfig, dict]:
    qwen3 = Qwen3MoeConfig(
        **_shared_config(config), intermediate_size=config.intermediate_size,
        moe_intermediate_size=config.moe_intermediate_size, num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim, num_experts=config.num_experts, norm_topk_prob=config.norm_topk,
        decoder_sparse_step=1, mlp_only_layers=_dense_layers(config), attention_bias=False,
        use_sliding_window=False,
    )
    return qwen3, _rename(weights, _QWEN_DEEPSEEK_EXPERTS + _SAME, "qwen3_moe")


def to_qwen2_moe(config: MoeConfig, weights: dict[str, torch.Tensor]) -> tuple[PretrainedConfig, dict]:
    qwen2 = Qwen2MoeConfig(
        **_shared_config(config), intermediate_size=config.intermediate_size,
        moe_intermediate_size=config.moe_intermediate_size, num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim, num_experts=config.num_experts, norm_topk_prob=config.norm_topk,
        shared_expert_intermediate_size=config.moe_intermediate_size * config.num_shared_experts,
        decoder_sparse_step=1, mlp_only_layers=_dense_layers(config), qkv_bias=False, use_sliding_window=False,
    )
    weights = dict(weights)
    for name in [n for n in weights if re.fullmatch(_LAYER + r"\.mlp\.shared_experts\.down_proj\.weight", n)]:
        weights[name] = weights[name] * 2  # sigmoid(0) = 1/2: see qwen2_moe_blockers
        layer = name.removesuffix(".mlp.shared_experts.down_proj.weight")
        weights[f"{layer}.mlp.shared_expert_gate.weight"] = weights[name].new_zeros(1, config.hidden_size)
    names = [(_LAYER + r"\.mlp\.shared_experts\.(\w+)\.weight", r"\1.mlp.shared_expert.\2.weight"),
             (_LAYER + r"\.mlp\.shared_expert_gate\.weight", r"\1.mlp.shared_expert_gate.weight"),
             *_QWEN_DEEPSEEK_EXPERTS, *_SAME]
    return qwen2, _rename(weights, names, "qwen2_moe")


def rope_rows_to_interleaved(rows: torch.Tensor) -> torch.Tensor:
    """The rows of a projection onto R rotated dims, from the rotate-half layout (dim i pairs with i + R/2, this
    model's) to DeepSeek's interleaved one (dim 2i pairs with 2i + 1): row 2i is row i, row 2i + 1 is row i + R/2.
    transformers' `apply_rotary_pos_emb_interleave` de-interleaves as it rotates, so the rotated q and k, and the
    attention, are the same."""
    R = rows.shape[0]
    order = torch.arange(R).view(2, R // 2).t().flatten()
    return rows[order]


def to_deepseek_v3(config: MoeConfig, weights: dict[str, torch.Tensor]) -> tuple[PretrainedConfig, dict]:
    deepseek = DeepseekV3Config(
        **_shared_config(config), intermediate_size=config.intermediate_size,
        moe_intermediate_size=config.moe_intermediate_size, num_key_value_heads=config.num_attention_heads,
        n_routed_experts=config.num_experts, n_shared_experts=config.num_shared_experts,
        first_k_dense_replace=config.first_k_dense_replace, norm_topk_prob=config.norm_topk,
        routed_scaling_factor=config.router_scaling_factor,
        n_group=config.router_n_group or 1, topk_group=config.router_topk_group or 1,  # one group: no limit
        q_lora_rank=config.q_lora_rank, kv_lora_rank=config.kv_lora_rank, qk_rope_head_dim=config.qk_rope_head_dim,
        qk_nope_head_dim=config.qk_nope_head_dim, v_head_dim=config.v_head_dim, rope_interleave=True,
        attention_bias=False, num_mtp_layers=0,
    )
    H, C, R, N = config.num_attention_heads, config.kv_lora_rank, config.qk_rope_head_dim, config.qk_nope_head_dim
    weights = dict(weights)
    for name, tensor in list(weights.items()):
        if re.fullmatch(_LAYER + r"\.self_attn\.(q_proj|q_b_proj)\.weight", name):
            per_head = tensor.view(H, N + R, -1)
            rope = torch.stack([rope_rows_to_interleaved(head[N:]) for head in per_head])
            weights[name] = torch.cat([per_head[:, :N], rope], dim=1).reshape_as(tensor)
        elif re.fullmatch(_LAYER + r"\.self_attn\.kv_a_proj_with_mqa\.weight", name):
            weights[name] = torch.cat([tensor[:C], rope_rows_to_interleaved(tensor[C:])])
        elif re.fullmatch(_MOE + r"\.gate\.wg\.weight", name) and not config.uses_expert_bias:
            # DeepSeek-V3's router always has the bias: zero routes as this model does without one.
            bias = name.removesuffix("wg.weight") + "e_score_correction_bias"
            weights[bias] = torch.zeros(config.num_experts, dtype=torch.float32)
    names = [(_LAYER + r"\.mlp\.shared_experts\.(\w+)\.weight", r"\1.mlp.shared_experts.\2.weight"),
             *_QWEN_DEEPSEEK_EXPERTS, *_SAME]
    return deepseek, _rename(weights, names, "deepseek_v3")


@dataclass(frozen=True)
class StockFormat:
    architecture: str  # the transformers class the folder loads with
    blockers: Callable[[MoeConfig], list[str]]
    convert: Callable[[MoeConfig, dict[str, torch.Tensor]], tuple[PretrainedConfig, dict[str, torch.Tensor]]]


STOCK_FORMATS = {
    "mixtral": StockFormat("MixtralForCausalLM", mixtral_blockers, to_mixtral),
    "qwen3_moe": StockFormat("Qwen3MoeForCausalLM", qwen3_moe_blockers, to_qwen3_moe),
    "qwen2_moe": StockFormat("Qwen2MoeForCausalLM", qwen2_moe_blockers, to_qwen2_moe),
    "deepseek_v3": StockFormat("DeepseekV3ForCausalLM", deepseek_v3_blockers, to_deepseek_v3),
}


def to_stock(fmt: str, config: MoeConfig,
             weights: dict[str, torch.Tensor]) -> tuple[PretrainedConfig, dict[str, torch.Tensor]]:
    """The stock config (its `architectures` set) and the weights under its names; a ValueError naming every
    blocker when the format cannot compute this model."""
    stock = STOCK_FORMATS[fmt]
    blockers = stock.blockers(config)
    if blockers:
        raise ValueError(f"--format {fmt} ({stock.architecture}) cannot compute this model: it has "
                         f"{', '.join(blockers)}. Export it with --format hf.")
    converted, renamed = stock.convert(config, weights)
    converted.architectures = [stock.architecture]
    return converted, renamed


__all__ = ["STOCK_FORMATS", "StockFormat", "deepseek_v3_blockers", "mixtral_blockers", "qwen2_moe_blockers",
           "qwen3_moe_blockers", "rope_rows_to_interleaved", "to_stock"]
