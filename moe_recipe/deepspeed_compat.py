"""Every private DeepSpeed and torch API the recipe uses, in one place: the file to re-read when upgrading either.

Written against deepspeed 0.19.8 and torch 2.13. Each wrapper names what it reaches into and why no public API does
the job. (moe_model keeps the hooks DeepSpeed itself calls on the model, such as `MoeGate._set_ep_group`: the model
package does not import the recipe.)
"""

from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.runtime.base_optimizer import DeepSpeedOptimizer
from deepspeed.utils import groups
from torch.utils.cpp_extension import _get_build_directory


def expert_parallel_group(group_name: str) -> dist.ProcessGroup:
    """The expert-parallel process group DeepSpeed created at `deepspeed.initialize` for the MoE layers named
    `group_name` (`MoE.expert_group_name`, e.g. "ep_size_2").

    deepspeed 0.19.8 has no public getter for it (`groups._get_expert_parallel_group`); the recipe's own gradient
    clipping sums the experts' squared norms over it.
    """
    return groups._get_expert_parallel_group(group_name)


def rank_in_expert_parallel_group(group_name: str) -> int:
    """This rank's place in its expert-parallel group for `group_name`: which slice of the experts it holds.

    deepspeed 0.19.8: `groups._get_expert_parallel_rank`, no public equivalent; the layout-independent checkpoint
    names local experts by it, and the engine checks that the model was built for the place DeepSpeed gave the rank.
    """
    return groups._get_expert_parallel_rank(group_name)


def rank_in_expert_data_parallel_group(group_name: str) -> int:
    """This rank's place in its expert-data-parallel group for `group_name` (the ranks holding the same experts).

    deepspeed 0.19.8: `groups._get_expert_data_parallel_rank`, no public equivalent; rank 0 of that group writes the
    experts' layout-independent checkpoint files.
    """
    return groups._get_expert_data_parallel_rank(group_name)


def links_fp32_partitions(optimizer: DeepSpeedOptimizer | torch.optim.Optimizer) -> bool:
    """Whether DeepSpeed's optimizer wrapper maps each parameter to its fp32 partition and optimizer-state fragments
    (`param._hp_mapping`), which `deepspeed.utils.safe_get_full_*` / `safe_set_full_*` read and write.

    deepspeed 0.19.8: ZeRO-1/2 (`DeepSpeedZeroOptimizer`) and `BF16_Optimizer` do, and are recognised by the private
    `_lazy_init_hp_params_optimizer_state` they share (no common public base or flag says so).
    """
    return hasattr(optimizer, "_lazy_init_hp_params_optimizer_state")


def relink_fp32_partitions(optimizer: DeepSpeedOptimizer) -> None:
    """Point every parameter's view of the optimizer state (`_hp_mapping.optim_fragment`) at the current state.

    A workaround for deepspeed 0.19.8 (`_hp_optimizer_states_linked`, `_lazy_init_hp_params_optimizer_state`): ZeRO
    links the views once, right after stepping the *first* param group, when the other groups -- the no-decay and all
    expert groups -- have no state yet, so their views stay empty and `safe_get_full_optimizer_state` fails on them.
    A native checkpoint load also replaces the state tensors the views point into. Call on a wrapper for which
    `links_fp32_partitions` holds.
    """
    optimizer._hp_optimizer_states_linked = False
    optimizer._lazy_init_hp_params_optimizer_state()


def has_fp32_partition(param: torch.nn.Parameter) -> bool:
    """Whether ZeRO-1/2 or BF16_Optimizer keeps this parameter's fp32 master weight in a partition (deepspeed 0.19.8
    sets the private `param._hp_mapping` then; `safe_get_full_fp32_param` needs it but does not say whether it is
    there)."""
    return hasattr(param, "_hp_mapping")


def own_persistent_buffers(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(attribute, tensor) of the buffers registered on `module` itself (not its children) that its state dict holds.

    torch 2.13: `nn.Module._buffers` and `_non_persistent_buffers_set`; `named_buffers` lists the non-persistent
    buffers too and has no flag for persistence.
    """
    return [(name, tensor) for name, tensor in module._buffers.items()
            if tensor is not None and name not in module._non_persistent_buffers_set]


def torch_extension_build_lock(op_name: str) -> Path:
    """The lock file torch holds while it JIT-builds the op `op_name`, which every later load waits on:
    `<TORCH_EXTENSIONS_DIR or the default root>/<python>_<device>/<op_name>/lock`.

    torch 2.13: the folder is the private `torch.utils.cpp_extension._get_build_directory` (it creates it), the file
    name is what `_jit_compile` hands its `FileBaton`; no public API exposes either.
    """
    return Path(_get_build_directory(op_name, verbose=False)) / "lock"


__all__ = [
    "expert_parallel_group",
    "has_fp32_partition",
    "links_fp32_partitions",
    "own_persistent_buffers",
    "rank_in_expert_data_parallel_group",
    "rank_in_expert_parallel_group",
    "relink_fp32_partitions",
    "torch_extension_build_lock",
]
