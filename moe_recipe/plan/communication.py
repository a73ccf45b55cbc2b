"""Bytes one rank hands the collectives per optimizer step (expert all-to-all, gradient reduction) and the time
they take on the cluster's links; and how many EP ranks a token's experts reach, with and without group-limited
routing, with the all-to-all volume of a dispatcher that sends each token once per destination rank."""

from __future__ import annotations

import math
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


def ranks_per_group(num_experts: int, n_group: int, ep_size: int) -> tuple[int, int] | None:
    """How router groups sit on EP ranks, whose experts are contiguous (rank r holds experts r E/G .. (r+1) E/G - 1):
    (groups on each rank, ranks each group spans). Aligned only when n_group is a multiple or a divisor of ep_size;
    None otherwise (groups straddle rank boundaries)."""
    if n_group % ep_size == 0:
        return n_group // ep_size, 1
    if ep_size % n_group == 0:
        return 1, ep_size // n_group
    return None


def expected_destination_ranks(num_experts: int, k: int, ep_size: int, n_group: int | None = None,
                               topk_group: int | None = None) -> float | None:
    """Expected number of distinct EP ranks one token's k experts sit on, for uniform routing.

    Plain top-k (no groups): the k experts are a uniform k-subset of E, and a rank's E/G experts are all missed with
    probability C(E - E/G, k) / C(E, k), so G (1 - C(E - E/G, k) / C(E, k)).
    Group-limited: topk_group of the n_group groups are eligible (a uniform choice) and the k experts a uniform
    k-subset of their W = topk_group E/n_group experts. A rank overlapping m groups by o experts each (m = n_group/G
    whole groups, o = E/n_group; or m = 1 group, o = E/G when a group spans several ranks) is missed with
    probability sum_j P(j of its m groups eligible) C(W - j o, k) / C(W, k), P hypergeometric. None when groups do not
    align with ranks (`ranks_per_group`).
    """
    E, G = num_experts, ep_size
    if n_group is None:
        return G * (1 - math.comb(E - E // G, k) / math.comb(E, k))
    aligned = ranks_per_group(E, n_group, G)
    if aligned is None:
        return None
    groups_on_rank, group_span = aligned
    overlap = E // n_group if group_span == 1 else E // G
    eligible = topk_group * (E // n_group)
    missed = sum(math.comb(groups_on_rank, j) * math.comb(n_group - groups_on_rank, topk_group - j)
                 / math.comb(n_group, topk_group) * math.comb(eligible - j * overlap, k) / math.comb(eligible, k)
                 for j in range(min(groups_on_rank, topk_group) + 1))
    return G * (1 - missed)


def max_destination_ranks(num_experts: int, k: int, ep_size: int, n_group: int | None = None,
                          topk_group: int | None = None) -> int:
    """The most EP ranks one token's experts can reach: k, G, and with groups the ranks that topk_group groups can
    cover (the groups spanning the most ranks; one rank per group when groups = ranks)."""
    bound = min(k, ep_size)
    if n_group is None:
        return bound
    experts_per_rank, experts_per_group = num_experts // ep_size, num_experts // n_group
    spans = sorted(((g + 1) * experts_per_group - 1) // experts_per_rank - g * experts_per_group // experts_per_rank
                   + 1 for g in range(n_group))
    return min(bound, sum(spans[-topk_group:]))


@dataclass
class TokenDispatch:
    """One token per destination rank instead of DeepSpeed's capacity buffers: what group-limited routing saves.

    DeepSpeed's all-to-all (`Communication.all_to_all_*`) sends the whole [E, C, D] buffer whatever the routing, so
    the group limit does not shrink it; these figures are for a dispatcher that sends each token once to every rank
    holding one of its experts (DeepSeek-V3's node-limited dispatch), counted the same way: bytes handed to the
    all-to-all per step, the rank's own share included."""

    num_experts_per_tok: int
    n_group: int | None
    topk_group: int | None
    expected_ranks: float  # per token, plain top-k, uniform routing
    max_ranks: int  # per token, plain top-k
    expected_ranks_limited: float | None  # with the group limit (None: no groups, or groups not aligned with ranks)
    max_ranks_limited: int | None  # what the group limit guarantees (None: no groups)
    bytes_per_step: float  # plain top-k, expected
    bytes_per_step_limited: float | None  # with the group limit, expected

    @property
    def saving(self) -> float | None:
        """Share of the once-per-rank dispatch volume the group limit saves (expected, uniform routing)."""
        if self.bytes_per_step_limited is None:
            return None
        return 1 - self.bytes_per_step_limited / self.bytes_per_step


def token_dispatch(c: MoeConfig, ep_size: int, tokens: int, calls: int, micro_steps: int,
                   precision: str) -> TokenDispatch:
    """`tokens` per rank per micro step; `calls` all-to-alls per MoE layer and micro step, as DeepSpeed's."""
    E, k, G = c.num_experts, c.num_experts_per_tok, ep_size
    n_group, topk_group = c.router_n_group, c.router_topk_group
    per_rank_reached = tokens * c.hidden_size * DTYPE_BYTES[precision] * calls * micro_steps * len(c.moe_layer_indices)
    expected = expected_destination_ranks(E, k, G)
    limited = None if n_group is None else expected_destination_ranks(E, k, G, n_group, topk_group)
    return TokenDispatch(
        num_experts_per_tok=k, n_group=n_group, topk_group=topk_group, expected_ranks=expected,
        max_ranks=max_destination_ranks(E, k, G),
        expected_ranks_limited=limited,
        max_ranks_limited=None if n_group is None else max_destination_ranks(E, k, G, n_group, topk_group),
        bytes_per_step=expected * per_rank_reached,
        bytes_per_step_limited=None if limited is None else limited * per_rank_reached,
    )


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
    token_dispatch: TokenDispatch | None  # None at ep_size 1 (no all-to-all)


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
        token_dispatch=token_dispatch(c, G, T, calls, t.grad_accum, precision) if G > 1 else None,
    )



__all__ = ["Communication", "TokenDispatch", "all_to_all_buffer_bytes", "all_to_all_calls_per_moe_layer",
           "communication", "expected_destination_ranks", "max_destination_ranks", "ranks_per_group", "ring_bytes",
           "token_dispatch"]
