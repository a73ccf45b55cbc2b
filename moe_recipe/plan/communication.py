"""Bytes one rank hands the collectives per optimizer step (expert all-to-all, gradient reduction) and the time
they take on the cluster's links."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .activations import expert_capacity
from .hardware import ClusterSpec
from .memory import DTYPE_BYTES, StateMemory

if TYPE_CHECKING:
    from moe_model import MoeConfig

    from ..config import RecipeConfig


def all_to_all_calls_per_moe_layer(activation_checkpointing: bool) -> int:
    """Dispatch and combine, forward and backward (autograd's all-to-all is its own inverse); a checkpointed layer
    runs its forward, hence both all-to-alls, once more during backward."""
    return 6 if activation_checkpointing else 4


def all_to_all_buffer_bytes(c: MoeConfig, tokens: int, precision: str) -> int:
    """Bytes one rank hands one `all_to_all_single`: the whole [E, C, D] buffer; (G - 1) / G of it leaves the rank."""
    return c.num_experts * expert_capacity(c, tokens) * c.hidden_size * DTYPE_BYTES[precision]


def ring_bytes(numel_bytes: int, ranks: int, passes: int = 2) -> float:
    """Bytes one rank sends in a ring all-reduce (passes=2: reduce-scatter + all-gather) of `numel_bytes`."""
    return passes * (ranks - 1) / ranks * numel_bytes if ranks > 1 else 0.0


def group_spans_nodes(ranks: list[int], gpus_per_node: int) -> tuple[int, int]:
    """(peers on this node, peers on other nodes) for the first rank of a process group."""
    node = ranks[0] // gpus_per_node
    same = sum(1 for r in ranks[1:] if r // gpus_per_node == node)
    return same, len(ranks) - 1 - same


@dataclass
class Communication:
    """Bytes one rank sends per optimizer step, and the time they take."""

    capacity: int
    all_to_all_buffer: int  # per call
    all_to_all_calls_per_moe_layer: int
    all_to_all_per_moe_layer: int  # per step: calls x micro steps x buffer (what the collective is handed)
    all_to_all_total: int
    all_to_all_sent: float  # the part that leaves the rank: (G - 1) / G
    all_to_all_seconds: float
    dense_grad_reduction: float
    expert_grad_reduction: float
    grad_reduction_seconds: float
    ep_peers_same_node: int
    ep_peers_other_nodes: int
    expert_dp_spans_nodes: bool


def communication(cfg: RecipeConfig, c: MoeConfig, memory: StateMemory, cluster: ClusterSpec,
                  precision: str) -> Communication:
    world, G, t = cluster.world_size, cfg.parallel.ep_size, cfg.trainer
    b = DTYPE_BYTES[precision]
    T = t.micro_batch_size * cfg.data.seq_len
    capacity = expert_capacity(c, T)
    buffer = all_to_all_buffer_bytes(c, T, precision) if G > 1 else 0
    calls = all_to_all_calls_per_moe_layer(t.activation_checkpointing)
    per_layer = buffer * calls * t.grad_accum
    total = per_layer * len(c.moe_layer_indices)
    same, other = group_spans_nodes(list(range(G)), cluster.gpus_per_node)
    # Each peer gets 1/G of the buffer; NVLink and network traffic are counted one after the other (conservative).
    per_peer = total / G
    a2a_seconds = per_peer * same / (cluster.intra_node_gbps * 1e9) + per_peer * other / (cluster.inter_node_gbps * 1e9)

    # Gradients travel in the training dtype. Stage 0/1 reduce once per step (all-reduce, or reduce-scatter +
    # all-gather of the updated weights); stage 2 reduce-scatters every micro step and all-gathers once.
    passes = t.grad_accum + 1 if cfg.zero.stage == 2 else 2
    dense_numel, expert_numel = memory.num_params.dense, memory.num_params.expert
    expert_dp = world // G
    dense = ring_bytes(dense_numel * b, world, passes)
    expert = ring_bytes(expert_numel * b, expert_dp, passes)
    expert_dp_ranks = list(range(0, world, G))
    expert_dp_spans = group_spans_nodes(expert_dp_ranks, cluster.gpus_per_node)[1] > 0
    dense_bw = cluster.inter_node_gbps if cluster.nodes > 1 else cluster.intra_node_gbps
    expert_bw = cluster.inter_node_gbps if expert_dp_spans else cluster.intra_node_gbps
    reduction_seconds = dense / (dense_bw * 1e9) + expert / (expert_bw * 1e9)
    return Communication(
        capacity=capacity, all_to_all_buffer=buffer, all_to_all_calls_per_moe_layer=calls,
        all_to_all_per_moe_layer=per_layer, all_to_all_total=total, all_to_all_sent=total * (G - 1) / G,
        all_to_all_seconds=a2a_seconds, dense_grad_reduction=dense, expert_grad_reduction=expert,
        grad_reduction_seconds=reduction_seconds, ep_peers_same_node=same, ep_peers_other_nodes=other,
        expert_dp_spans_nodes=expert_dp_spans,
    )



__all__ = ["Communication", "all_to_all_buffer_bytes", "all_to_all_calls_per_moe_layer", "communication",
           "ring_bytes"]
