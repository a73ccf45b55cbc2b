"""Training FLOPs per token and the GPUs' dense bf16 peak: the MFU the trainer logs, the planner's step time.

No DeepSpeed import here (the planner's `--json` must keep stdout clean), and the model config only for its type.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from moe_model import MoeConfig

# Dense (no sparsity) bf16 peak FLOP/s, keyed by what torch.cuda.get_device_name() contains; SXM parts.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def peak_flops_of(device_name: str) -> float | None:
    """Dense bf16 peak of the GPU torch calls `device_name`; None for a GPU no preset names."""
    return next((flops for name, flops in PEAK_BF16_FLOPS.items() if name in device_name), None)


def guess_peak_flops() -> float | None:
    """Dense bf16 peak of the current GPU, for MFU; None without a GPU or for a GPU no preset names."""
    if not torch.cuda.is_available():
        return None
    return peak_flops_of(torch.cuda.get_device_name(torch.cuda.current_device()))


def attention_params(config: MoeConfig) -> int:
    """The weights of one layer's attention projections (its norms' scales excluded: no matmul)."""
    D, H = config.hidden_size, config.num_attention_heads
    if config.attention == "mla":
        C, R, N, Dv, Q = (config.kv_lora_rank, config.qk_rope_head_dim, config.qk_nope_head_dim, config.v_head_dim,
                          config.q_lora_rank)
        query = D * H * (N + R) if Q is None else D * Q + Q * H * (N + R)
        return query + D * (C + R) + C * H * (N + Dv) + H * Dv * D  # q; latent and shared key; k/v heads; out
    return D * config.head_dim * (H * 2 + config.num_key_value_heads * 2)


def active_params_per_token(config: MoeConfig) -> int:
    """Parameters a token passes through (embeddings excluded, lm_head included): k of E experts, shared ones."""
    d = config.hidden_size
    attn = attention_params(config)
    dense_ffn = 3 * d * config.intermediate_size
    moe_ffn = 3 * d * config.moe_intermediate_size * (config.num_experts_per_tok + config.num_shared_experts)
    moe_ffn += d * config.num_experts  # router
    if config.use_residual:
        moe_ffn += 3 * d * config.moe_intermediate_size + 2 * d
    num_moe = len(config.moe_layer_indices)
    num_dense = config.num_hidden_layers - num_moe
    return config.num_hidden_layers * attn + num_dense * dense_ffn + num_moe * moe_ffn + d * config.vocab_size


def total_params(config: MoeConfig) -> int:
    """Every parameter of the model: the active ones, the experts a token skips, the input embedding if untied."""
    unused_experts = config.num_experts - config.num_experts_per_tok
    embedding = 0 if config.tie_word_embeddings else config.hidden_size * config.vocab_size
    return (active_params_per_token(config) + embedding
            + len(config.moe_layer_indices) * unused_experts * 3 * config.hidden_size * config.moe_intermediate_size)


def flops_per_token(config: MoeConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x active params plus attention scores (PaLM's appendix B): per layer, head and
    position attended, 2 x 3 FLOPs per dim of q.k and of the weighted sum of v (with MLA: N + R and Dv dims; its
    expansion of the cached latent into keys and values is in the active params, once per token)."""
    if config.attention == "mla":
        score_and_value_dims = config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim
    else:
        score_and_value_dims = 2 * config.head_dim
    attn_scores = 6 * config.num_hidden_layers * config.num_attention_heads * score_and_value_dims * seq_len
    return 6 * active_params_per_token(config) + attn_scores


__all__ = ["PEAK_BF16_FLOPS", "active_params_per_token", "attention_params", "flops_per_token", "guess_peak_flops",
           "peak_flops_of", "total_params"]
