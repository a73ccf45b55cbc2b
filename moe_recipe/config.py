"""Typed recipe configuration: Hydra stops at the entry point, everything below gets these dataclasses."""

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_model import MoeConfig
from moe_model.configuration_moe import backends_with

from .data import DataConfig
from .lr_schedule import SCHEDULES, decay_steps

# The Hydra config groups. An absolute path: `python recipes/train.py`, the installed `moe-train` and `moe-plan`
# all compose the same conf/.
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
WANDB_MODES = ("disabled", "offline", "online")


@dataclass
class ParallelConfig:
    ep_size: int = 1  # experts are split over ep_size ranks; the data-parallel size is world_size // ep_size


@dataclass
class ZeroConfig:
    stage: int = 0
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer states and step on the CPU (stage >= 1)
    overlap_comm: bool = False
    reduce_bucket_size: int = 50_000_000


@dataclass
class OptimConfig:
    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1  # not applied to norms and biases
    warmup_steps: int = 20  # linear warmup: step s of the first warmup_steps trains at lr * s / warmup_steps
    min_lr_ratio: float = 0.1  # the last step trains at lr * min_lr_ratio
    grad_clip: float = 1.0  # 0 disables clipping
    schedule: str = "cosine"  # cosine: decay from the end of warmup; wsd: constant, then decay at the end
    decay_fraction: float = 0.1  # wsd only: the share of the steps over which the lr decays (linearly)


@dataclass
class TrainerConfig:
    micro_batch_size: int = 4
    grad_accum: int = 1
    max_steps: int = 200
    token_budget: int | None = None  # if set, max_steps = ceil(token_budget / tokens per step)
    stop_after_steps: int | None = None  # end this job after that many steps (checkpointed); the schedule spans max_steps
    precision: str = "auto"  # auto: bf16 where the device supports it, else fp32
    activation_checkpointing: bool = False
    eval_interval: int = 50
    eval_batches: int = 4
    checkpoint_interval: int = 100
    log_interval: int = 10
    seed: int = 0
    run_dir: str = "runs/default"
    resume: str = "auto"  # auto: continue from run_dir's latest checkpoint if any; none: start fresh; or a path
    peak_flops_per_device: float | None = None  # for MFU; guessed from the GPU name when unset
    heatmap_interval: int | None = 100  # expert-load heatmap every N steps (run_dir/routing, W&B image); None: off


@dataclass
class LoggingConfig:
    wandb_mode: str = "disabled"
    project: str = "moe-recipe"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class RecipeConfig:
    model: dict[str, Any]
    parallel: ParallelConfig
    zero: ZeroConfig
    optim: OptimConfig
    data: DataConfig
    trainer: TrainerConfig
    logging: LoggingConfig
    name: str = "default"

    def model_config(self, **overrides) -> MoeConfig:
        return MoeConfig(**{**self.model, **overrides})


def _section(cls, values: dict[str, Any], name: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{name}: unknown key(s) {unknown}; valid keys are {sorted(known)}.")
    return cls(**values)


def recipe_config_from_dict(cfg: dict[str, Any]) -> RecipeConfig:
    """Build the typed config from Hydra's resolved container (OmegaConf.to_container(cfg, resolve=True))."""
    sections = {
        "parallel": ParallelConfig,
        "zero": ZeroConfig,
        "optim": OptimConfig,
        "data": DataConfig,
        "trainer": TrainerConfig,
        "logging": LoggingConfig,
    }
    missing = sorted({"model", *sections} - set(cfg))
    if missing:
        raise ValueError(f"config is missing section(s) {missing}.")
    built = {name: _section(cls, dict(cfg[name] or {}), name) for name, cls in sections.items()}
    if isinstance(built["optim"].betas, list):
        built["optim"].betas = tuple(built["optim"].betas)
    return RecipeConfig(model=dict(cfg["model"]), name=str(cfg.get("name", "default")), **built)


def world_size_from_env() -> int:
    """The world size the launcher (torchrun, deepspeed, srun wrapper) announces, before any process group."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def global_batch_size(trainer: TrainerConfig, world_size: int) -> int:
    """Sequences per optimizer step: the one place train_batch_size is computed."""
    return trainer.micro_batch_size * trainer.grad_accum * world_size


def validate(cfg: RecipeConfig, world_size: int, tokenizer_vocab_size: int | None = None) -> MoeConfig:
    """Check every cross-section rule; raise one ValueError that says what to change. Returns the model config."""
    model = cfg.model_config()  # MoeConfig.validate: top-k, heads, layers, ...
    ep = cfg.parallel.ep_size
    model.validate_ep_size(ep)
    if world_size % ep:
        raise ValueError(f"parallel.ep_size={ep} does not divide the world size {world_size}; launch a multiple of "
                         f"{ep} processes or pick an ep_size among the divisors of {world_size}.")
    if cfg.zero.stage not in (0, 1, 2, 3):
        raise ValueError(f"zero.stage={cfg.zero.stage} must be 0, 1, 2 or 3.")
    if cfg.zero.stage == 3 and not model.backend_support.zero3:
        raise ValueError(f"zero.stage=3 is not supported by {model.backend_support.description}; set "
                         f"model.moe_backend={' or '.join(backends_with('zero3'))} or use zero=stage2 or "
                         "zero=stage2_offload.")
    if cfg.zero.offload_optimizer and cfg.zero.stage == 0:
        raise ValueError("zero.offload_optimizer=true needs zero.stage >= 1; use zero=stage2_offload.")
    if cfg.data.seq_len > model.max_position_embeddings:
        raise ValueError(f"data.seq_len={cfg.data.seq_len} is longer than model.max_position_embeddings="
                         f"{model.max_position_embeddings}; lower data.seq_len or raise the model's positions.")
    if tokenizer_vocab_size is not None and tokenizer_vocab_size > model.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer_vocab_size} tokens but model.vocab_size={model.vocab_size}; "
                         f"set model.vocab_size>={tokenizer_vocab_size} or use a smaller tokenizer.")
    t = cfg.trainer
    for name in ("micro_batch_size", "grad_accum", "max_steps", "eval_interval", "eval_batches",
                 "checkpoint_interval", "log_interval"):
        if getattr(t, name) < 1:
            raise ValueError(f"trainer.{name}={getattr(t, name)} must be >= 1.")
    if t.precision not in PRECISIONS:
        raise ValueError(f"trainer.precision={t.precision!r} must be one of {PRECISIONS}.")
    tokens_per_rank = t.micro_batch_size * cfg.data.seq_len
    if model.backend_support.capacity and model.num_experts_per_tok == 1 and tokens_per_rank < model.min_capacity:
        raise ValueError(f"micro_batch_size * seq_len = {tokens_per_rank} tokens is below model.min_capacity="
                         f"{model.min_capacity}; DeepSpeed's top-1 gate needs at least that many tokens per rank.")
    validate_schedule(cfg.optim, max_steps(cfg, world_size))
    if cfg.logging.wandb_mode not in WANDB_MODES:
        raise ValueError(f"logging.wandb_mode={cfg.logging.wandb_mode!r} must be one of {WANDB_MODES}.")
    cfg.data.validate()
    return model


def validate_schedule(o: OptimConfig, total_steps: int) -> None:
    if o.lr <= 0:
        raise ValueError(f"optim.lr={o.lr} must be > 0.")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ValueError(f"optim.min_lr_ratio={o.min_lr_ratio} must lie in [0, 1] (the last step's lr / optim.lr).")
    if o.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule={o.schedule!r} is unknown; set it to one of {SCHEDULES}.")
    if o.warmup_steps < 0:
        raise ValueError(f"optim.warmup_steps={o.warmup_steps} must be >= 0.")
    if o.warmup_steps >= total_steps:
        raise ValueError(f"optim.warmup_steps={o.warmup_steps} must be below the number of steps {total_steps}.")
    if o.schedule == "wsd":
        if not 0 < o.decay_fraction <= 1:
            raise ValueError(f"optim.decay_fraction={o.decay_fraction} must lie in (0, 1], e.g. 0.1 (the last 10% "
                             "of the steps decay).")
        decay = decay_steps(total_steps, o.decay_fraction)
        if o.warmup_steps + decay > total_steps:
            raise ValueError(f"optim.warmup_steps={o.warmup_steps} plus the {decay} decay steps (optim.decay_fraction="
                             f"{o.decay_fraction} of {total_steps}) exceed the {total_steps} steps; lower "
                             "optim.warmup_steps or optim.decay_fraction.")


def max_steps(cfg: RecipeConfig, world_size: int) -> int:
    if cfg.trainer.token_budget is None:
        return cfg.trainer.max_steps
    tokens_per_step = global_batch_size(cfg.trainer, world_size) * cfg.data.seq_len
    return -(-cfg.trainer.token_budget // tokens_per_step)
