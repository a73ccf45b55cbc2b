"""Typed recipe configuration: Hydra stops at the entry point, everything below gets these dataclasses.

The dataclasses are also the schema Hydra composes into (a structured config registered in the ConfigStore as
`recipe_schema`, the first entry of conf/config.yaml's defaults list): OmegaConf refuses an unknown key or a value of
the wrong type, in a YAML file or an override, while the config is composed. `validate` checks the rules across
sections; recipe.py's `load_recipe` is the one way in.
"""

import re
from dataclasses import dataclass, field, fields
from typing import Any

from hydra.core.config_store import ConfigStore

from moe_model import MoeConfig
from moe_model.configuration_moe import backends_with

from .data import DataConfig
from .lr_schedule import SCHEDULES, decay_steps
from .resources import CONF_DIR  # noqa: F401  (the Hydra config groups, in a clone or a wheel)

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
WANDB_MODES = ("disabled", "offline", "online")


@dataclass
class RouterConfig:
    """How tokens choose experts and how the load is balanced: `model.router.<name>` is MoeConfig's
    `router_<name>` (see its docstring)."""

    balance: str = "aux"  # none | aux | global | sequence | bias | bias+aux | bias+global | bias+sequence
    score_func: str = "softmax"  # softmax | sigmoid
    norm_topk_prob: bool | None = None  # divide the chosen experts' weights by their sum; None: for k > 1
    scaling_factor: float = 1.0  # routed_scaling_factor: multiplies the routed experts' weights
    n_group: int | None = None  # group-limited routing: experts in n_group groups (n_group = ep_size: one per rank)
    topk_group: int | None = None  # ... of which each token may use topk_group
    bias_update_rate: float = 0.001  # balance=bias: the bias moves by this much per optimizer step


@dataclass
class ModelConfig:
    """The architecture and routing settings of `MoeConfig` (see its docstring), with its defaults; the `router`
    section holds its `router_*` settings other than the loss weights. The parallel layout is not among them: it is
    `parallel.ep_size`, applied when the model is built."""

    vocab_size: int = 4096
    hidden_size: int = 64
    intermediate_size: int = 128  # dense layers' SwiGLU
    moe_intermediate_size: int = 128  # each expert's SwiGLU
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None  # None: hidden_size // num_attention_heads (which must then divide evenly)
    max_position_embeddings: int = 256
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    num_experts: int = 8
    num_experts_per_tok: int = 2
    capacity_factor: float = 1.0
    min_capacity: int = 4
    drop_tokens: bool = True
    noisy_gate_policy: str | None = None
    use_rts: bool = False  # DeepSpeed's top-1 gate only (its default is true)
    top2_2nd_expert_sampling: bool = False  # DeepSpeed's top-2 gate only (its default is true)
    use_residual: bool = False
    num_shared_experts: int = 0
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 0
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.001
    router: RouterConfig = field(default_factory=RouterConfig)
    moe_backend: str = "deepspeed"

    def moe_config_arguments(self) -> dict[str, Any]:
        """MoeConfig's keyword arguments: the flat settings, and `router.<name>` as `router_<name>`."""
        arguments = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "router"}
        arguments.update({f"router_{f.name}": getattr(self.router, f.name) for f in fields(self.router)})
        return arguments


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
    # eval reads the first eval_batches x micro_batch_size val blocks (all if fewer), split over the ranks: the same
    # rows at any world size
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
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    name: str = "default"

    def model_config(self, **overrides) -> MoeConfig:
        """The model's config; MoeConfig.validate runs on it (top-k, heads, layers, ...). The layout is not in it."""
        try:
            return MoeConfig(**self.model.moe_config_arguments(), **overrides)
        except ValueError as err:  # MoeConfig names its own fields; here they are the model section's
            raise ValueError(model_setting_names(str(err).replace("MoeConfig: ", "model: ", 1))) from None


def model_setting_names(message: str) -> str:
    """MoeConfig's words for its fields -> the model section's (router_balance -> router.balance)."""
    for f in fields(RouterConfig):
        message = re.sub(rf"\brouter_{f.name}\b", f"router.{f.name}", message)
    return message


# conf/config.yaml names this schema first in its defaults list, so every section is typed while Hydra composes.
ConfigStore.instance().store(name="recipe_schema", node=RecipeConfig)


def global_batch_size(trainer: TrainerConfig, world_size: int) -> int:
    """Sequences per optimizer step: the one place train_batch_size is computed."""
    return trainer.micro_batch_size * trainer.grad_accum * world_size


def validate(cfg: RecipeConfig, world_size: int, tokenizer_vocab_size: int | None = None) -> MoeConfig:
    """Check every cross-section rule; raise one ValueError that says what to change. Returns the model config."""
    ep = cfg.parallel.ep_size
    if ep < 1:
        raise ValueError(f"parallel.ep_size={ep} must be >= 1.")
    m = cfg.model
    # MoeConfig derives head_dim by dividing: these come first, or a zero head count ends in ZeroDivisionError.
    if m.num_attention_heads < 1:
        raise ValueError(f"model.num_attention_heads={m.num_attention_heads} must be >= 1.")
    if m.head_dim is None and m.hidden_size % m.num_attention_heads:
        raise ValueError(f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads="
                         f"{m.num_attention_heads}; pick a head count that divides it, or set model.head_dim "
                         "explicitly (the attention then projects to num_attention_heads * head_dim).")
    for name in ("rope_theta", "rms_norm_eps"):
        if getattr(m, name) <= 0:
            raise ValueError(f"model.{name}={getattr(m, name)} must be > 0.")
    if m.min_capacity < 0 or m.initializer_range < 0:
        raise ValueError(f"model.min_capacity={m.min_capacity} and model.initializer_range={m.initializer_range} "
                         "must be >= 0.")
    model = cfg.model_config()  # MoeConfig.validate: top-k, heads, layers, ...
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
    if cfg.zero.reduce_bucket_size < 1:
        raise ValueError(f"zero.reduce_bucket_size={cfg.zero.reduce_bucket_size} must be >= 1 (elements).")
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
    for name in ("token_budget", "stop_after_steps", "heatmap_interval"):
        if getattr(t, name) is not None and getattr(t, name) < 1:
            raise ValueError(f"trainer.{name}={getattr(t, name)} must be >= 1, or null.")
    if t.peak_flops_per_device is not None and t.peak_flops_per_device <= 0:
        raise ValueError(f"trainer.peak_flops_per_device={t.peak_flops_per_device} must be > 0, or null.")
    if t.precision not in PRECISIONS:
        raise ValueError(f"trainer.precision={t.precision!r} must be one of {PRECISIONS}.")
    tokens_per_rank = t.micro_batch_size * cfg.data.seq_len
    if model.backend_support.capacity and model.num_experts_per_tok == 1 and tokens_per_rank < model.min_capacity:
        raise ValueError(f"micro_batch_size * seq_len = {tokens_per_rank} tokens is below model.min_capacity="
                         f"{model.min_capacity}; DeepSpeed's top-1 gate needs at least that many tokens per rank.")
    o = cfg.optim
    validate_schedule(o, max_steps(cfg, world_size))
    if len(o.betas) != 2 or not all(0 <= beta < 1 for beta in o.betas):
        raise ValueError(f"optim.betas={list(o.betas)} must be two numbers in [0, 1), e.g. [0.9, 0.95].")
    for name in ("eps", "weight_decay", "grad_clip"):
        if getattr(o, name) < 0:
            raise ValueError(f"optim.{name}={getattr(o, name)} must be >= 0.")
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
