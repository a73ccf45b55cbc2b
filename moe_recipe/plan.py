"""Pre-flight planner: memory, communication and step time per GPU, before a job starts.

    moe-plan +experiment=small_ep8 --nodes 1 --gpus-per-node 8 --gpu h100
    python -m moe_recipe.plan model=mixtral_8x7b parallel.ep_size=8 zero=stage2 --nodes 4 --gpu h100 --json

It takes the recipe's own Hydra config and overrides (composed from conf/ exactly as recipes/train.py does, then
`recipe_config_from_dict` and `validate`) plus a cluster shape, and prints per GPU:
  - parameter, gradient, fp32 master and optimizer-state bytes, dense and expert parts, under the ZeRO stage and
    the EP / expert-data-parallel groups. The optimizer groups come from the real model (built on the meta device)
    through the recipe's `build_param_groups`, and ZeRO's flattening and padding rules are applied to them, so these
    numbers are what DeepSpeed allocates (tests/distributed/test_plan_vs_engine.py checks them byte for byte);
  - activation memory with and without activation checkpointing, itemized from the tensors autograd saves in this
    model (capacity-padded expert buffers included), and an estimated peak;
  - per step: all-to-all bytes (dispatch + combine, forward and backward, per MoE layer and in total), gradient
    reduction bytes for the dense and expert parameters, and a step time and tokens/s estimate.
Exit status: 0 the layout fits, 1 it does not fit (with the fix), 2 the configuration is invalid, 3 it is valid but
not modeled (model.moe_backend=autoep): launch scripts stop on 1 and 2 only.

Shape legend: B micro batch, S seq_len, T = B * S tokens per rank per micro-batch, D hidden size, F expert intermediate
size, E experts, El = E / G local experts, G ep_size, C capacity per expert, k experts per token, V vocab, H / Hkv / Dh
attention heads / key-value heads / head dim, b bytes per element of the training dtype.
The formulas, next to the EP / TP / DP formulas people know, are in docs/planner.md.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import dataclasses
import itertools
import json
import math
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from unittest import mock

import torch

if TYPE_CHECKING:
    from moe_model import MoeConfig

    from .config import RecipeConfig

# The model and the engine (hence DeepSpeed) are imported inside the functions that use them: DeepSpeed logs to
# stdout when first imported, and `--json` must leave nothing but the JSON document there (see `main`).

GiB = 2**30
FP32 = 4
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# DeepSpeed ZeRO 1/2 pads each flattened optimizer group to a multiple of 2 x its data-parallel size
# (`nccl_start_alignment_factor`, with `zero_optimization.parameter_alignment` at its default, false).
ZERO_ALIGNMENT = 2
EXIT_FITS, EXIT_DOES_NOT_FIT, EXIT_INVALID, EXIT_NOT_MODELED = 0, 1, 2, 3


class NotModeledError(Exception):
    """A valid configuration the planner has no model for (it says which, and that the run may still work)."""


# ---------------------------------------------------------------------------------------------------------------
# Cluster shape
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuPreset:
    memory_gib: float  # what torch sees as total device memory
    intra_node_gbps: float  # achievable GB/s per GPU and direction inside a node (NVLink / PCIe)
    inter_node_gbps: float  # achievable GB/s per GPU and direction between nodes (InfiniBand / Ethernet)
    peak_flops_key: str  # its dense bf16 peak in engine.PEAK_BF16_FLOPS, the table the trainer's MFU uses


# Achievable (not nominal) bandwidths of common machines, about 80% of the link rate; pass --intra-node-gbps /
# --inter-node-gbps for yours.
GPU_PRESETS = {
    "h100": GpuPreset(79.6, 360.0, 40.0, "H100"),  # SXM, NVLink4, 8 x 400 Gb/s InfiniBand per node
    "h200": GpuPreset(140.4, 360.0, 40.0, "H200"),
    "a100-80gb": GpuPreset(80.0, 240.0, 20.0, "A100"),  # SXM, NVLink3, 8 x 200 Gb/s InfiniBand per node
    "a100-40gb": GpuPreset(40.0, 240.0, 20.0, "A100"),
    "l40s": GpuPreset(45.0, 25.0, 10.0, "L40S"),  # PCIe Gen4, 100 Gb/s Ethernet per GPU
    "a10g": GpuPreset(22.5, 12.0, 3.0, "A10G"),  # PCIe, 100 Gb/s per 8-GPU node
}


@dataclass(frozen=True)
class ClusterSpec:
    """Build it with `from_preset`; every field can be overridden."""

    nodes: int
    gpus_per_node: int
    gpu: str
    memory_gib: float
    intra_node_gbps: float
    inter_node_gbps: float
    peak_flops: float
    mfu: float = 0.4  # share of peak FLOPs the kernels reach
    headroom: float = 0.1  # memory kept free for the CUDA context, NCCL buffers and fragmentation

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @classmethod
    def from_preset(cls, gpu: str = "h100", nodes: int = 1, gpus_per_node: int = 8, **overrides) -> ClusterSpec:
        """`gpu`: a GPU_PRESETS name, or "auto" for this machine's GPU (its preset, and its real memory)."""
        from .engine import PEAK_BF16_FLOPS

        if gpu == "auto":
            gpu, memory_gib = detect_gpu()
            overrides["memory_gib"] = overrides.get("memory_gib") or memory_gib
        if gpu not in GPU_PRESETS:
            raise ValueError(f"--gpu {gpu!r} is not a preset; use the closest of {sorted(GPU_PRESETS)} and override "
                             "its numbers with --gpu-memory-gib, --intra-node-gbps, --inter-node-gbps, --peak-tflops.")
        p = GPU_PRESETS[gpu]
        values = dict(nodes=nodes, gpus_per_node=gpus_per_node, gpu=gpu, memory_gib=p.memory_gib,
                      intra_node_gbps=p.intra_node_gbps, inter_node_gbps=p.inter_node_gbps,
                      peak_flops=PEAK_BF16_FLOPS[p.peak_flops_key])
        values.update({k: v for k, v in overrides.items() if v is not None})
        spec = cls(**values)
        for name in ("nodes", "gpus_per_node", "memory_gib", "intra_node_gbps", "inter_node_gbps", "peak_flops",
                     "mfu"):
            if getattr(spec, name) <= 0:
                raise ValueError(f"cluster: {name}={getattr(spec, name)} must be > 0.")
        return spec


def detect_gpu() -> tuple[str, float]:
    """(preset name, memory in GiB) of this machine's first GPU; the launch scripts plan with `--gpu auto`."""
    if not torch.cuda.is_available():
        raise ValueError(f"--gpu auto: no GPU visible here; name one of {sorted(GPU_PRESETS)}.")
    name = torch.cuda.get_device_name(0)
    memory_gib = torch.cuda.get_device_properties(0).total_memory / GiB
    for key, preset in (("H200", "h200"), ("H100", "h100"), ("L40S", "l40s"), ("A10G", "a10g"),
                        ("A100", "a100-80gb" if memory_gib > 60 else "a100-40gb")):
        if key in name:
            return preset, memory_gib
    raise ValueError(f"--gpu auto: no preset for {name!r}; pass the closest of {sorted(GPU_PRESETS)} and override "
                     "its numbers (--gpu-memory-gib, --intra-node-gbps, --inter-node-gbps, --peak-tflops).")


# ---------------------------------------------------------------------------------------------------------------
# The recipe's config, composed exactly as recipes/train.py composes it
# ---------------------------------------------------------------------------------------------------------------


def compose_recipe_config(overrides: list[str]) -> tuple[RecipeConfig, dict]:
    """conf/config.yaml + Hydra overrides -> the typed RecipeConfig and the resolved dict (one source of truth)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from .config import CONF_DIR, recipe_config_from_dict

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        hydra_cfg = compose(config_name="config", overrides=list(overrides))
    resolved = OmegaConf.to_container(hydra_cfg, resolve=True)
    return recipe_config_from_dict(resolved), resolved


def planned_precision(cfg: RecipeConfig) -> str:
    """`auto` trains in bf16 on every GPU the presets cover; the planner plans for GPUs."""
    return "bf16" if cfg.trainer.precision == "auto" else cfg.trainer.precision


# ---------------------------------------------------------------------------------------------------------------
# Parameters and optimizer groups, as DeepSpeed will see them on one rank
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptimizerGroup:
    tensor_numels: tuple[int, ...]  # the group's parameters on one rank, in order
    is_expert: bool

    @property
    def numel(self) -> int:
        return sum(self.tensor_numels)


def optimizer_groups(model_config: MoeConfig, weight_decay: float) -> list[OptimizerGroup]:
    """The optimizer groups one rank hands DeepSpeed, from the real model built on the meta device.

    `build_param_groups` is the recipe's own function (no decay on norms, DeepSpeed's expert groups, split at
    DeepSpeed's max group size), so every group, and hence every ZeRO padding, matches the run.
    """
    from transformers.initialization import no_init_weights

    from moe_model import MoeForCausalLM, modeling_moe

    from .engine import build_param_groups

    # The model asks torch.distributed for its EP rank only to pick expert init seeds, which do not exist on meta.
    with mock.patch.object(modeling_moe, "expert_parallel_rank", return_value=0), torch.device("meta"):
        with no_init_weights():
            model = MoeForCausalLM(model_config)
    return [OptimizerGroup(tuple(p.numel() for p in group["params"]), bool(group.get("moe", False)))
            for group in build_param_groups(model, weight_decay)
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


# ---------------------------------------------------------------------------------------------------------------
# Expert capacity and activations
# ---------------------------------------------------------------------------------------------------------------


def expert_capacity(config: MoeConfig, tokens: int, training: bool = True) -> int:
    """C: slots per expert in the [E, C, D] buffers, for `tokens` tokens on one rank (DeepSpeed's `_capacity`).

    DeepSpeed computes ceil(T / E * capacity_factor * k) in float32 and takes the max with min_capacity (which the
    model caps at T). With drop_tokens=false the buffers are sized by the busiest expert instead, at most T: that
    worst case is returned.
    """
    if not config.drop_tokens:
        return tokens
    factor = config.capacity_factor if training else config.eval_capacity_factor
    # The same float32 arithmetic as DeepSpeed, so rounding at the edges agrees.
    capacity = int(torch.ceil((tokens / config.num_experts) * torch.tensor(factor * config.num_experts_per_tok)))
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


def _layer_saved_bytes(c: MoeConfig, B: int, S: int, b: int, capacity: int, is_moe: bool) -> dict[str, int]:
    """What autograd saves in one decoder layer (checked against saved-tensor hooks in tests/unit/test_plan.py)."""
    T, D, Dh = B * S, c.hidden_size, c.head_dim
    H, Hkv = c.num_attention_heads, c.num_key_value_heads
    # RMSNorm: its fp32 input, rsqrt (T), the normalized x in the training dtype, and its output (the next input).
    norm = T * D * (FP32 + 2 * b) + T * FP32
    items = {
        "norms": 2 * norm,
        # SDPA keeps q and k after RoPE, v, its output and the log-sum-exp; RoPE's cos/sin do not need grads.
        "attention": 2 * T * H * Dh * b + 2 * T * Hkv * Dh * b + B * H * S * FP32,
    }
    if not is_moe:
        items["mlp"] = 4 * T * c.intermediate_size * b  # SwiGLU: gate, silu(gate), up, product
        return items
    E, k, F, C = c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size, capacity
    El = E // c.ep_size
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


def activation_memory(c: MoeConfig, micro_batch_size: int, seq_len: int, precision: str) -> ActivationMemory:
    B, S, b = micro_batch_size, seq_len, DTYPE_BYTES[precision]
    T, D, V, L = B * S, c.hidden_size, c.vocab_size, c.num_hidden_layers
    T_loss = B * (S - 1)  # next-token targets
    capacity = expert_capacity(c, T)
    by_kind: dict[str, int] = {}
    layers = [_layer_saved_bytes(c, B, S, b, capacity, c.is_moe_layer(i)) for i in range(L)]
    for items in layers:
        for kind, value in items.items():
            by_kind[kind] = by_kind.get(kind, 0) + value
    largest_layer = max(sum(items.values()) for items in layers)
    by_kind["embedding and rope"] = T * 8 + 2 * B * S * c.head_dim * b  # token ids; cos and sin
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
    alive = 2 * B * S * c.head_dim * b + moe_layers * T * c.num_experts * FP32
    kept = saved_checkpointed - by_kind["log-softmax"] + alive
    peak_checkpointed = max(saved_checkpointed + alive + logits + loss_backward, kept + logits + 2 * largest_layer)
    return ActivationMemory(
        saved=saved, saved_by_kind=by_kind, saved_checkpointed=saved_checkpointed,
        expert_buffers=by_kind.get("expert buffers", 0), largest_layer=largest_layer, logits=logits,
        loss_backward=loss_backward, peak=peak, peak_checkpointed=peak_checkpointed,
    )


# ---------------------------------------------------------------------------------------------------------------
# Communication
# ---------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------------------


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
    fixes: list[list[str]] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.usable_bytes

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["fits"] = self.fits
        for key in ("params", "grads", "master_weights", "optimizer_states", "num_params"):
            out["memory"][key]["total"] = getattr(self.memory, key).total
        out["memory"]["device_total"] = self.memory.device_total
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
               overrides: list[str] | None = None, with_fixes: bool = True) -> Plan:
    """Validate `cfg` for this cluster (ValueError if invalid) and estimate memory, communication and time."""
    from .config import global_batch_size, validate
    from .engine import flops_per_token

    world = cluster.world_size
    c = validate(cfg, world, tokenizer_vocab_size=tokenizer_vocab_size)
    if c.moe_backend != "deepspeed":
        raise NotModeledError(
            f"model.moe_backend={c.moe_backend!r}: the planner models DeepSpeed's native MoE layer (capacity-padded "
            "[E, C, D] buffers, ZeRO 0-2); AutoEP's dropless layer and ZeRO-3 are not modeled, so no plan is made.")
    precision = planned_precision(cfg)
    t, z = cfg.trainer, cfg.zero
    G = cfg.parallel.ep_size
    groups = optimizer_groups(c, cfg.optim.weight_decay)
    memory = state_memory(groups, z.stage, precision, world, G, offload_optimizer=z.offload_optimizer,
                          reduce_bucket_size=z.reduce_bucket_size, overlap_comm=z.overlap_comm)
    act = activation_memory(c, t.micro_batch_size, cfg.data.seq_len, precision)
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
        memory=memory, activations=act, comm=comm, peak_bytes=peak, peak_bytes_other=peak_other,
        usable_bytes=int(cluster.memory_gib * GiB * (1 - cluster.headroom)), compute_seconds=compute_seconds,
        step_seconds=step_seconds, tokens_per_second=tokens_per_step / step_seconds,
    )
    plan.warnings = layout_warnings(cfg, c, plan, cluster)
    if with_fixes and not plan.fits:
        plan.fixes = find_fixes(cfg, cluster, tokenizer_vocab_size)
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
    if cfg.trainer.precision == "auto":
        warnings.append("trainer.precision=auto is planned as bf16 (what the recipe picks on these GPUs).")
    return warnings


# Changes tried, in order of what they cost in throughput, when a layout does not fit.
def _candidate_changes(cfg: RecipeConfig, cluster: ClusterSpec, c: MoeConfig) -> list[tuple[list[str], dict]]:
    t, z = cfg.trainer, cfg.zero
    changes = []
    if z.stage < 2:
        changes.append((["zero.stage=2"], {"zero": {"stage": 2}}))
    if not t.activation_checkpointing:
        changes.append((["trainer.activation_checkpointing=true"], {"trainer": {"activation_checkpointing": True}}))
    larger_ep = [d for d in range(cfg.parallel.ep_size + 1, c.num_experts + 1)
                 if c.num_experts % d == 0 and cluster.world_size % d == 0]
    for ep in larger_ep[:2]:
        changes.append(([f"parallel.ep_size={ep}"], {"parallel": {"ep_size": ep}}))
    if t.micro_batch_size > 1:
        mb = t.micro_batch_size // 2
        ga = t.grad_accum * t.micro_batch_size // mb if t.micro_batch_size % mb == 0 else t.grad_accum * 2
        changes.append(([f"trainer.micro_batch_size={mb}", f"trainer.grad_accum={ga}"],
                        {"trainer": {"micro_batch_size": mb, "grad_accum": ga}}))
    if not z.offload_optimizer:
        changes.append((["zero.stage=2", "zero.offload_optimizer=true"],
                        {"zero": {"stage": 2, "offload_optimizer": True}}))
    return changes


def _apply(cfg: RecipeConfig, change: dict) -> RecipeConfig:
    return dataclasses.replace(cfg, **{
        section: dataclasses.replace(getattr(cfg, section), **values) for section, values in change.items()})


def find_fixes(cfg: RecipeConfig, cluster: ClusterSpec, tokenizer_vocab_size: int | None) -> list[list[str]]:
    """Overrides that make the layout fit: each single change that does, else changes stacked in order."""
    c = cfg.model_config()
    candidates = _candidate_changes(cfg, cluster, c)

    def fits(candidate: RecipeConfig) -> bool:
        try:
            return build_plan(candidate, cluster, tokenizer_vocab_size, with_fixes=False).fits
        except (ValueError, NotModeledError):
            return False

    singles = [overrides for overrides, change in candidates if fits(_apply(cfg, change))]
    if singles:
        return singles[:3]
    stacked, overrides = cfg, []
    for extra, change in candidates:
        stacked = _apply(stacked, change)
        overrides = [o for o in overrides if o.split("=")[0] not in {e.split("=")[0] for e in extra}] + extra
        if fits(stacked):
            return [overrides]
    return []


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


def _size(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def format_plan(p: Plan) -> str:
    m, a, comm, cl = p.memory, p.activations, p.comm, p.cluster

    def row(label: str, total: float, dense: float | None = None, expert: float | None = None) -> str:
        split = f"{_size(dense):>12}{_size(expert):>12}" if dense is not None else " " * 24
        return f"  {label:<44}{split}{_size(total):>12}"

    lines = [
        f"Cluster: {cl.nodes} node(s) x {cl.gpus_per_node} {cl.gpu} = {p.world_size} GPUs, {cl.memory_gib:g} GiB each; "
        f"NVLink/PCIe {cl.intra_node_gbps:g} GB/s, network {cl.inter_node_gbps:g} GB/s per GPU",
        f"Layout: EP {p.ep_size} x expert-DP {p.expert_dp_size}; dense DP {p.world_size}; ZeRO {p.zero_stage}"
        f"{' + offload' if p.offload_optimizer else ''}; {p.precision}; micro-batch {p.micro_batch_size} x "
        f"{p.seq_len} tokens, grad_accum {p.grad_accum}, global batch {p.global_batch_size} sequences",
        f"Parameters: {p.total_params / 1e9:.3f} B total, {m.num_params.dense / 1e9:.3f} B dense (on every GPU), "
        f"{p.expert_params_total / 1e9:.3f} B in experts ({m.num_params.expert / 1e9:.3f} B per GPU)",
        "",
        f"Memory per GPU{'':<32}{'dense':>12}{'expert':>12}{'total':>12}",
    ]
    for label, split in (("parameters", m.params), ("gradients", m.grads), ("fp32 master weights", m.master_weights),
                         ("optimizer states (Adam m, v)", m.optimizer_states)):
        lines.append(row(label, split.total, split.dense, split.expert))
    if m.grad_buckets:
        lines.append(row("ZeRO gradient buckets", m.grad_buckets))
    if m.host:
        lines.append(row("host memory (offloaded optimizer)", m.host))
    if m.step_transient:
        lines.append(row("extra inside optimizer.step()", m.step_transient))
    other = "off" if p.activation_checkpointing else "on"
    lines += [
        row("activations, checkpointing off", a.saved),
        row(f"  of which expert buffers (E x C, C={comm.capacity})", a.expert_buffers),
        row("activations, checkpointing on", a.saved_checkpointed),
        row("logits and loss backward", a.logits + a.loss_backward),
        row(f"estimated peak (checkpointing {'on' if p.activation_checkpointing else 'off'})", p.peak_bytes)
        + f"  of {p.usable_bytes / GiB:.1f} GiB usable: {'fits' if p.fits else 'DOES NOT FIT'}",
        row(f"estimated peak (checkpointing {other})", p.peak_bytes_other),
        "",
        "Communication per step per GPU (bytes handed to the collectives)",
    ]
    if p.ep_size > 1:
        moe_layers = comm.all_to_all_total // max(comm.all_to_all_per_moe_layer, 1)
        lines += [
            f"  all-to-all buffer E x C x D x b = {comm.all_to_all_buffer:,} B ({_size(comm.all_to_all_buffer)}); "
            f"{comm.all_to_all_calls_per_moe_layer} calls per MoE layer per micro-batch "
            f"(dispatch + combine, forward + backward{' + recompute' if p.activation_checkpointing else ''})",
            f"  all-to-all per MoE layer: {_size(comm.all_to_all_per_moe_layer)}; "
            f"all {moe_layers} MoE layers: {_size(comm.all_to_all_total)}, "
            f"of which {_size(comm.all_to_all_sent)} leaves the GPU "
            f"({comm.ep_peers_same_node} EP peers on this node, {comm.ep_peers_other_nodes} on others)",
        ]
    else:
        lines.append("  all-to-all: none (ep_size=1)")
    expert_reduction = (f"experts {_size(comm.expert_grad_reduction)} over {p.expert_dp_size} ranks"
                        if p.expert_dp_size > 1 else "experts none (expert-DP 1)")
    lines += [
        f"  gradient reduction: dense {_size(comm.dense_grad_reduction)} over {p.world_size} ranks, {expert_reduction}",
        "",
        f"Step time estimate (no overlap, {cl.mfu:.0%} of {cl.peak_flops / 1e12:.0f} TFLOP/s): compute "
        f"{p.compute_seconds * 1e3:.1f} ms + all-to-all {comm.all_to_all_seconds * 1e3:.1f} ms + gradient reduction "
        f"{comm.grad_reduction_seconds * 1e3:.1f} ms = {p.step_seconds * 1e3:.1f} ms; "
        f"{p.tokens_per_second:,.0f} tokens/s",
    ]
    lines += [f"warning: {warning}" for warning in p.warnings]
    if not p.fits:
        lines.append(f"\nDOES NOT FIT: estimated peak {p.peak_bytes / GiB:.1f} GiB > {p.usable_bytes / GiB:.1f} GiB "
                     f"usable ({cl.memory_gib:g} GiB minus {cl.headroom:.0%} headroom).")
        if p.fixes:
            lines.append("Fix: add one of these overrides:")
            lines += [f"  {' '.join(fix)}" for fix in p.fixes]
        else:
            lines.append("No change tried here fits: use more GPUs, a smaller model or a shorter sequence.")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="moe-plan", description="Memory, communication and step time per GPU for a recipe config, before a run.",
        epilog="Exit status: 0 fits, 1 does not fit, 2 invalid configuration, 3 valid but not modeled (AutoEP).")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for recipes/train.py (model=small ...)")
    cluster = parser.add_argument_group("cluster")
    cluster.add_argument("--nodes", type=int, default=1)
    cluster.add_argument("--gpus-per-node", type=int, default=8)
    cluster.add_argument("--gpu", default="h100", help=f"preset: {', '.join(GPU_PRESETS)}, or auto (this machine's)")
    cluster.add_argument("--gpu-memory-gib", type=float, help="overrides the preset")
    cluster.add_argument("--intra-node-gbps", type=float, help="GB/s per GPU and direction inside a node")
    cluster.add_argument("--inter-node-gbps", type=float, help="GB/s per GPU and direction between nodes")
    cluster.add_argument("--peak-tflops", type=float, help="dense bf16 TFLOP/s per GPU")
    cluster.add_argument("--mfu", type=float, help="share of peak FLOPs reached (default 0.4)")
    cluster.add_argument("--headroom", type=float, help="share of GPU memory kept free (default 0.1)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        # DeepSpeed logs to stdout (on import, and later): keep stdout for the report or the JSON document alone.
        with contextlib.redirect_stdout(sys.stderr):
            cluster = ClusterSpec.from_preset(
                args.gpu, nodes=args.nodes, gpus_per_node=args.gpus_per_node, memory_gib=args.gpu_memory_gib,
                intra_node_gbps=args.intra_node_gbps, inter_node_gbps=args.inter_node_gbps,
                peak_flops=args.peak_tflops * 1e12 if args.peak_tflops else None, mfu=args.mfu,
                headroom=args.headroom)
            cfg, _ = compose_recipe_config(args.overrides)
            plan = build_plan(cfg, cluster, tokenizer_vocab_size(cfg), overrides=args.overrides)
    except ValueError as err:
        if args.json:
            print(json.dumps({"valid": False, "error": str(err)}))
        print(f"Invalid configuration: {err}", file=sys.stderr)
        return EXIT_INVALID
    except NotModeledError as err:
        if args.json:
            print(json.dumps({"valid": True, "modeled": False, "error": str(err)}))
        print(f"No plan: {err}", file=sys.stderr)
        return EXIT_NOT_MODELED
    if args.json:
        print(json.dumps({"valid": True, **plan.to_dict()}, indent=2))
    else:
        print(format_plan(plan))
    return EXIT_FITS if plan.fits else EXIT_DOES_NOT_FIT


def tokenizer_vocab_size(cfg: RecipeConfig) -> int | None:
    """The tokenizer's size for validate()'s vocab check, as train.py does; None (check skipped) if it is absent."""
    from .data import resolve_path

    if not (resolve_path(cfg.data.tokenizer) / "tokenizer.json").is_file():
        return None
    from .data import load_tokenizer

    return len(load_tokenizer(cfg.data))


__all__ = ["ClusterSpec", "GPU_PRESETS", "Plan", "build_plan", "compose_recipe_config", "expert_capacity",
           "main", "optimizer_groups", "state_memory", "activation_memory", "zero_flat_numel"]

if __name__ == "__main__":
    sys.exit(main())
