"""The plan: one layout's model states, activations, communication, peak memory and step time, put together."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..flops import active_params_per_token, flops_per_token
from .activations import ActivationMemory, activation_memory
from .communication import Communication, communication, ranks_per_group
from .hardware import ClusterSpec, GiB
from .memory import StateMemory, optimizer_groups, state_memory

if TYPE_CHECKING:
    from moe_model import MoeConfig

    from ..config import RecipeConfig


class NotModeledError(Exception):
    """A valid configuration the planner has no model for (it says which, and that the run may still work)."""


def planned_precision(cfg: RecipeConfig) -> str:
    """`auto` trains in bf16 on every GPU the presets cover; the planner plans for GPUs."""
    return "bf16" if cfg.trainer.precision == "auto" else cfg.trainer.precision


@dataclass
class Plan:
    overrides: list[str]
    cluster: ClusterSpec
    precision: str
    world_size: int
    ep_size: int
    expert_dp_size: int
    zero_stage: int
    offload_optimizer: bool
    activation_checkpointing: bool
    micro_batch_size: int
    grad_accum: int
    seq_len: int
    global_batch_size: int
    total_params: int
    expert_params_total: int
    active_params_per_token: int  # what one token passes through (embeddings excluded)
    memory: StateMemory
    activations: ActivationMemory
    comm: Communication
    peak_bytes: int  # with the run's activation_checkpointing setting
    peak_bytes_other: int  # with it flipped
    usable_bytes: int
    compute_seconds: float
    step_seconds: float
    tokens_per_second: float
    warnings: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.usable_bytes

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["fits"] = self.fits
        for key in ("params", "grads", "master_weights", "optimizer_states", "num_params"):
            out["memory"][key]["total"] = getattr(self.memory, key).total
        out["memory"]["device_total"] = self.memory.device_total
        if self.comm.token_dispatch is not None:
            out["comm"]["token_dispatch"]["saving"] = self.comm.token_dispatch.saving
        return out


def peak_memory(memory: StateMemory, act: ActivationMemory, stage: int, grad_accum: int,
                checkpointing: bool) -> int:
    """Estimated torch.cuda.max_memory_allocated over a step: model states plus the larger of the backward and the
    optimizer-step phases."""
    static = memory.params.total + memory.master_weights.total + memory.optimizer_states.total
    act_peak = act.peak_checkpointed if checkpointing else act.peak
    if grad_accum > 1:
        # The gradients accumulated by the earlier micro steps are there before this one's backward.
        backward = static + memory.grads.total + memory.grad_buckets + act_peak
    else:
        # Gradients appear as backward walks the layers while the activations are freed: the activation peak
        # comes first, the full gradients at the end.
        backward = static + memory.grad_buckets + max(act_peak, memory.grads.total + act.logits)
    step = static + memory.grads.total + act.logits + memory.step_transient
    return max(backward, step)


def build_plan(cfg: RecipeConfig, cluster: ClusterSpec, tokenizer_vocab_size: int | None = None,
               overrides: list[str] | None = None) -> Plan:
    """Validate `cfg` for this cluster (ValueError if invalid) and estimate memory, communication and time."""
    from ..config import global_batch_size, validate

    world = cluster.world_size
    c = validate(cfg, world, tokenizer_vocab_size=tokenizer_vocab_size)
    if not c.backend_support.planned:
        raise NotModeledError(
            f"model.moe_backend={c.moe_backend!r}: the planner models DeepSpeed's native MoE layer (capacity-padded "
            "[E, C, D] buffers, ZeRO 0-2); AutoEP's dropless layer and ZeRO-3 are not modeled, so no plan is made.")
    precision = planned_precision(cfg)
    t, z = cfg.trainer, cfg.zero
    G = cfg.parallel.ep_size
    groups = optimizer_groups(c, G, cfg.optim.weight_decay)
    memory = state_memory(groups, z.stage, precision, world, G, offload_optimizer=z.offload_optimizer,
                          reduce_bucket_size=z.reduce_bucket_size, overlap_comm=z.overlap_comm)
    act = activation_memory(c, t.micro_batch_size, cfg.data.seq_len, precision, ep_size=G)
    comm = communication(cfg, c, memory, cluster, precision)
    peak = peak_memory(memory, act, z.stage, t.grad_accum, t.activation_checkpointing)
    peak_other = peak_memory(memory, act, z.stage, t.grad_accum, not t.activation_checkpointing)

    # Compute: the model's FLOPs, plus the experts' work on capacity padding (a rank's El experts run G x C slots
    # each, E x C rows, for the k x T routes of a rank's worth of tokens), plus one more forward when recomputing.
    T = t.micro_batch_size * cfg.data.seq_len
    tokens_per_rank = T * t.grad_accum
    padding_flops = 6 * 3 * c.hidden_size * c.moe_intermediate_size * max(
        0, c.num_experts * comm.capacity - c.num_experts_per_tok * T) * len(c.moe_layer_indices)
    flops = flops_per_token(c, cfg.data.seq_len) * tokens_per_rank + padding_flops * t.grad_accum
    if t.activation_checkpointing:
        flops *= 4 / 3
    compute_seconds = flops / (cluster.peak_flops * cluster.mfu)
    # No overlap assumed: DeepSpeed's MoE all-to-all is blocking, and the recipe's ZeRO configs set overlap_comm off.
    step_seconds = compute_seconds + comm.all_to_all_seconds + comm.grad_reduction_seconds
    tokens_per_step = global_batch_size(t, world) * cfg.data.seq_len

    expert_total = memory.num_params.expert * G
    plan = Plan(
        overrides=list(overrides or []), cluster=cluster, precision=precision, world_size=world, ep_size=G,
        expert_dp_size=world // G, zero_stage=z.stage, offload_optimizer=z.offload_optimizer,
        activation_checkpointing=t.activation_checkpointing, micro_batch_size=t.micro_batch_size,
        grad_accum=t.grad_accum, seq_len=cfg.data.seq_len, global_batch_size=global_batch_size(t, world),
        total_params=memory.num_params.dense + expert_total, expert_params_total=expert_total,
        active_params_per_token=active_params_per_token(c),
        memory=memory, activations=act, comm=comm, peak_bytes=peak, peak_bytes_other=peak_other,
        usable_bytes=int(cluster.memory_gib * GiB * (1 - cluster.headroom)), compute_seconds=compute_seconds,
        step_seconds=step_seconds, tokens_per_second=tokens_per_step / step_seconds,
    )
    plan.warnings = layout_warnings(cfg, c, plan, cluster)
    return plan


def layout_warnings(cfg: RecipeConfig, c: MoeConfig, plan: Plan, cluster: ClusterSpec) -> list[str]:
    warnings = []
    G = cfg.parallel.ep_size
    if plan.comm.ep_peers_other_nodes:
        warnings.append(f"parallel.ep_size={G} is larger than (or does not divide) --gpus-per-node="
                        f"{cluster.gpus_per_node}: {plan.comm.ep_peers_other_nodes} of each rank's {G - 1} EP peers "
                        "are on other nodes, so the all-to-all runs at network speed; keep ep_size <= GPUs per node.")
    if G == 1 and plan.world_size > 1:
        warnings.append("parallel.ep_size=1: every rank holds all experts and all-reduces their gradients over all "
                        f"ranks; ep_size up to {math.gcd(c.num_experts, cluster.gpus_per_node)} splits them.")
    if not c.drop_tokens:
        warnings.append("model.drop_tokens=false: the expert buffers are sized by the busiest expert each step; "
                        f"the plan uses the worst case C = T = {plan.comm.capacity}.")
    if c.router_n_group is not None and G > 1 and ranks_per_group(c.num_experts, c.router_n_group, G) is None:
        warnings.append(f"model.router.n_group={c.router_n_group} is neither a multiple nor a divisor of "
                        f"parallel.ep_size={G}: groups straddle EP ranks, so the group limit bounds the ranks a token "
                        "reaches only loosely; pick n_group = ep_size (one group per rank) or a multiple or divisor.")
    if cfg.trainer.precision == "auto":
        warnings.append("trainer.precision=auto is planned as bf16 (what the recipe picks on these GPUs).")
    return warnings


__all__ = ["NotModeledError", "Plan", "build_plan", "layout_warnings", "peak_memory", "planned_precision"]
