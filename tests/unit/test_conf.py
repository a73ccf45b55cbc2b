"""Every config in conf/ composes, types and validates through load_recipe; the schema refuses unknown keys and wrong
types; the model config, the DeepSpeed config and the step count are derived from the recipe once."""

import inspect

import pytest
import torch
from omegaconf import OmegaConf

from moe_model import MoeConfig, MoeForCausalLM, configuration_moe
from moe_recipe.config import CONF_DIR, ModelConfig, RouterConfig, model_setting_name, moe_config_kwargs, validate
from moe_recipe.engine import build_param_groups
from moe_recipe.errors import CONFIG_ERRORS, config_error_message
from moe_recipe.flops import active_params_per_token
from moe_recipe.recipe import compose, load_recipe, typed_config


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("model", group_options("model"))
@pytest.mark.parametrize("zero", group_options("zero"))
def test_every_model_and_zero_option_composes_and_validates(model, zero):
    recipe = load_recipe([f"model={model}", f"zero={zero}", "parallel.ep_size=2"], world_size=4)
    assert recipe.model.num_experts % 2 == 0 and not hasattr(recipe.model, "ep_size")
    assert recipe.deepspeed["zero_optimization"]["stage"] == recipe.config.zero.stage


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_every_experiment_composes_and_validates(experiment):
    recipe = load_recipe([f"+experiment={experiment}"], world_size=8)  # a multiple of every experiment's ep_size
    assert recipe.config.name == experiment


@pytest.mark.parametrize("option", group_options("logging") + group_options("data"))
def test_logging_and_data_options_compose(option):
    group = "logging" if option in group_options("logging") else "data"
    extra = ["data.data_files=[a.jsonl]"] if option == "local_files" else []
    load_recipe([f"{group}={option}", *extra], world_size=1)


def test_model_section_mirrors_moe_config():
    """Every architecture and routing argument of MoeConfig is a typed model setting with MoeConfig's default; the
    layout (ep_size), the tokenizer's token ids and the inference cache are not settings."""
    not_settings = {"self", "kwargs", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id"}
    arguments = {name: p.default for name, p in inspect.signature(MoeConfig.__init__).parameters.items()
                 if name not in not_settings}
    assert moe_config_kwargs(ModelConfig()) == arguments
    router = {f"router_{name}" for name in RouterConfig.__dataclass_fields__}
    assert router == {name for name in arguments if name.startswith("router_")} - {"router_aux_loss_coef",
                                                                                  "router_z_loss_coef"}
    assert [model_setting_name(name) for name in ("hidden_size", "router_balance", "router_aux_loss_coef")] == [
        "hidden_size", "router.balance", "router_aux_loss_coef"]
    defaults = OmegaConf.to_container(OmegaConf.structured(ModelConfig))
    assert defaults["router"]["expert_bias"] is False and "eval_capacity_factor" not in defaults
    assert list(defaults).index("router") == list(defaults).index("router_z_loss_coef") + 1


def test_model_sizes_match_their_names():
    def active(model):
        return active_params_per_token(load_recipe([f"model={model}"], world_size=1).model)

    embeddings = 32000 * 768
    assert 80e6 < active("small") - embeddings < 130e6  # ~100M active, embeddings excluded
    assert 12e9 < active("mixtral_8x7b") < 14e9  # Mixtral-8x7B: 12.9B active
    assert 2.5e9 < active("deepseek_moe_16b") < 3.2e9  # DeepSeek-MoE-16B: 2.8B active
    assert 1.1e9 < active("olmoe_1b_7b") < 1.6e9  # OLMoE-1B-7B: 1.3B active


@pytest.mark.parametrize(
    "overrides, world_size, message",
    [
        (["parallel.ep_size=3"], 3, "num_experts=8 is not divisible by ep_size=3"),
        (["parallel.ep_size=16"], 16, "num_experts=8 is not divisible by ep_size=16"),
        (["parallel.ep_size=0"], 1, "parallel.ep_size=0 must be >= 1"),
        (["parallel.ep_size=4"], 2, "does not divide the world size 2"),
        (["zero.stage=3"], 1, "zero.stage=3 is not supported"),
        (["zero.offload_optimizer=true"], 1, "needs zero.stage >= 1"),
        (["data.seq_len=1024"], 1, "longer than model.max_position_embeddings"),
        (["model.num_key_value_heads=3"], 1,
         "model.num_attention_heads=4 is not divisible by model.num_key_value_heads=3"),
        (["model.hidden_size=66"], 1, "model.hidden_size=66 is not divisible by model.num_attention_heads=4"),
        (["model.num_experts_per_tok=9"], 1, "model.num_experts_per_tok=9 (top-k) exceeds model.num_experts=8"),
        (["model.num_hidden_layers=0"], 1, "model.num_hidden_layers=0 must be >= 1"),
        (["model.num_attention_heads=0"], 1, "model.num_attention_heads=0 must be >= 1"),
        (["model.num_attention_heads=0", "model.head_dim=8"], 1, "model.num_attention_heads=0 must be >= 1"),
        (["model.rope_theta=-1"], 1, "model.rope_theta=-1.0 must be > 0"),
        (["model.rms_norm_eps=0"], 1, "model.rms_norm_eps=0.0 must be > 0"),
        (["model.min_capacity=-1"], 1, "model.min_capacity=-1 must be >= 0"),
        (["model.initializer_range=-0.1"], 1, "model.initializer_range=-0.1 must be >= 0"),
        (["trainer.precision=fp8"], 1, "trainer.precision='fp8'"),
        (["trainer.micro_batch_size=0"], 1, "trainer.micro_batch_size=0 must be >= 1"),
        (["trainer.stop_after_steps=-1"], 1, "trainer.stop_after_steps=-1 must be >= 1, or null"),
        (["optim.warmup_steps=500"], 1, "optim.warmup_steps=500 must be below"),
        (["optim.schedule=wsd", "optim.decay_fraction=0.95"], 1, "lower optim.warmup_steps or optim.decay_fraction"),
        (["optim.min_lr_ratio=1.5"], 1, "optim.min_lr_ratio=1.5 must lie in [0, 1]"),
        (["optim.lr=0"], 1, "optim.lr=0.0 must be > 0"),
        (["optim.betas=[0.9]"], 1, "optim.betas=[0.9] must be two numbers in [0, 1)"),
        (["optim.weight_decay=-0.1"], 1, "optim.weight_decay=-0.1 must be >= 0"),
        (["logging.wandb_mode=offlin"], 1, "logging.wandb_mode='offlin'"),
        (["model.num_experts_per_tok=1", "trainer.micro_batch_size=1", "data.seq_len=2"], 1, "min_capacity"),
        (["data.tokenizer=/nonexistent"], 1, "No tokenizer at /nonexistent (data.tokenizer='/nonexistent')"),
    ],
)
def test_invalid_combinations_raise_one_clear_error(overrides, world_size, message):
    with pytest.raises(ValueError) as err:
        load_recipe(overrides, world_size=world_size)
    assert message in str(err.value)


def test_tokenizer_larger_than_vocab_is_rejected():
    cfg, _ = typed_config(compose())
    with pytest.raises(ValueError, match="the tokenizer has 5000 tokens but model.vocab_size=4096"):
        validate(cfg, world_size=1, tokenizer_vocab_size=5000)


@pytest.mark.parametrize(
    "override, message",
    [
        ("parallel.ep_size=two", "parallel.ep_size='two' is not an integer"),
        ("optim.lr=abc", "optim.lr='abc' is not a number"),
        ("trainer.micro_batch_size=1.5", "trainer.micro_batch_size=1.5 is not an integer"),
        ("model.drop_tokens=maybe", "model.drop_tokens='maybe' is not true or false"),
        ("trainer.token_budget=lots", "trainer.token_budget='lots' is not an integer or null"),
        ("logging.tags=abc", "logging.tags='abc' is not a list of strings"),
        ("model.num_expert=8", "model.num_expert is not a setting (model has no key 'num_expert'); did you mean "
                               "model.num_experts?"),
        ("model=tinyy", "Could not find 'model/tinyy' Available options in 'model': deepseek_moe_16b"),
    ],
)
def test_schema_refuses_wrong_types_and_unknown_keys_while_composing(override, message):
    with pytest.raises(CONFIG_ERRORS) as err:
        load_recipe([override], world_size=1)
    assert message in config_error_message(err.value)
    assert "\n" not in config_error_message(err.value)


@pytest.mark.parametrize("override, key", [("+model.num_expert=8", "model.num_expert"),
                                           ("+trainer.max_step=3", "trainer.max_step"), ("+foo=1", "foo")])
def test_keys_added_with_plus_are_refused_too(override, key):
    """Hydra adds a `+key` even to a typed section (it opens the struct flag for additions): the recipe refuses it."""
    composed = compose([override])
    assert OmegaConf.select(composed, key) is not None  # Hydra itself accepted it
    with pytest.raises(ValueError, match=f"{key} is not a setting"):
        load_recipe([override], world_size=1)


def test_a_saved_config_types_back_to_the_same_recipe():
    recipe = load_recipe(["model=small", "zero=stage2", "optim.lr=1e-3", "logging.tags=[a,b]"], world_size=2)
    cfg, resolved = typed_config(OmegaConf.create(OmegaConf.to_yaml(recipe.resolved)))
    assert cfg == recipe.config and resolved == recipe.resolved
    assert isinstance(cfg.model, ModelConfig) and cfg.optim.betas == (0.9, 0.95)
    with pytest.raises(ValueError, match="model.num_expert is not a setting"):
        typed_config({**recipe.resolved, "model": {**recipe.resolved["model"], "num_expert": 8}})


def test_deepspeed_config_is_derived_from_the_recipe():
    recipe = load_recipe(["zero=stage2_offload", "trainer.micro_batch_size=3", "trainer.grad_accum=5",
                          "trainer.max_steps=40", "optim.warmup_steps=4", "optim.grad_clip=0.5"], world_size=8)
    ds = recipe.deepspeed
    assert ds["train_batch_size"] == 3 * 5 * 8
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 5
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 2
    # ZeRO 0 in fp32: the recipe clips (engine.clip_grad_norm), DeepSpeed's layout-dependent clipping is off.
    stage0 = load_recipe(["zero=stage0", "trainer.precision=fp32", "optim.grad_clip=0.5"], world_size=8)
    assert stage0.deepspeed["gradient_clipping"] == 0.0
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "scheduler" not in ds  # the recipe hands DeepSpeed its own (moe_recipe/lr_schedule.py)
    assert recipe.total_steps == 40
    assert ds["bf16"]["enabled"] is torch.cuda.is_available()  # precision=auto: bf16 on GPUs, fp32 on CPU


def test_token_budget_sets_the_number_of_steps():
    recipe = load_recipe(["trainer.token_budget=100000", "trainer.micro_batch_size=2", "data.seq_len=128"],
                         world_size=4)
    assert recipe.total_steps == -(-100000 // (2 * 4 * 128))


def test_the_model_config_carries_the_tokenizers_special_tokens():
    recipe = load_recipe([], world_size=1)
    tokenizer = recipe.tokenizer
    assert (recipe.model.pad_token_id, recipe.model.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)
    assert recipe.model.vocab_size >= len(tokenizer)


def test_param_groups_split_experts_and_skip_decay_on_norms():
    model = MoeForCausalLM(load_recipe([], world_size=1).model)
    groups = build_param_groups(model, weight_decay=0.1)
    by_id = {id(p): g for g in groups for p in g["params"]}
    assert len(by_id) == sum(1 for _ in model.parameters())  # every parameter exactly once
    for name, param in model.named_parameters():
        group = by_id[id(param)]
        is_expert = "deepspeed_experts" in name
        assert group.get("moe", False) is is_expert, name
        assert group["weight_decay"] == (0.0 if param.ndim < 2 else 0.1), name


@pytest.mark.parametrize("overrides, message", [
    (["model.router.balance=foo"], r"model.router.balance='foo' must be one of \['none', 'aux', 'global', "
                                   r"'sequence'\] \(the balancing loss\); the expert bias is "
                                   r"model.router.expert_bias=true"),
    (["model.router.balance=sequence+bias"], r"model.router.balance='sequence\+bias' must be one of"),
    (["model.router.n_group=4"], "model.router.n_group and model.router.topk_group go together"),
    (["model.router.score_func=relu"], r"model.router.score_func='relu' must be one of \['softmax', 'sigmoid'\]"),
    (["model.moe_backend=autoep", "model.use_residual=true"],
     r"model.use_residual not supported by model.moe_backend='autoep' .*; set model.use_residual=false"),
])
def test_model_settings_are_refused_by_their_recipe_names(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_recipe(overrides, world_size=1)


def test_a_wrong_expert_bias_is_refused_while_composing():
    with pytest.raises(CONFIG_ERRORS) as err:
        load_recipe(["model.router.expert_bias=maybe"], world_size=1)
    assert "model.router.expert_bias='maybe' is not true or false" in config_error_message(err.value)


@pytest.mark.parametrize("balance", ["none", "aux", "global", "sequence"])
@pytest.mark.parametrize("expert_bias", [False, True])
def test_every_balancing_loss_goes_with_and_without_the_expert_bias(balance, expert_bias):
    recipe = load_recipe([f"model.router.balance={balance}", f"model.router.expert_bias={expert_bias}",
                          f"model.router_aux_loss_coef={0.0 if balance == 'none' else 0.01}"], world_size=1)
    assert recipe.model.router_balance == balance and recipe.model.uses_expert_bias is expert_bias
    assert recipe.model.balance_loss == (None if balance == "none" else balance)


@pytest.mark.parametrize("old, balance", [("bias", "none"), ("bias+aux", "aux"), ("bias+global", "global"),
                                          ("bias+sequence", "sequence")])
def test_the_old_spelling_of_the_expert_bias_in_an_override_still_works(monkeypatch, old, balance):
    monkeypatch.setattr(configuration_moe, "_warned_bias_balance", False)
    with pytest.warns(FutureWarning, match=f"write the new one .*model.router.balance={balance} "
                                           "model.router.expert_bias=true"):
        recipe = load_recipe([f"model.router.balance={old}", "model.router_aux_loss_coef=0"], world_size=1)
    assert (recipe.model.router_balance, recipe.model.router_expert_bias) == (balance, True)
