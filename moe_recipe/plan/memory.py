"""Model states on one rank: parameters, gradients, fp32 master weights and Adam states, dense and expert parts, as
DeepSpeed allocates them under ZeRO 0-2 with expert parallelism (tests/distributed/test_plan_vs_engine.py checks them
byte for byte)."""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from moe_model import MoeConfig, MoeForCausalLM

FP32 = 4
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# DeepSpeed ZeRO 1/2 pads each flattened optimizer group to a multiple of 2 x its data-parallel size
# (`nccl_start_alignment_factor`, with `zero_optimization.parameter_alignment` at its default, false).
ZERO_ALIGNMENT = 2


@dataclass(frozen=True)
class OptimizerGroup:
    tensor_numels: tuple[int, ...]  # the group's parameters on one rank, in order
    is_expert: bool

    @property
    def numel(self) -> int:
        return sum(self.tensor_numels)


def build_rank_model(model_config: MoeConfig, ep_size: int) -> MoeForCausalLM:
    """The model one rank holds at `ep_size` (its E / ep_size local experts), on the meta device: no memory, no init.
    Every ep_rank holds the same shapes."""
    from transformers.initialization import no_init_weights

    from moe_model import MoeForCausalLM

    with torch.device("meta"), no_init_weights():
        return MoeForCausalLM(model_config, ep_size=ep_size, ep_rank=0)


def optimizer_groups(model_config: MoeConfig, ep_size: int, weight_decay: float) -> list[OptimizerGroup]:
    """The optimizer groups one rank hands DeepSpeed, from the real model built on the meta device.

    `build_param_groups` is the recipe's own function (no decay on norms, DeepSpeed's expert groups, split at
    DeepSpeed's max group size), so every group, and hence every ZeRO padding, matches the run.
    """
    from ..engine import build_param_groups

    return [OptimizerGroup(tuple(p.numel() for p in group["params"]), bool(group.get("moe", False)))
            for group in build_param_groups(build_rank_model(model_config, ep_size), weight_decay)
            if group["params"]]  # DeepSpeed drops empty groups


def zero_flat_numel(numel: int, dp: int) -> int:
    """The flattened, padded length ZeRO 1/2 gives a group of `numel` parameters partitioned over `dp` ranks."""
    alignment = ZERO_ALIGNMENT * dp
    return -(-numel // alignment) * alignment


def zero2_grad_numel(group: OptimizerGroup, dp: int, partition_id: int) -> int:
    """Gradient elements ZeRO-2 keeps for one partition: every parameter that starts in it or crosses its start
    counts whole (DeepSpeed's `get_partition_info`, whose parameters' grads fill `grads_in_partition`)."""
    size = zero_flat_numel(group.numel, dp) // dp
    start, end = size * partition_id, size * (partition_id + 1)
    offsets = list(itertools.accumulate(group.tensor_numels, initial=0))  # offsets[i]: where parameter i starts
    first = bisect.bisect_left(offsets, start, hi=len(group.tensor_numels))
    if first > 0 and offsets[first - 1] < start < offsets[first]:
        first -= 1  # the parameter that crosses the partition start
    last = bisect.bisect_left(offsets, end, hi=len(group.tensor_numels))
    return offsets[last] - offsets[first]


def ranks_in_groups(rank: int, ep_size: int) -> tuple[int, int]:
    """(index in the dense data-parallel group, index in the expert-data-parallel group) of a global rank: DeepSpeed
    puts consecutive ranks in one EP group, so the expert-DP group of rank r is r % G, r % G + G, ..."""
    return rank, rank // ep_size


@dataclass
class Split:
    """Bytes on one GPU, dense and expert parts."""

    dense: int = 0
    expert: int = 0

    @property
    def total(self) -> int:
        return self.dense + self.expert

    def add(self, is_expert: bool, value: int) -> None:
        if is_expert:
            self.expert += value
        else:
            self.dense += value


@dataclass
class StateMemory:
    """Model states on one rank. Host-side (ZeRO-Offload) bytes are kept apart from device bytes."""

    params: Split
    grads: Split
    master_weights: Split  # fp32 copies the optimizer updates
    optimizer_states: Split  # Adam exp_avg and exp_avg_sq (+ a 4-byte step counter per optimizer tensor)
    grad_buckets: int  # ZeRO's reduction buckets (reduce_bucket_size elements, two with overlap_comm), during backward
    step_transient: int  # extra bytes alive only inside optimizer.step()
    host: int  # bytes in host memory with ZeRO-Offload
    num_params: Split = field(default_factory=Split)  # parameter counts on this rank (not bytes)

    @property
    def device_total(self) -> int:
        """Model states that stay on the device between steps, gradients included."""
        return self.params.total + self.grads.total + self.master_weights.total + self.optimizer_states.total


def state_memory(groups: list[OptimizerGroup], stage: int, precision: str, world_size: int, ep_size: int,
                 offload_optimizer: bool = False, reduce_bucket_size: int = 50_000_000,
                 overlap_comm: bool = False, rank: int | None = None) -> StateMemory:
    """Bytes of parameters, gradients, fp32 master weights and optimizer states on one rank.

    Stage 0: torch AdamW on the model's parameters (fp32), or DeepSpeed's unfused bf16/fp16 optimizer, which keeps an
    fp32 copy of every parameter. Stages 1-2: each group is flattened, padded to a multiple of 2 x its DP size and
    split into equal partitions; each rank keeps the fp32 master and Adam states of its partition only. Dense
    groups are partitioned over all ranks, expert groups over the expert-data-parallel group (world / ep_size).
    Only ZeRO-2's gradients differ between ranks: `rank` picks one, None the largest.
    """
    b = DTYPE_BYTES[precision]
    dp, expert_dp = world_size, world_size // ep_size
    params, grads, master, states, counts = Split(), Split(), Split(), Split(), Split()
    host = step_transient = buckets = 0
    largest_partition = 0
    for g in groups:
        counts.add(g.is_expert, g.numel)
        if stage == 0:
            params.add(g.is_expert, g.numel * b)
            grads.add(g.is_expert, g.numel * b)
            if b != FP32:  # unfused bf16/fp16 optimizer: an fp32 copy per parameter, fp32 grads during the step
                master.add(g.is_expert, g.numel * FP32)
                step_transient += g.numel * FP32
            states.add(g.is_expert, 2 * g.numel * FP32 + FP32 * len(g.tensor_numels))  # + a step counter each
            continue
        group_dp = expert_dp if g.is_expert else dp
        partition = zero_flat_numel(g.numel, group_dp) // group_dp
        largest_partition = max(largest_partition, partition)
        params.add(g.is_expert, partition * group_dp * b)
        if offload_optimizer:  # master, Adam states and fp32 grads live on the host
            host += partition * FP32 * 4 + FP32
            continue
        master.add(g.is_expert, partition * FP32)
        states.add(g.is_expert, 2 * partition * FP32 + FP32)  # one flat tensor per group: one step counter
        if stage == 1:  # full gradients until the reduction at the accumulation boundary (across micro steps)
            grads.add(g.is_expert, g.numel * b)
    if stage == 2 and not offload_optimizer:
        # Reduced every micro step into the gradients of this rank's partition.
        def zero2_grads(r: int) -> Split:
            dense_id, expert_id = ranks_in_groups(r, ep_size)
            out = Split()
            for g in groups:
                out.add(g.is_expert, b * zero2_grad_numel(g, expert_dp if g.is_expert else dp,
                                                          expert_id if g.is_expert else dense_id))
            return out

        grads = zero2_grads(rank) if rank is not None else max(
            (zero2_grads(r) for r in range(world_size)), key=lambda split: split.total)
    if stage > 0:
        buckets = reduce_bucket_size * b * (2 if overlap_comm else 1)
        if offload_optimizer:
            # Gradients go to the host through a device buffer the size of the largest parameter.
            buckets += max(max(g.tensor_numels) for g in groups) * b
        else:
            # step(): the group's gradient partition is flattened (b) and cast to fp32, one group at a time.
            step_transient = largest_partition * (b + FP32 if b != FP32 else FP32)
    return StateMemory(params=params, grads=grads, master_weights=master, optimizer_states=states,
                       grad_buckets=buckets, step_transient=step_transient, host=host, num_params=counts)



__all__ = ["DTYPE_BYTES", "OptimizerGroup", "Split", "StateMemory", "build_rank_model", "optimizer_groups",
           "state_memory", "zero2_grad_numel", "zero_flat_numel"]
