"""DeepSpeed wiring in one place: the DeepSpeed config, MoE optimizer groups, the engine."""

import fcntl
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer
from torch import nn

from moe_model import MoeConfig, MoeForCausalLM
from moe_model.moe_blocks import autoep_layer_settings

from .config import RecipeConfig, global_batch_size
from .deepspeed_compat import expert_parallel_group, rank_in_expert_parallel_group, torch_extension_build_lock
from .lr_schedule import build_lr_scheduler


def resolve_precision(precision: str) -> str:
    if precision != "auto":
        return precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def check_precision_supported(precision: str) -> None:
    """DeepSpeed refuses a dtype the device lacks only when the engine is built, without naming the setting."""
    accelerator = get_accelerator()
    supported = {"bf16": accelerator.is_bf16_supported, "fp16": accelerator.is_fp16_supported}
    if precision in supported and not supported[precision]():
        raise ValueError(f"trainer.precision={precision}: this machine's {accelerator.device_name()} device cannot "
                         f"train in {precision}; use trainer.precision=auto (bf16 where the device has it, else "
                         "fp32) or trainer.precision=fp32.")


def build_deepspeed_config(cfg: RecipeConfig, model: MoeConfig, world_size: int) -> dict:
    """The DeepSpeed config, derived from the recipe config (never written by hand); `load_recipe` builds it."""
    t, z, o = cfg.trainer, cfg.zero, cfg.optim
    precision = resolve_precision(t.precision)
    zero = {"stage": z.stage}
    if z.stage > 0:
        zero.update(overlap_comm=z.overlap_comm, contiguous_gradients=True, reduce_bucket_size=z.reduce_bucket_size,
                    allgather_bucket_size=z.reduce_bucket_size)
    if z.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    ds_config = {
        "train_batch_size": global_batch_size(t, world_size),
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": 0.0 if recipe_clips_gradients(cfg, precision) else o.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        # The recipe hands DeepSpeed a torch AdamW (fused on GPU); ZeRO accepts it, offload runs its step on CPU.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if model.moe_backend == "autoep":
        ds_config["expert_parallel"] = {
            "enabled": True,
            "autoep_size": cfg.parallel.ep_size,
            # torch's grouped GEMM runs on CPU and in bf16 on CUDA; other CUDA dtypes take AutoEP's expert loop.
            "use_grouped_mm": precision == "bf16" or not torch.cuda.is_available(),
            **autoep_layer_settings(model),
        }
    return ds_config


def recipe_clips_gradients(cfg: RecipeConfig, precision: str) -> bool:
    """Whether the recipe clips the gradients itself (`clip_grad_norm`) instead of DeepSpeed: at ZeRO stage 0 in
    fp32, where DeepSpeed 0.19.8 clips with runtime.utils.clip_grad_norm_, which averages the ranks' norms (each
    over its own experts only) instead of adding the experts' squared norms, so the clip factor depends on ep_size.
    The ZeRO optimizers and the bf16 one compute the whole gradient's norm themselves."""
    return cfg.zero.stage == 0 and precision == "fp32" and cfg.optim.grad_clip > 0


def recipe_grad_clip(cfg: RecipeConfig) -> float | None:
    """The norm the recipe clips to itself (the training step's `recipe_grad_clip`), or None where DeepSpeed clips."""
    return cfg.optim.grad_clip if recipe_clips_gradients(cfg, resolve_precision(cfg.trainer.precision)) else None


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Collective, at the accumulation boundary after the gradients are reduced (after `engine.backward` of the
    last micro step, before `engine.step`): scale every gradient by min(1, max_norm / (norm + 1e-6)), DeepSpeed's
    rule, with the norm of the whole model's gradient: dense gradients (the same on every rank) once, each expert's
    once (summed over its expert-parallel group, where the experts are split). Returns that norm."""
    dense_sq = torch.zeros((), device=get_accelerator().current_device_name())
    expert_sq = {}  # expert-parallel group name -> this rank's experts' squared norm
    grads = [p for p in model.parameters() if p.grad is not None]
    for param in grads:
        square = param.grad.detach().float().norm().square()
        if is_moe_param(param):
            expert_sq[param.group_name] = expert_sq.get(param.group_name, 0) + square
        else:
            dense_sq += square
    for group_name, square in sorted(expert_sq.items()):
        dist.all_reduce(square, group=expert_parallel_group(group_name))
        dense_sq += square
    norm = dense_sq.sqrt()
    clip_coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for param in grads:
        param.grad.mul_(clip_coef.to(param.grad.dtype))
    return norm.item()


def build_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups without weight decay on norms and biases, split again into DeepSpeed's expert groups.

    Expert parameters must sit in their own `moe` groups so DeepSpeed reduces their gradients over the
    expert-data-parallel group only (and ZeRO partitions them there).
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    return split_params_into_different_moe_groups_for_optimizer(groups)


def build_optimizer(model: nn.Module, cfg: RecipeConfig) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = build_param_groups(model, o.weight_decay)
    fused = get_accelerator().device_name() == "cuda" and not cfg.zero.offload_optimizer
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, fused=fused or None)


# On CPU, deepspeed.init_distributed loads this op, which torch JIT-builds on first use (scripts/setup_venv.sh builds
# it beforehand, through check_op_build_lock).
SHM_COMM_OP = "deepspeed_shm_comm"
# Beside torch's lock in the op's build folder: flocked by the process that loads the op, which writes its host and
# pid in it and empties it once the op is loaded.
RECIPE_LOCK = "moe_recipe.lock"


def load_shm_comm_op() -> None:
    """Load (on first use: build) DeepSpeed's CPU comm op; DeepSpeed keeps the module, so that
    deepspeed.init_distributed finds it loaded."""
    get_accelerator().create_op_builder("ShareMemCommBuilder").load(verbose=False)


def use_environment_extensions_dir() -> None:
    """Build DeepSpeed's CPU op inside the virtual environment (`<venv>/torch_extensions`) unless TORCH_EXTENSIONS_DIR
    says otherwise. torch's default folder (~/.cache/torch_extensions) is shared by every environment of the user, and
    torch rebuilds the op there, without a word, whenever the build it finds came from another environment (other
    include paths): two clones of this recipe would rebuild it for each other in turn, 2 minutes each time."""
    if sys.prefix != sys.base_prefix:
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


def check_op_build_lock(stale_after_s: float = 300.0) -> None:
    """Load DeepSpeed's CPU comm op under the recipe's own lock, after clearing a build lock a killed run left, and
    say so before a build starts (about 2 minutes on 2 cores, silent otherwise). Call before
    deepspeed.init_distributed.

    torch builds an op holding a lock file in its build folder (`deepspeed_compat.torch_extension_build_lock`), a
    plain file that every later load waits on, without a word, until it disappears: a killed build leaves it for
    good. So the recipe loads the op holding an flock on `RECIPE_LOCK` beside it (the kernel releases an flock when
    its holder dies) with its host and pid written in the file. Whoever gets the flock and finds torch's lock next
    to a holder recorded on this host knows that holder died while loading: the lock is stale, and is removed with
    one line that says so. Another rank of the node loading at the same time waits for the flock, then finds the op
    built. A torch lock without a recorded holder is another program's (a bare DeepSpeed run): it is waited for,
    and called stale when nothing has been written in the build folder for `stale_after_s`.
    """
    if get_accelerator().device_name() != "cpu":
        return
    use_environment_extensions_dir()
    lock = torch_extension_build_lock(SHM_COMM_OP)
    build_dir = lock.parent
    host = socket.gethostname()
    with (build_dir / RECIPE_LOCK).open("a+") as recipe_lock:
        fcntl.flock(recipe_lock, fcntl.LOCK_EX)  # released when this process exits, however it exits
        recipe_lock.seek(0)
        holder = recipe_lock.read().split()
        if lock.exists() and len(holder) == 2 and holder[0] == host:
            lock.unlink(missing_ok=True)
            print(f"removed {lock}: process {holder[1]} on this host was killed while it built or loaded DeepSpeed's "
                  f"{SHM_COMM_OP} op; loading it again", file=sys.stderr, flush=True)
        _wait_for_foreign_build(lock, stale_after_s)
        recipe_lock.truncate(0)
        recipe_lock.write(f"{host} {os.getpid()}\n")
        recipe_lock.flush()
        if not (build_dir / f"{SHM_COMM_OP}.so").is_file():
            print(f"building DeepSpeed's CPU comm op {SHM_COMM_OP} in {build_dir} (first run with this "
                  "TORCH_EXTENSIONS_DIR only; about 2 minutes on 2 cores)...", file=sys.stderr, flush=True)
        try:
            load_shm_comm_op()
        finally:  # a failed build releases torch's lock too; only a killed process leaves its record
            recipe_lock.truncate(0)


def _wait_for_foreign_build(lock: Path, stale_after_s: float) -> None:
    """Wait while a program that does not take RECIPE_LOCK holds torch's lock; stop with a message once the build
    folder has been idle for `stale_after_s` (a live build writes there, ninja's log and object files, every few
    tens of seconds)."""
    build_dir = lock.parent
    waited_s = 0.0
    while lock.exists():
        try:
            last_write = max(path.stat().st_mtime for path in build_dir.iterdir() if path.name != RECIPE_LOCK)
        except (FileNotFoundError, ValueError):  # a file, or the lock itself, went away while we looked
            continue
        idle_s = time.time() - last_write
        if idle_s > stale_after_s:
            raise RuntimeError(f"{lock} is left over from a build of DeepSpeed's {SHM_COMM_OP} op that did not "
                               f"finish (nothing written in {build_dir} for {idle_s / 60:.0f} minutes); every run "
                               f"would wait for it forever. Remove it (rm {lock}) and start again.")
        if waited_s == 10.0:
            print(f"waiting for {lock}: another program is building DeepSpeed's {SHM_COMM_OP} op (if none is, the "
                  f"lock is stale; this run stops once nothing has been written there for {stale_after_s:.0f} s)",
                  file=sys.stderr, flush=True)
        time.sleep(1.0)
        waited_s += 1.0


def expert_parallel_rank(rank: int, ep_size: int) -> int:
    """A global rank's place in its expert-parallel group under DeepSpeed's layout, where consecutive ranks form a
    group: ranks [0, ep_size) the first, [ep_size, 2 ep_size) the next (`groups._create_expert_and_data_parallel`)."""
    return rank % ep_size


def build_model(config: MoeConfig, ep_size: int) -> MoeForCausalLM:
    """This rank's model: its share of the experts at `ep_size`, the same weights per global expert for any layout
    when the global seed is the same on every rank (set it before)."""
    return MoeForCausalLM(config, ep_size=ep_size, ep_rank=expert_parallel_rank(dist.get_rank(), ep_size))


def initialize_engine(model: MoeForCausalLM, cfg: RecipeConfig, ds_config: dict, total_steps: int):
    """Wrap the model in a DeepSpeed engine (EP and expert-DP groups are created here, from the MoE layers)."""
    import deepspeed
    from deepspeed.moe.layer import MoE

    # A callable: DeepSpeed builds the optimizer once AutoEP (if enabled) has replaced the MoE blocks, so the groups
    # hold AutoEP's expert parameters, tagged for their expert-parallel group, and never the discarded ones.
    # The scheduler, also a callable, gets that optimizer; DeepSpeed steps it after each optimizer step.
    o = cfg.optim
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=lambda _: build_optimizer(model, cfg),
        lr_scheduler=lambda optimizer: build_lr_scheduler(
            optimizer, schedule=o.schedule, total_steps=total_steps, warmup_steps=o.warmup_steps,
            min_lr_ratio=o.min_lr_ratio, decay_fraction=o.decay_fraction),
        config=ds_config,
    )
    for layer in (m for m in model.modules() if isinstance(m, MoE)):
        assert rank_in_expert_parallel_group(layer.expert_group_name) == model.ep_rank, \
            "the model was built for another place in the expert-parallel group than DeepSpeed gave this rank"
    return engine
