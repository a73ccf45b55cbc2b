"""Every config in conf/ composes and validates; the DeepSpeed config and optimizer groups derive from it."""

import pytest
import torch

from moe_model import MoeForCausalLM
from moe_recipe.config import CONF_DIR, max_steps, validate
from moe_recipe.engine import active_params_per_token, build_deepspeed_config, build_param_groups
from tests.helpers import compose_recipe


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("model", group_options("model"))
@pytest.mark.parametrize("zero", group_options("zero"))
def test_every_model_and_zero_option_composes_and_validates(model, zero):
    cfg = compose_recipe(f"model={model}", f"zero={zero}", "parallel.ep_size=2")
    config = validate(cfg, world_size=4, tokenizer_vocab_size=4096)
    assert config.num_experts % 2 == 0 and not hasattr(config, "ep_size")


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_every_experiment_composes_and_validates(experiment):
    cfg = compose_recipe(f"+experiment={experiment}")
    assert cfg.name == experiment
    validate(cfg, world_size=cfg.parallel.ep_size * 2, tokenizer_vocab_size=4096)


@pytest.mark.parametrize("option", group_options("logging") + group_options("data"))
def test_logging_and_data_options_compose(option):
    group = "logging" if option in group_options("logging") else "data"
    extra = ["data.data_files=[a.jsonl]"] if option == "local_files" else []
    cfg = compose_recipe(f"{group}={option}", *extra)
    cfg.data.validate()


def test_model_sizes_match_their_names():
    def active(model):
        return active_params_per_token(compose_recipe(f"model={model}").model_config())

    embeddings = 32000 * 768
    assert 80e6 < active("small") - embeddings < 130e6  # ~100M active, embeddings excluded
    assert 12e9 < active("mixtral_8x7b") < 14e9  # Mixtral-8x7B: 12.9B active
    assert 2.5e9 < active("deepseek_moe_16b") < 3.2e9  # DeepSeek-MoE-16B: 2.8B active
    assert 1.1e9 < active("olmoe_1b_7b") < 1.6e9  # OLMoE-1B-7B: 1.3B active


@pytest.mark.parametrize(
    "overrides, world_size, message",
    [
        (["parallel.ep_size=3"], 3, "num_experts=8 is not divisible by ep_size=3"),
        (["parallel.ep_size=4"], 2, "does not divide the world size 2"),
        (["zero.stage=3"], 1, "zero.stage=3 is not supported"),
        (["zero.offload_optimizer=true"], 1, "needs zero.stage >= 1"),
        (["data.seq_len=1024"], 1, "longer than model.max_position_embeddings"),
        (["model.num_key_value_heads=3"], 1, "num_attention_heads=4 is not divisible by num_key_value_heads=3"),
        (["model.num_experts_per_tok=9"], 1, "exceeds num_experts=8"),
        (["trainer.precision=fp8"], 1, "trainer.precision='fp8'"),
        (["optim.warmup_steps=500"], 1, "optim.warmup_steps=500 must be below"),
        (["optim.schedule=wsd", "optim.decay_fraction=0.95"], 1, "lower optim.warmup_steps or optim.decay_fraction"),
        (["logging.wandb_mode=offlin"], 1, "logging.wandb_mode='offlin'"),
        (["model.num_experts_per_tok=1", "trainer.micro_batch_size=1", "data.seq_len=2"], 1, "min_capacity"),
    ],
)
def test_invalid_combinations_raise_one_clear_error(overrides, world_size, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(compose_recipe(*overrides), world_size=world_size, tokenizer_vocab_size=4096)


def test_tokenizer_larger_than_vocab_is_rejected():
    with pytest.raises(ValueError, match="the tokenizer has 5000 tokens but model.vocab_size=4096"):
        validate(compose_recipe(), world_size=1, tokenizer_vocab_size=5000)


def test_unknown_key_names_the_section():
    with pytest.raises(ValueError, match=r"trainer: unknown key\(s\) \['max_step'\]"):
        compose_recipe("+trainer.max_step=3")


def test_deepspeed_config_is_derived_from_the_recipe():
    cfg = compose_recipe("zero=stage2_offload", "trainer.micro_batch_size=3", "trainer.grad_accum=5",
                         "trainer.max_steps=40", "optim.warmup_steps=4", "optim.grad_clip=0.5")
    ds = build_deepspeed_config(cfg, world_size=8)
    assert ds["train_batch_size"] == 3 * 5 * 8
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 5
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "scheduler" not in ds  # the recipe hands DeepSpeed its own (moe_recipe/lr_schedule.py)
    assert ds["bf16"]["enabled"] is torch.cuda.is_available()  # precision=auto: bf16 on GPUs, fp32 on CPU


def test_token_budget_sets_the_number_of_steps():
    cfg = compose_recipe("trainer.token_budget=100000", "trainer.micro_batch_size=2", "data.seq_len=128")
    assert max_steps(cfg, world_size=4) == -(-100000 // (2 * 4 * 128))


def test_param_groups_split_experts_and_skip_decay_on_norms():
    model = MoeForCausalLM(compose_recipe().model_config())
    groups = build_param_groups(model, weight_decay=0.1)
    by_id = {id(p): g for g in groups for p in g["params"]}
    assert len(by_id) == sum(1 for _ in model.parameters())  # every parameter exactly once
    for name, param in model.named_parameters():
        group = by_id[id(param)]
        is_expert = "deepspeed_experts" in name
        assert group.get("moe", False) is is_expert, name
        assert group["weight_decay"] == (0.0 if param.ndim < 2 else 0.1), name
