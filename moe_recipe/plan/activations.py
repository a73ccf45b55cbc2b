"""Expert capacity and the activation bytes of one micro-batch on one rank, itemized from the tensors autograd saves
in this model (tests/unit/test_plan.py checks them against saved-tensor hooks)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .memory import DTYPE_BYTES, FP32

if TYPE_CHECKING:
    from moe_model import MoeConfig


def expert_capacity(config: MoeConfig, tokens: int) -> int:
    """C: slots per expert in the [E, C, D] buffers, for `tokens` tokens on one rank while training (DeepSpeed's
    `_capacity`; eval never drops tokens).

    DeepSpeed computes ceil(T / E * capacity_factor * k) in float32 and takes the max with min_capacity (which the
    model caps at T). With drop_tokens=false the buffers are sized by the busiest expert instead, at most T: that
    worst case is returned.
    """
    if not config.drop_tokens:
        return tokens
    # The same float32 arithmetic as DeepSpeed, so rounding at the edges agrees.
    factor = config.capacity_factor * config.num_experts_per_tok
    capacity = int(torch.ceil((tokens / config.num_experts) * torch.tensor(factor)))
    return max(capacity, min(config.min_capacity, tokens))


@dataclass
class ActivationMemory:
    """Activation bytes of one micro-batch on one rank."""

    saved: int  # tensors autograd keeps for backward, whole model, without checkpointing
    saved_by_kind: dict[str, int]  # the same, itemized
    saved_checkpointed: int  # with activation checkpointing (layer inputs kept, one layer recomputed at a time)
    expert_buffers: int  # capacity-padded [E, C, *] buffers, all MoE layers (part of `saved`)
    largest_layer: int  # saved bytes of the largest decoder layer
    logits: int  # T x V x b, alive until the step ends (the output holds them)
    loss_backward: int  # log-softmax gradients at the start of backward, fp32
    peak: int  # estimated activation peak during forward + backward
    peak_checkpointed: int


def _attention_saved_bytes(c: MoeConfig, B: int, S: int, b: int) -> int:
    """What one layer's attention saves, from its input (the norm's output, counted there) on."""
    T, H = B * S, c.num_attention_heads
    lse = B * H * S * FP32
    if c.attention == "mla":
        C, R, N, Dv, Q = c.kv_lora_rank, c.qk_rope_head_dim, c.qk_nope_head_dim, c.v_head_dim, c.q_lora_rank
        # The latents' RMSNorms as the layer norms (in fp32 the kv one keeps its input's storage, the shared key
        # with it); SDPA keeps q and k (N + R per head, new tensors), v (a view of kv_b_proj's output, which holds
        # the keys' position-free parts too), its output and the log-sum-exp.
        latents = T * C * (FP32 + 2 * b) + T * FP32 + (T * R * FP32 if b == FP32 else 0)
        if Q is not None:
            latents += T * Q * (FP32 + 2 * b) + T * FP32
        return latents + 2 * T * H * (N + R) * b + T * H * (N + Dv) * b + T * H * Dv * b + lse
    Dh, Hkv = c.head_dim, c.num_key_value_heads
    # SDPA keeps q and k after RoPE, v, its output and the log-sum-exp; RoPE's cos/sin do not need grads.
    saved = 2 * T * H * Dh * b + 2 * T * Hkv * Dh * b + lse
    if c.qk_norm:  # per head of q and k: the fp32 input, its rsqrt and the normalised x (RoPE keeps no output)
        saved += T * (H + Hkv) * (Dh * (FP32 + b) + FP32)
    return saved


def _layer_saved_bytes(c: MoeConfig, ep_size: int, B: int, S: int, b: int, capacity: int,
                       is_moe: bool) -> dict[str, int]:
    """What autograd saves in one decoder layer (checked against saved-tensor hooks in tests/unit/test_plan.py)."""
    T, D = B * S, c.hidden_size
    # RMSNorm: its fp32 input, rsqrt (T), the normalized x in the training dtype, and its output (the next input).
    norm = T * D * (FP32 + 2 * b) + T * FP32
    items = {"norms": 2 * norm, "attention": _attention_saved_bytes(c, B, S, b)}
    if not is_moe:
        items["mlp"] = 4 * T * c.intermediate_size * b  # SwiGLU: gate, silu(gate), up, product
        return items
    E, k, F, C = c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size, capacity
    El = E // ep_size
    if b != FP32 and not c.num_shared_experts and not c.use_residual:
        items["norms"] -= T * D * b  # the router and the gate keep fp32 copies of the norm's output, not it
    # Router: the z-loss logits, DeepSpeed's gate (softmax, masks, gates: T x E, its top-1 / top-2 / top-k variant),
    # the dispatch and combine indices (int64); in bf16/fp16 the model (z-loss) and the gate each keep an fp32 copy
    # of the input and of the router weight.
    router = T * E * FP32 + T * FP32 + E * FP32 + (E * C + 1) * 8 + k * T * 8
    if k == 1:
        router += T * E * 12
    elif k == 2:
        router += T * E * 13 + 3 * T * FP32
    else:
        router += T * E * 13 + T * k * 8 + 2 * T * FP32
    if b != FP32:
        router += 2 * (T * D + E * D) * FP32
    items["router"] = router
    # The local experts see G x C tokens each: E x C rows in all, padding included. The batched experts keep their
    # input and the four SwiGLU intermediates of every slot, and the stacked expert weights used by the bmm.
    items["expert buffers"] = E * C * D * b + 4 * E * C * F * b
    items["stacked expert weights"] = 3 * El * D * F * b
    items["combine"] = k * T * D * b + k * T * FP32  # each route's expert output, and its gate value
    if c.num_shared_experts:
        items["shared experts"] = 4 * T * F * c.num_shared_experts * b
    if c.use_residual:  # PR-MoE: a dense residual MLP and its 2-way mixing coefficient
        items["residual mlp"] = 4 * T * F * b + T * D * b + T * 2 * FP32
    return items


def activation_memory(c: MoeConfig, micro_batch_size: int, seq_len: int, precision: str,
                      ep_size: int = 1) -> ActivationMemory:
    """Activation bytes of one micro-batch of `micro_batch_size` x `seq_len` tokens on one of `ep_size` EP ranks."""
    B, S, b = micro_batch_size, seq_len, DTYPE_BYTES[precision]
    T, D, V, L = B * S, c.hidden_size, c.vocab_size, c.num_hidden_layers
    T_loss = B * (S - 1)  # next-token targets
    capacity = expert_capacity(c, T)
    by_kind: dict[str, int] = {}
    layers = [_layer_saved_bytes(c, ep_size, B, S, b, capacity, c.is_moe_layer(i)) for i in range(L)]
    for items in layers:
        for kind, value in items.items():
            by_kind[kind] = by_kind.get(kind, 0) + value
    largest_layer = max(sum(items.values()) for items in layers)
    by_kind["embedding and rope"] = T * 8 + 2 * B * S * c.rope_head_dim * b  # token ids; cos and sin
    by_kind["final norm"] = T * D * (FP32 + 2 * b) + T * FP32
    by_kind["log-softmax"] = T_loss * V * FP32 + T_loss * 8  # fp32 log-probs and the targets
    saved = sum(by_kind.values())

    logits = T * V * b
    loss_backward = 2 * T_loss * V * FP32  # grad of the log-probs and of the fp32 logits, while the log-probs live
    # Backward starts with the loss (log-probs, their grads, the logits), then walks the layers from the last:
    # each needs about its own saved bytes again for gradients.
    peak = max(saved + logits + loss_backward, saved - T_loss * V * FP32 + logits + largest_layer)

    # Checkpointing keeps each layer's input, then recomputes one layer at a time during backward. The rope tables
    # and the router logits the output returns stay alive beside them.
    moe_layers = len(c.moe_layer_indices)
    saved_checkpointed = T * 8 + L * T * D * b + by_kind["final norm"] + by_kind["log-softmax"]
    alive = 2 * B * S * c.rope_head_dim * b + moe_layers * T * c.num_experts * FP32
    kept = saved_checkpointed - by_kind["log-softmax"] + alive
    peak_checkpointed = max(saved_checkpointed + alive + logits + loss_backward, kept + logits + 2 * largest_layer)
    return ActivationMemory(
        saved=saved, saved_by_kind=by_kind, saved_checkpointed=saved_checkpointed,
        expert_buffers=by_kind.get("expert buffers", 0), largest_layer=largest_layer, logits=logits,
        loss_backward=loss_backward, peak=peak, peak_checkpointed=peak_checkpointed,
    )



__all__ = ["ActivationMemory", "activation_memory", "expert_capacity"]
