"""Shared fixtures: a tiny MoE config and model, small enough for fast CPU unit tests."""

from collections.abc import Callable

import pytest
import torch

from moe_model import MoeConfig, MoeForCausalLM
from moe_recipe.engine import use_environment_extensions_dir

# Every process a test starts loads DeepSpeed's CPU op from where scripts/setup_venv.sh built it, the recipe too.
use_environment_extensions_dir()

# Deterministic routing by default (no RTS, no sampled second expert); tests that want the noise turn it on.
TINY_CONFIG = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    num_experts=4,
    num_experts_per_tok=2,
    use_rts=False,
    top2_2nd_expert_sampling=False,
)


@pytest.fixture
def tiny_config() -> Callable[..., MoeConfig]:
    """`tiny_config(**overrides)` builds a MoeConfig from TINY_CONFIG with the overrides applied."""

    def make(**overrides) -> MoeConfig:
        return MoeConfig(**{**TINY_CONFIG, **overrides})

    return make


@pytest.fixture
def tiny_model(tiny_config) -> Callable[..., MoeForCausalLM]:
    """`tiny_model(seed=0, ep_size=1, ep_rank=0, **overrides)` builds a MoeForCausalLM in eval mode from a fixed
    seed, holding expert-parallel rank `ep_rank`'s share of the experts."""

    def make(seed: int = 0, ep_size: int = 1, ep_rank: int = 0, **overrides) -> MoeForCausalLM:
        torch.manual_seed(seed)
        return MoeForCausalLM(tiny_config(**overrides), ep_size=ep_size, ep_rank=ep_rank).eval()

    return make
