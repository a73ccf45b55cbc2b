"""From Hydra to a run: compose the config, type it by the schema (config.py), validate it, and derive what start-up
needs (the model config, the step count, the DeepSpeed config) exactly once. `load_recipe` is the one way in, shared
by recipes/train.py, the planner and the tests.
"""

import os
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedTokenizerBase

from moe_model import MoeConfig

from .config import RecipeConfig, max_steps, validate
from .data import load_tokenizer, tokenizer_path
from .engine import build_deepspeed_config
from .errors import unknown_key_message
from .resources import CONF_DIR

if TYPE_CHECKING:
    from .checkpoint import ResumePoint


@dataclass
class Recipe:
    """A validated run: the typed config and what start-up derives from it, each built once and handed down."""

    config: RecipeConfig
    resolved: dict[str, Any]  # the resolved config, as saved in run_dir/config.yaml and sent to W&B
    world_size: int
    model: MoeConfig
    total_steps: int
    deepspeed: dict[str, Any]  # the DeepSpeed config (engine.build_deepspeed_config)
    tokenizer: PreTrainedTokenizerBase | None
    # set by the entry point's preflight: the checkpoint to resume from, resolved and read once
    resume_from: "ResumePoint | None" = None


def world_size_from_env() -> int:
    """The world size the launcher (torchrun, deepspeed, srun wrapper) announces, before any process group."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """conf/config.yaml + Hydra overrides, as `recipes/train.py` composes them (typed by the schema)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def typed_config(config: DictConfig | dict) -> tuple[RecipeConfig, dict[str, Any]]:
    """A composed config (or a plain dict, e.g. a saved config.yaml) -> the typed RecipeConfig and the resolved dict.
    OmegaConf refuses wrong types and missing (???) values here; errors.config_error_message words its errors."""
    config = OmegaConf.create(config) if isinstance(config, dict) else config
    refuse_unknown_keys(config, RecipeConfig)
    merged = OmegaConf.merge(OmegaConf.structured(RecipeConfig), config)
    resolved = OmegaConf.to_container(merged, resolve=True, throw_on_missing=True)
    cfg = OmegaConf.to_object(merged)
    cfg.optim.betas = tuple(cfg.optim.betas)  # OmegaConf holds tuples as lists
    return cfg, resolved


def refuse_unknown_keys(node: DictConfig, schema: type, prefix: str = "") -> None:
    """Hydra adds a key given with `+` (`+model.num_expert=8`) even to a typed section (it opens the struct flag for
    additions), so the schema is enforced here too: a key the dataclass does not have is an error, not a no-op."""
    hints = typing.get_type_hints(schema)
    for key in node.keys():
        if key not in hints:
            raise ValueError(unknown_key_message(f"{prefix}{key}", schema))
        if hasattr(hints[key], "__dataclass_fields__") and isinstance(node[key], DictConfig):
            refuse_unknown_keys(node[key], hints[key], prefix=f"{prefix}{key}.")


def load_recipe(config: DictConfig | Sequence[str] = (), world_size: int | None = None,
                require_tokenizer: bool = True) -> Recipe:
    """Compose, type and validate the recipe, then build the model config, the step count and the DeepSpeed config.

    `config`: Hydra overrides (composed here from conf/), or the config @hydra.main composed. `world_size`: the
    number of ranks (default: the launcher's WORLD_SIZE). The tokenizer (data.tokenizer) is loaded to check the
    vocabulary against the model; `require_tokenizer=False` skips that check when the folder is absent (the
    planner, on a machine without the data). Input the recipe refuses raises a ValueError that names the setting
    and says what to change, or Hydra's / OmegaConf's own error, which errors.config_error_message words the same way.
    """
    composed = config if isinstance(config, DictConfig) else compose(config)
    cfg, resolved = typed_config(composed)
    tokenizer = None
    if require_tokenizer or (tokenizer_path(cfg.data) / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(cfg.data)
    return build_recipe(cfg, world_size_from_env() if world_size is None else world_size, tokenizer, resolved)


def build_recipe(cfg: RecipeConfig, world_size: int, tokenizer: PreTrainedTokenizerBase | None = None,
                 resolved: dict[str, Any] | None = None) -> Recipe:
    """Validate a typed config and derive the model config, the step count and the DeepSpeed config from it."""
    model = validate(cfg, world_size, tokenizer_vocab_size=len(tokenizer) if tokenizer is not None else None)
    if tokenizer is not None:
        model.update({"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
                      "eos_token_id": tokenizer.eos_token_id})
    if resolved is None:
        resolved = OmegaConf.to_container(OmegaConf.structured(cfg))
    total_steps = max_steps(cfg, world_size)
    return Recipe(config=cfg, resolved=resolved, world_size=world_size, model=model, total_steps=total_steps,
                  deepspeed=build_deepspeed_config(cfg, model, world_size), tokenizer=tokenizer)
