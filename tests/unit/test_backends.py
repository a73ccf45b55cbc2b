"""The two MoE backends against each other, in one CPU process: from the same seed, moe_backend="autoep"
(MoeAutoEPBlock, and DeepSpeed AutoEP's layer that replaces it) starts from the same weights and computes the same
losses, router statistics and gradients as moe_backend="deepspeed" when no token is dropped; AutoEP finds the block
from `autoep_layer_settings`; the recipe puts the backend into the DeepSpeed config and its validation.

Multi-process training through the engine (EP 2, ZeRO-2 and ZeRO-3) is tests/distributed/test_autoep.py.
"""

import sys
from dataclasses import dataclass, replace

import pytest
import torch
from deepspeed.module_inject.auto_ep import AutoEP
from deepspeed.module_inject.auto_ep_config import parse_autoep_config
from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer

from moe_model import MOE_BACKENDS, MoeConfig, MoeForCausalLM
from moe_model.modeling_moe import MoeCausalLMOutputWithPast
from moe_model.moe_blocks import MoeAutoEPBlock, MoeSparseBlock, autoep_layer_settings
from moe_model.routing import MoeRoutingMetrics, route_tokens
from moe_recipe.config import validate
from moe_recipe.stock_export import mixtral_blockers
from moe_recipe.recipe import load_recipe
from tests.helpers import compose_recipe, run_command

# Layer 0 dense, layers 1 and 2 MoE; std 0.2 gives O(1) outputs and peaked routers, so tolerances mean something.
DROPLESS = dict(drop_tokens=False, num_hidden_layers=3, first_k_dense_replace=1, initializer_range=0.2,
                router_aux_loss_coef=0.1, router_z_loss_coef=0.01)
CASES = {
    "top1": dict(num_experts_per_tok=1),
    "top2": dict(num_experts_per_tok=2),
    "top3": dict(num_experts_per_tok=3),
    "top2-shared": dict(num_experts_per_tok=2, num_shared_experts=1),
    "top4-of-8-shared": dict(num_experts_per_tok=4, num_experts=8, num_shared_experts=2),
    # Routing DeepSpeed's gate cannot express: the native backend routes with MoeGate, AutoEP with its own router.
    "deepseek-v3-routing": dict(num_experts=8, num_experts_per_tok=3, num_shared_experts=1,
                                router_score_func="sigmoid", router_n_group=4, router_topk_group=2,
                                router_scaling_factor=2.5, router_norm_topk_prob=True, router_balance="sequence",
                                router_expert_bias=True),
    "softmax-bias-global": dict(num_experts_per_tok=2, router_balance="global", router_expert_bias=True),
    "top1-normalised-scaled": dict(num_experts_per_tok=1, router_norm_topk_prob=True, router_scaling_factor=0.5),
}


def set_expert_bias(model: MoeForCausalLM, seed: int = 3) -> None:
    """A bias large enough to change choices (the router's scores are O(1/E)); the same values in both backends."""
    if not model.config.uses_expert_bias:
        return
    generator = torch.Generator().manual_seed(seed)
    for layer in model.moe_layers():
        layer.expert_bias_owner().e_score_correction_bias.copy_(
            torch.randn(model.config.num_experts, generator=generator) * 0.1)
NATIVE_ROUTER = "{layer}.mlp.moe.deepspeed_moe.gate.wg.weight"
NATIVE_EXPERT = "{layer}.mlp.moe.deepspeed_moe.experts.deepspeed_experts.{e}.{proj}.weight"
# Stacked expert weights [E, out, in] -> the native projection they hold, for MoeAutoEPBlock (down_proj; gate_up_proj
# is split below) and for AutoEP's GroupedExperts (w1 gate, w3 up, w2 down).
STACKED = {"experts.down_proj": "down_proj", "experts.w1": "gate_proj", "experts.w3": "up_proj",
           "experts.w2": "down_proj"}


def both_backends(tiny_model, **overrides) -> tuple[MoeForCausalLM, MoeForCausalLM]:
    models = tiny_model(**DROPLESS, **overrides), tiny_model(**DROPLESS, moe_backend="autoep", **overrides)
    for model in models:
        set_expert_bias(model)
    return models


def in_native_names(model: MoeForCausalLM, grads: bool = False) -> dict[str, torch.Tensor]:
    """An autoep model's parameters (or gradients) under the native backend's names, one tensor per expert."""
    out = {}
    for name, param in model.named_parameters():
        value = param.grad if grads else param.detach()
        layer, _, rest = name.partition(".mlp.")
        if rest in ("gate.weight", "router.gate.weight"):
            out[NATIVE_ROUTER.format(layer=layer)] = value
        elif rest == "experts.gate_up_proj":
            for e, (gate, up) in enumerate(zip(*value.chunk(2, dim=1))):
                out[NATIVE_EXPERT.format(layer=layer, e=e, proj="gate_proj")] = gate
                out[NATIVE_EXPERT.format(layer=layer, e=e, proj="up_proj")] = up
        elif rest in STACKED:
            for e, weight in enumerate(value):
                out[NATIVE_EXPERT.format(layer=layer, e=e, proj=STACKED[rest])] = weight
        else:
            out[name] = value
    return out


def native_params(model: MoeForCausalLM, grads: bool = False) -> dict[str, torch.Tensor]:
    return {name: param.grad if grads else param.detach() for name, param in model.named_parameters()}


def replace_with_autoep(model: MoeForCausalLM) -> list:
    """What `deepspeed.initialize` does with an "expert_parallel" config, at ep_size 1 (no process group needed)."""
    settings = {"enabled": True, "autoep_size": 1, **autoep_layer_settings(model.config)}
    autoep = AutoEP(model, parse_autoep_config(settings))
    specs = autoep.ep_parser()
    autoep.replace_moe_layers(specs, ep_size=1, ep_rank=0)
    return specs


@dataclass
class Observed:
    """One forward (and backward) of a model: its output and what its routers did."""

    out: MoeCausalLMOutputWithPast
    top_experts: torch.Tensor  # [L, T, k]: the model's routing of its router logits, with its expert bias
    routing: MoeRoutingMetrics | None  # the routers' counts of a training forward
    expert_bias: torch.Tensor | None


def forward_backward(model: MoeForCausalLM, input_ids: torch.Tensor) -> Observed:
    model.zero_grad(set_to_none=True)
    out = model(input_ids, labels=input_ids, output_router_logits=True)
    if model.training:
        out.loss.backward()
    top_experts = torch.stack([route_tokens(logits_TE, model.config, router.expert_bias).experts_Tk
                               for logits_TE, router in zip(out.router_logits, model.routers())])
    routing = model.routing_metrics(reset=True) if model.training else None
    return Observed(out, top_experts, routing, model.expert_bias())


def assert_same_outputs(observed: Observed, reference: Observed) -> None:
    """Same losses and logits, and the same routing (the routers' counts too, for a training forward)."""
    out = observed.out
    for field in ("loss", "lm_loss", "aux_loss", "z_loss", "logits"):
        torch.testing.assert_close(getattr(out, field), getattr(reference.out, field), rtol=1e-5, atol=1e-5,
                                   msg=field)
    torch.testing.assert_close(out.router_logits, reference.out.router_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(observed.top_experts, reference.top_experts)
    if reference.routing is not None:
        routing = observed.routing
        for field in ("demand_LE", "received_LE", "aux_loss_L", "z_loss_L"):
            torch.testing.assert_close(getattr(routing, field), getattr(reference.routing, field), rtol=1e-5,
                                       atol=0, msg=field)
        assert torch.equal(routing.demand_LE, routing.received_LE)  # nothing dropped: demand is what was received
        assert routing.dropped_L.abs().sum().item() == 0.0


def assert_same_tensors(actual: dict, expected: dict, atol: float) -> None:
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=1e-4, atol=atol, msg=name)


def test_same_seed_gives_both_backends_the_same_weights(tiny_model):
    native, autoep = both_backends(tiny_model, num_shared_experts=1)
    assert isinstance(native.model.layers[1].mlp, MoeSparseBlock)
    assert isinstance(autoep.model.layers[1].mlp, MoeAutoEPBlock)
    actual, expected = in_native_names(autoep), native_params(native)
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name
    experts = autoep.model.layers[1].mlp.experts.gate_up_proj
    assert not torch.equal(experts[0], experts[1])  # experts start distinct


@pytest.mark.parametrize("overrides", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_autoep_block_matches_native_backend(tiny_model, overrides, training):
    native, autoep = both_backends(tiny_model, **overrides)
    native.train(training), autoep.train(training)
    input_ids = torch.randint(0, native.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))

    reference = forward_backward(native, input_ids)
    out = forward_backward(autoep, input_ids)

    assert_same_outputs(out, reference)
    assert reference.out.aux_loss.item() > 0
    if native.config.uses_expert_bias:
        torch.testing.assert_close(out.expert_bias, reference.expert_bias, rtol=0, atol=0)
    if training:
        assert_same_tensors(in_native_names(autoep, grads=True), native_params(native, grads=True), atol=1e-6)


@pytest.mark.parametrize("overrides", CASES.values(), ids=CASES.keys())
def test_autoep_detects_only_the_moe_blocks(tiny_model, overrides):
    model = tiny_model(**DROPLESS, moe_backend="autoep", **overrides)
    specs = AutoEP(model, parse_autoep_config({"enabled": True, **autoep_layer_settings(model.config)})).ep_parser()

    config = model.config
    assert [spec.moe_module_name for spec in specs] == ["model.layers.1.mlp", "model.layers.2.mlp"]  # 0 is dense
    for spec in specs:
        assert (spec.num_experts, spec.top_k) == (config.num_experts, config.num_experts_per_tok)
        assert (spec.hidden_size, spec.ffn_hidden_size) == (config.hidden_size, config.moe_intermediate_size)
        assert (spec.score_func, spec.score_apply, spec.expert_activation) == (config.router_score_func, "post",
                                                                               "swiglu")
        assert spec.route_norm is config.norm_topk  # default: DeepSpeed's gates renormalize top-2 and top-k
        assert spec.route_scale == config.router_scaling_factor
        assert (spec.num_expert_groups, spec.num_limited_groups) == (config.router_n_group, config.router_topk_group)
        assert spec.e_score_correction_bias_path == ("gate" if config.uses_expert_bias else None)
        assert spec.has_shared_experts is (config.num_shared_experts > 0)
        assert spec.expert_storage == "fused_3d" and spec.expert_w3_name is None


@pytest.mark.parametrize("overrides", CASES.values(), ids=CASES.keys())
def test_autoep_replacement_computes_what_the_block_computed(tiny_model, overrides):
    model = tiny_model(**DROPLESS, moe_backend="autoep", **overrides).train()
    set_expert_bias(model)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    reference = forward_backward(model, input_ids)
    reference_grads = {name: grad.clone() for name, grad in in_native_names(model, grads=True).items()}

    replace_with_autoep(model)
    out = forward_backward(model, input_ids)  # the router state must now follow AutoEP's router.gate

    assert [type(layer.mlp) for layer in model.model.layers[1:]] == [AutoEPMoELayer] * 2
    if model.config.uses_expert_bias:  # AutoEP copied the bias into its router, which now routes with it
        assert all(layer.expert_bias_owner() is layer.mlp.router for layer in model.moe_layers())
        torch.testing.assert_close(out.expert_bias, reference.expert_bias, rtol=0, atol=0)
    assert_same_outputs(out, reference)
    assert_same_tensors(in_native_names(model, grads=True), reference_grads, atol=1e-6)


def test_autoep_gradient_checkpointing_gives_same_loss_and_grads(tiny_model):
    model = tiny_model(**DROPLESS, moe_backend="autoep", num_experts_per_tok=2).train()
    input_ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    reference = forward_backward(model, input_ids)
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    out = forward_backward(model, input_ids)

    assert_same_outputs(out, reference)
    assert_same_tensors({name: p.grad for name, p in model.named_parameters()}, grads, atol=1e-7)


def test_autoep_generate_with_and_without_cache_agree_and_round_trips(tiny_model, tmp_path):
    model = tiny_model(**DROPLESS, moe_backend="autoep", num_experts_per_tok=2)
    input_ids = torch.randint(1, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))

    def greedy(m, use_cache):
        return m.generate(input_ids, max_new_tokens=6, do_sample=False, use_cache=use_cache, pad_token_id=0)

    assert torch.equal(greedy(model, True), greedy(model, False))
    model.save_pretrained(tmp_path)
    loaded = MoeForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.moe_backend == "autoep"
    assert torch.equal(greedy(loaded, True), greedy(model, True))


# --- configuration ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(moe_backend="tutel"), "moe_backend='tutel' must be one of"),
        (dict(moe_backend="autoep", noisy_gate_policy="Jitter"),
         "noisy_gate_policy not supported by moe_backend='autoep'.*set noisy_gate_policy=null, or use "
         "moe_backend='deepspeed'"),
        (dict(moe_backend="autoep", use_residual=True, noisy_gate_policy="Jitter"),
         "noisy_gate_policy and use_residual not supported.*set noisy_gate_policy=null and use_residual=false"),
    ],
)
def test_config_rejects_native_only_settings_with_autoep(tiny_config, overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(drop_tokens=False, **overrides)


def test_config_warns_that_autoep_ignores_token_dropping(tiny_config):
    with pytest.warns(UserWarning, match=r"dropless top-k routing, so \['drop_tokens'\]"):
        tiny_config(moe_backend="autoep", drop_tokens=True)


def test_backend_rules_come_from_the_capability_table(monkeypatch):
    with pytest.raises(ValueError, match="zero.stage=3 is not supported by DeepSpeed's native MoE layers"):
        validate(compose_recipe("zero.stage=3"), world_size=2, tokenizer_vocab_size=4096)
    assert mixtral_blockers(MoeConfig(num_experts=4)) == []
    monkeypatch.setitem(MOE_BACKENDS, "deepspeed", replace(MOE_BACKENDS["deepspeed"], zero3=True, mixtral_export=False))
    validate(compose_recipe("zero.stage=3"), world_size=2, tokenizer_vocab_size=4096)
    assert mixtral_blockers(MoeConfig(num_experts=4)) == ["moe_backend='deepspeed'"]


def test_deepspeed_config_enables_autoep_only_for_the_autoep_backend():
    assert "expert_parallel" not in load_recipe(["parallel.ep_size=2"], world_size=4).deepspeed

    recipe = load_recipe(["model.moe_backend=autoep", "model.drop_tokens=false", "model.num_shared_experts=1",
                          "parallel.ep_size=2", "zero.stage=3"], world_size=4)
    expert_parallel = recipe.deepspeed["expert_parallel"]
    assert expert_parallel["enabled"] is True and expert_parallel["autoep_size"] == 2
    assert expert_parallel["use_grouped_mm"] is True  # CPU, or bf16 on CUDA
    assert expert_parallel["shared_experts_pattern"] == "shared_experts" and expert_parallel["route_norm"] is True
    assert parse_autoep_config(expert_parallel).moe_layer_pattern == r"model\.layers\.\d+\.mlp"
    # No preset: the presets' adapters break on transformers 5.23.0; the custom patterns take the default adapter.
    assert "preset_model" not in expert_parallel


def test_zero3_needs_the_autoep_backend():
    with pytest.raises(ValueError, match="set model.moe_backend=autoep"):
        load_recipe(["zero.stage=3"], world_size=2)
    model = load_recipe(["zero.stage=3", "model.moe_backend=autoep", "model.drop_tokens=false", "parallel.ep_size=2"],
                        world_size=2).model
    assert isinstance(model, MoeConfig) and model.moe_backend == "autoep"
    # DeepSpeed's top-1 capacity floor does not exist in AutoEP's dropless layer.
    load_recipe(["model.moe_backend=autoep", "model.drop_tokens=false", "model.num_experts_per_tok=1",
                 "trainer.micro_batch_size=1", "data.seq_len=2"], world_size=1)


# --- GPU: the grouped-GEMM paths (bf16) and the expert loop (fp32) on CUDA ----------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_backends_agree_on_cuda(tiny_model, dtype):
    native, autoep = (m.to("cuda", dtype).train() for m in both_backends(tiny_model, num_shared_experts=1))
    input_ids = torch.randint(0, native.config.vocab_size, (4, 32), device="cuda")
    reference = forward_backward(native, input_ids)
    out = forward_backward(autoep, input_ids)
    tolerance = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.out.lm_loss, reference.out.lm_loss, **tolerance)

    replace_with_autoep(autoep)  # AutoEP's GroupedExperts: torch grouped GEMM (Triton below sm90) on CUDA
    replaced = forward_backward(autoep, input_ids)
    torch.testing.assert_close(replaced.out.lm_loss, out.out.lm_loss, **tolerance)
    assert torch.equal(replaced.routing.received_LE, out.routing.received_LE)


def test_only_the_native_backend_needs_deepspeed():
    """moe_model imports, and builds and runs the autoep block, where DeepSpeed cannot be imported (an export's
    remote code); the native backend says what to install or switch to."""
    script = """
import sys
sys.modules["deepspeed"] = None  # `import deepspeed` fails, as where it is not installed
import torch
from moe_model import MoeConfig, MoeForCausalLM
config = dict(vocab_size=64, hidden_size=32, moe_intermediate_size=16, num_experts=4, drop_tokens=False)
model = MoeForCausalLM(MoeConfig(moe_backend="autoep", **config)).eval()
assert model.generate(torch.ones(1, 4, dtype=torch.long), max_new_tokens=3, do_sample=False).shape == (1, 7)
try:
    MoeForCausalLM(MoeConfig(**config))
except ImportError as error:
    print(error)
"""
    proc = run_command([sys.executable, "-c", script])
    assert "moe_backend='deepspeed' builds DeepSpeed's MoE layers: install deepspeed" in proc.stdout
