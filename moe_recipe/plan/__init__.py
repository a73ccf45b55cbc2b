"""Pre-flight planner: memory, communication and step time per GPU, before a job starts.

    moe-plan +experiment=small_ep8 --nodes 1 --gpus-per-node 8 --gpu h100
    python -m moe_recipe.plan model=mixtral_8x7b parallel.ep_size=8 zero=stage2 --nodes 4 --gpu h100 --json

It takes the recipe's own Hydra config and overrides (composed, typed and validated by `recipe.load_recipe`, as recipes/train.py does)
plus a cluster shape, and estimates per GPU: parameter, gradient, fp32 master and optimizer-state bytes under the
ZeRO stage and the EP / expert-data-parallel groups (from the real model's optimizer groups, as DeepSpeed allocates
them); activation memory with and without checkpointing; all-to-all and gradient-reduction bytes; a step time.
The formulas, and how each number is checked, are in docs/planner.md.

    hardware.py       GPU presets (memory, links; the bf16 peak is moe_recipe/flops.py's) and the cluster shape
    memory.py         parameters, gradients, master weights and optimizer states per rank per ZeRO stage
    activations.py    expert capacity and the activations autograd saves
    communication.py  all-to-all and gradient-reduction bytes and time
    build.py          the plan: all of the above for one layout, its peak memory and step time
    search.py         fixes for a layout that does not fit
    report.py, cli.py the text report and the `moe-plan` command

Shape legend: B micro batch, S seq_len, T = B * S tokens per rank per micro-batch, D hidden size, F expert intermediate
size, E experts, El = E / G local experts, G ep_size, C capacity per expert, k experts per token, V vocab, H / Hkv / Dh
attention heads / key-value heads / head dim, b bytes per element of the training dtype.
"""

# The model and the engine (hence DeepSpeed) are imported inside the functions that use them: DeepSpeed logs to
# stdout when first imported, and `--json` must leave nothing but the JSON document there (see cli.main).
from .activations import ActivationMemory, activation_memory, expert_capacity
from .build import NotModeledError, Plan, build_plan, planned_precision
from .cli import (
    EXIT_DOES_NOT_FIT,
    EXIT_FITS,
    EXIT_INVALID,
    EXIT_NOT_MODELED,
    EXIT_USAGE,
    main,
)
from .communication import Communication, communication
from .hardware import GPU_PRESETS, ClusterSpec, GpuPreset
from .memory import (
    DTYPE_BYTES,
    OptimizerGroup,
    StateMemory,
    build_rank_model,
    optimizer_groups,
    state_memory,
    zero2_grad_numel,
    zero_flat_numel,
)
from .report import format_bytes, format_count, format_plan
from .search import find_fixes

__all__ = [
    "DTYPE_BYTES", "EXIT_DOES_NOT_FIT", "EXIT_FITS", "EXIT_INVALID", "EXIT_NOT_MODELED", "EXIT_USAGE", "GPU_PRESETS",
    "ActivationMemory", "ClusterSpec", "Communication", "GpuPreset", "NotModeledError", "OptimizerGroup", "Plan",
    "StateMemory", "activation_memory", "build_plan", "build_rank_model", "communication",
    "expert_capacity", "find_fixes", "format_bytes", "format_count", "format_plan", "main",
    "optimizer_groups", "planned_precision", "state_memory", "zero2_grad_numel",
    "zero_flat_numel",
]
