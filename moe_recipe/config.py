"""Typed recipe configuration: Hydra stops at the entry point, everything below gets these dataclasses.

The dataclasses are also the schema Hydra composes into (a structured config registered in the ConfigStore as
`recipe_schema`, the first entry of conf/config.yaml's defaults list): OmegaConf refuses an unknown key or a value of
the wrong type, in a YAML file or an override, while the config is composed. The model section is MoeConfig's
signature, generated from it. `validate` checks the rules across sections; recipe.py's `load_recipe` is the one way in.
"""

import inspect
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any

from hydra.core.config_store import ConfigStore

from moe_model import MoeConfig
from moe_model.configuration_moe import MoeConfigError, backends_with

from .data import DataConfig
from .lr_schedule import SCHEDULES, decay_steps
from .resources import CONF_DIR  # noqa: F401  (the Hydra config groups, in a clone or a wheel)

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
WANDB_MODES = ("disabled", "offline", "online")


# The model section is generated from MoeConfig.__init__'s keyword arguments, their types and defaults, so that each
# setting and its default is written once (there). Left out: the tokenizer's token ids (the recipe sets them from the
# tokenizer), the inference cache, and **kwargs (PretrainedConfig's own options).
_NOT_MODEL_SETTINGS = ("self", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "kwargs")
_FLAT_ROUTER_SETTINGS = ("router_aux_loss_coef", "router_z_loss_coef")  # the loss weights stay beside the others


def _in_router_section(name: str) -> bool:
    return name.startswith("router_") and name not in _FLAT_ROUTER_SETTINGS


def _structured_config(name: str, fields_: list[tuple[str, Any, Any]], doc: str) -> type:
    schema = make_dataclass(name, fields_, namespace={"__module__": __name__, "__doc__": doc})
    schema.__qualname__ = name
    return schema


_MODEL_SETTINGS = [p for p in inspect.signature(MoeConfig.__init__).parameters.values()
                   if p.name not in _NOT_MODEL_SETTINGS]

RouterConfig = _structured_config(
    "RouterConfig",
    [(p.name.removeprefix("router_"), p.annotation, field(default=p.default))
     for p in _MODEL_SETTINGS if _in_router_section(p.name)],
    """How tokens choose experts and how the load is balanced: `model.router.<name>` is MoeConfig's `router_<name>`,
    with its type and default (see its docstring).""")

_flat = [(p.name, p.annotation, field(default=p.default)) for p in _MODEL_SETTINGS if not _in_router_section(p.name)]
# The router section goes where MoeConfig lists its router settings (together), so saved configs keep that order.
_router_at = next(i for i, p in enumerate(_MODEL_SETTINGS) if _in_router_section(p.name))
ModelConfig = _structured_config(
    "ModelConfig", [*_flat[:_router_at], ("router", RouterConfig, field(default_factory=RouterConfig)),
                    *_flat[_router_at:]],
    """The architecture and routing settings of `MoeConfig`: its keyword arguments with their types and defaults,
    generated from its signature (see its docstring for what each does). The `router` section holds its `router_*`
    settings other than the loss weights, without the prefix. Not among them: the layout (`parallel.ep_size`, applied
    when the model is built), the tokenizer's token ids (set from data.tokenizer) and use_cache.""")


def model_setting_name(name: str) -> str:
    """MoeConfig's name for a field -> the model section's: `router_balance` -> `router.balance`, `hidden_size` ->
    `hidden_size`."""
    return f"router.{name.removeprefix('router_')}" if _in_router_section(name) else name


def moe_config_kwargs(model: ModelConfig) -> dict[str, Any]:
    """MoeConfig's keyword arguments from the typed model section: the flat settings, `router.<name>` as
    `router_<name>`."""
    kwargs = {f.name: getattr(model, f.name) for f in fields(model) if f.name != "router"}
    kwargs.update({f"router_{f.name}": getattr(model.router, f.name) for f in fields(model.router)})
    return kwargs


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
    # end this job after that many steps (checkpointed); the schedule spans max_steps
    stop_after_steps: int | None = None
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
    keep_last: int | None = 3  # checkpoints kept: the newest N (None: all) ...
    keep_every: int | None = None  # ... and every one whose step is a multiple of N, for good (milestones)


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

    def model_config(self) -> MoeConfig:
        """The model's config; MoeConfig.validate runs on it (top-k, heads, layers, ...), and its errors name the model
        section's settings (model.router.balance). The layout is not in it."""
        try:
            return MoeConfig(**moe_config_kwargs(self.model))
        except MoeConfigError as err:
            raise ValueError(err.render(lambda name: f"model.{model_setting_name(name)}")) from None


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
    model = cfg.model_config()  # MoeConfig.validate: sizes, heads, top-k, layers, routing, ...
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
    for name in ("token_budget", "stop_after_steps", "heatmap_interval", "keep_last", "keep_every"):
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
