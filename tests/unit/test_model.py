"""MoeConfig validation, layer interleaving, expert init, save/load, gradient checkpointing and the noisy-gating
options of the MoE causal LM, on tiny configs in one CPU process (generation: test_generate.py)."""

import json
import warnings

import pytest
import torch
import torch.distributed as dist

import moe_model  # noqa: F401  (registers the Auto classes)
from moe_model import MoeConfig, MoeForCausalLM
from moe_model.modeling_moe import CACHE_NAME
from moe_model.moe_blocks import MoeMLP, MoeSparseBlock
from transformers import AutoModelForCausalLM

EXPERTS_KEY = ".deepspeed_experts."


def expert_weights(model: MoeForCausalLM) -> dict[tuple[int, int, str], torch.Tensor]:
    """{(layer, local expert, projection): weight} over all MoE layers."""
    weights = {}
    for layer_idx, layer in enumerate(model.model.layers):
        if layer.is_moe:
            for e, expert in enumerate(layer.mlp.moe.deepspeed_moe.experts.deepspeed_experts):
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    weights[layer_idx, e, proj] = getattr(expert, proj).weight
    return weights


# --- config validation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_experts=4, num_experts_per_tok=5), "num_experts_per_tok=5"),
        (dict(num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads=3"),
        (dict(head_dim=7), "head_dim=7 must be even"),
        (dict(num_hidden_layers=2, first_k_dense_replace=2), "first_k_dense_replace / moe_layer_freq"),
        (dict(num_hidden_layers=2, first_k_dense_replace=1, moe_layer_freq=2), "no layer is an MoE layer"),
        (dict(noisy_gate_policy="Gumbel"), "noisy_gate_policy='Gumbel'"),
        (dict(noisy_gate_policy="RSample", num_experts_per_tok=2), "noisy_gate_policy='RSample'"),
        (dict(first_k_dense_replace=3), "first_k_dense_replace=3"),
        (dict(num_experts=0), "num_experts=0 must be >= 1"),
        (dict(attention="mqa"), "attention='mqa' must be one of"),
        (dict(attention="mla", qk_norm=True), "qk_norm=true is for attention='gqa'"),
        (dict(attention="mla", qk_rope_head_dim=7), "qk_rope_head_dim=7 must be even"),
        (dict(attention="mla", kv_lora_rank=0), "kv_lora_rank=0 must be >= 1"),
        (dict(attention="mla", q_lora_rank=0), "q_lora_rank=0 must be >= 1, or null"),
    ],
)
def test_config_rejects_bad_settings_naming_the_field(tiny_config, overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


@pytest.mark.parametrize(
    "overrides",
    [dict(noisy_gate_policy="RSample", num_experts_per_tok=1), dict(noisy_gate_policy="Jitter"),
     dict(noisy_gate_policy="None"), dict(num_experts_per_tok=4)],
)
def test_config_accepts_valid_settings(tiny_config, overrides):
    tiny_config(**overrides)


@pytest.mark.parametrize("ep_size, ep_rank, message", [(3, 0, "num_experts=4 is not divisible by ep_size=3"),
                                                     (2, 2, r"ep_rank=2 must lie in \[0, ep_size=2\)")])
def test_model_rejects_a_layout_that_does_not_fit(tiny_config, ep_size, ep_rank, message):
    with pytest.raises(ValueError, match=message):
        MoeForCausalLM(tiny_config(), ep_size=ep_size, ep_rank=ep_rank)


@pytest.mark.parametrize("key, value", [("ep_size", 2), ("eval_capacity_factor", 2.0)])
def test_old_config_with_a_removed_setting_loads_without_it(tiny_config, key, value):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # silently
        config = MoeConfig.from_dict({**tiny_config().to_dict(), key: value})
    assert not hasattr(config, key) and key not in config.to_dict()


# --- interleaving -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_layers, moe_layer_freq, first_k_dense_replace, moe_layers",
    [(4, 1, 0, [0, 1, 2, 3]), (4, 2, 0, [0, 2]), (4, 1, 1, [1, 2, 3]), (4, 2, 1, [2]), (3, 1, 2, [2])],
)
def test_dense_and_moe_layers_interleave(tiny_model, num_layers, moe_layer_freq, first_k_dense_replace, moe_layers):
    model = tiny_model(
        num_hidden_layers=num_layers, moe_layer_freq=moe_layer_freq, first_k_dense_replace=first_k_dense_replace
    )
    assert model.config.moe_layer_indices == moe_layers
    for i, layer in enumerate(model.model.layers):
        assert layer.is_moe == (i in moe_layers)
        assert isinstance(layer.mlp, MoeSparseBlock if i in moe_layers else MoeMLP)

    out = model.train()(torch.randint(0, model.config.vocab_size, (2, 8)), output_router_logits=True)
    routing = model.routing_metrics()
    L, E = len(moe_layers), model.config.num_experts
    assert routing.received_LE.shape == routing.demand_LE.shape == (L, E)
    assert routing.dropped_L.shape == (L,) and routing.forwards == 1
    assert routing.demand_LE.sum(1).tolist() == [2 * 8 * model.config.num_experts_per_tok] * L
    assert len(out.router_logits) == L and out.router_logits[0].shape == (2 * 8, E)
    assert model(torch.randint(0, model.config.vocab_size, (2, 8))).router_logits is None  # only when asked for


# --- expert init ------------------------------------------------------------------------------------------------


def test_same_seed_gives_same_weights_and_other_seed_differs(tiny_model):
    a, b, c = tiny_model(seed=0), tiny_model(seed=0), tiny_model(seed=1)
    sd_a, sd_b, sd_c = a.state_dict(), b.state_dict(), c.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for name in sd_a:
        assert torch.equal(sd_a[name], sd_b[name]), name
    assert not torch.equal(sd_a["model.embed_tokens.weight"], sd_c["model.embed_tokens.weight"])
    assert not any(torch.equal(w, expert_weights(c)[key]) for key, w in expert_weights(a).items())


def test_experts_start_distinct(tiny_model):
    model = tiny_model(num_experts=8)
    weights = expert_weights(model)
    values = list(weights.values())
    # Every projection of every expert in every layer is its own draw (DeepSpeed deep-copies one expert).
    for i in range(len(values)):
        for j in range(i + 1, len(values)):
            assert values[i].shape != values[j].shape or not torch.equal(values[i], values[j])
    std = model.config.initializer_range
    for w in values:
        assert abs(w.std().item() - std) < 0.2 * std


@pytest.mark.parametrize("ep_size", [2, 4])
def test_expert_init_independent_of_ep_size(tiny_model, ep_size):
    """Global expert i starts from the same tensor whatever ep_size is, and other weights do not change.

    Every rank's shard is built in this one process, without torch.distributed: the layout is an argument of the
    model. The real multi-process equivalence lives in tests/distributed.
    """
    E = 8
    reference = tiny_model(num_experts=E).state_dict()
    local = E // ep_size
    seen_experts = set()
    for ep_rank in range(ep_size):
        shard = tiny_model(num_experts=E, ep_size=ep_size, ep_rank=ep_rank).state_dict()
        for name, tensor in shard.items():
            if EXPERTS_KEY in name:
                prefix, rest = name.split(EXPERTS_KEY)
                local_id, proj = rest.split(".", 1)
                global_id = ep_rank * local + int(local_id)
                seen_experts.add((prefix, global_id, proj))
                name = f"{prefix}{EXPERTS_KEY}{global_id}.{proj}"
            assert torch.equal(tensor, reference[name]), name
    assert len(seen_experts) == sum(EXPERTS_KEY in name for name in reference)
    assert not dist.is_initialized()


def test_ep_rank_1_of_2_holds_global_experts_2_and_3(tiny_model):
    reference = tiny_model(num_experts=4).state_dict()
    shard = tiny_model(num_experts=4, ep_size=2, ep_rank=1).state_dict()
    for layer in range(2):
        prefix = f"model.layers.{layer}.mlp.moe.deepspeed_moe.experts{EXPERTS_KEY}"
        assert not any(name.startswith(f"{prefix}2") for name in shard)  # two local experts only
        for local_id, global_id in ((0, 2), (1, 3)):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert torch.equal(shard[f"{prefix}{local_id}.{proj}.weight"],
                                   reference[f"{prefix}{global_id}.{proj}.weight"])


# --- save / load ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_save_pretrained_round_trip(tiny_model, tmp_path, tie):
    model = tiny_model(tie_word_embeddings=tie, drop_tokens=False)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert "ep_size" not in json.loads((tmp_path / "config.json").read_text())
    assert not list(tmp_path.glob("*.bin"))

    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    loaded.eval()

    assert isinstance(loaded, MoeForCausalLM)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tie
    sd, loaded_sd = model.state_dict(), loaded.state_dict()
    assert sd.keys() == loaded_sd.keys()
    for name in sd:
        assert torch.equal(sd[name], loaded_sd[name]), name
    input_ids = torch.randint(0, model.config.vocab_size, (2, 8))
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, loaded(input_ids).logits)


def test_from_pretrained_passes_the_layout_to_the_model_not_the_config(tiny_model, tmp_path):
    tiny_model(num_experts=4).save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, ep_size=2, ep_rank=1)
    assert (loaded.ep_size, loaded.ep_rank) == (2, 1)
    assert not hasattr(loaded.config, "ep_size")
    assert {local for _, local, _ in expert_weights(loaded)} == {0, 1}
    assert not dist.is_initialized()


# --- attention variants: generation with the cache (the rest is in test_generate.py) ---------------------------


def greedy(model, input_ids, use_cache, attention_mask=None):
    return model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False,
                          use_cache=use_cache, pad_token_id=0)


@pytest.mark.parametrize("attention", [
    dict(qk_norm=True),
    dict(attention="mla", num_key_value_heads=4),  # queries projected directly
    dict(attention="mla", num_key_value_heads=4, q_lora_rank=24, qk_nope_head_dim=0, v_head_dim=8),
])
def test_generate_with_and_without_cache_agree_for_either_attention(tiny_model, attention):
    """MLA's cache holds the normalised latent and the rotated shared key; decoding one token at a time from it gives
    the whole prefix's result. Left padding changes nothing either."""
    model = tiny_model(drop_tokens=False, **attention)
    input_ids = torch.randint(1, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    assert torch.equal(greedy(model, input_ids, True), greedy(model, input_ids, False))
    padded, attention_mask = input_ids.clone(), torch.ones_like(input_ids)
    padded[0, :3], attention_mask[0, :3] = 0, 0
    assert torch.equal(greedy(model, padded, True, attention_mask)[0, 3:], greedy(model, input_ids[:1, 3:], True)[0])


def test_mla_has_deepseek_v3s_weights_and_cache(tiny_model):
    model = tiny_model(attention="mla", num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8,
                       qk_nope_head_dim=12, v_head_dim=10)
    shapes = {name.removeprefix("model.layers.0.self_attn."): tuple(p.shape)
              for name, p in model.named_parameters() if name.startswith("model.layers.0.self_attn.")}
    H, D = 4, 32
    assert shapes == {"q_a_proj.weight": (24, D), "q_a_layernorm.weight": (24,), "q_b_proj.weight": (H * 20, 24),
                      "kv_a_proj_with_mqa.weight": (16 + 8, D), "kv_a_layernorm.weight": (16,),
                      "kv_b_proj.weight": (H * (12 + 10), 16), "o_proj.weight": (D, H * 10)}
    attn = model.model.layers[0].self_attn
    # Initialised as every Linear and norm: normal(0, initializer_range) weights, unit norm scales.
    assert torch.equal(attn.kv_a_layernorm.weight, torch.ones(16))
    assert abs(attn.kv_b_proj.weight.std().item() - model.config.initializer_range) < 0.005
    out = model(torch.randint(1, 128, (2, 5)), use_cache=True)
    keys, values = getattr(out, CACHE_NAME).layers[0].keys, getattr(out, CACHE_NAME).layers[0].values
    assert keys.shape == (2, 1, 5, 16) and values.shape == (2, 1, 5, 8)  # the latent and the shared rotated key


# --- gradient checkpointing -------------------------------------------------------------------------------------


def loss_and_grads(model, input_ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids, labels=input_ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("k", [1, 2, 3])
def test_gradient_checkpointing_gives_same_loss_and_grads(tiny_model, k):
    model = tiny_model(num_experts_per_tok=k, router_aux_loss_coef=0.1, router_z_loss_coef=0.01).train()
    torch.manual_seed(1)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 8))

    loss, grads = loss_and_grads(model, input_ids)
    routing = model.routing_metrics()
    model.gradient_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    loss_ckpt, grads_ckpt = loss_and_grads(model, input_ids)
    # The recomputation in backward runs the layers' forwards again; the routers count one forward all the same.
    routing_ckpt = model.routing_metrics()
    assert routing.forwards == routing_ckpt.forwards == 1
    assert torch.equal(routing_ckpt.demand_LE, routing.demand_LE)
    assert torch.equal(routing_ckpt.aux_loss_L, routing.aux_loss_L)

    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    assert grads.keys() == grads_ckpt.keys()
    assert any(name.endswith("gate.wg.weight") for name in grads)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)


# --- noisy gating -----------------------------------------------------------------------------------------------

NOISY = {
    "top1-jitter": dict(num_experts_per_tok=1, noisy_gate_policy="Jitter"),
    "top1-rsample": dict(num_experts_per_tok=1, noisy_gate_policy="RSample"),
    "top1-rts": dict(num_experts_per_tok=1, use_rts=True),
    "top2-jitter": dict(num_experts_per_tok=2, noisy_gate_policy="Jitter"),
    "top2-sampled-2nd": dict(num_experts_per_tok=2, top2_2nd_expert_sampling=True),
    "top3-jitter": dict(num_experts_per_tok=3, noisy_gate_policy="Jitter"),
}


@pytest.mark.parametrize("overrides", NOISY.values(), ids=NOISY.keys())
def test_noisy_gating_trains_and_is_deterministic_in_eval(tiny_model, overrides):
    # initializer_range 0.2: peaked routing and visible expert outputs, so noise shows in the logits.
    model = tiny_model(initializer_range=0.2, capacity_factor=1.0, **overrides)
    torch.manual_seed(1)
    input_ids = torch.randint(0, model.config.vocab_size, (4, 8))

    model.train()
    train_logits = []
    for seed in (10, 11):
        torch.manual_seed(seed)
        out = model(input_ids, labels=input_ids)
        out.loss.backward()
        assert torch.isfinite(out.loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        train_logits.append(out.logits.detach())
    assert not torch.equal(*train_logits), "the noise option had no effect in training"

    model.eval()
    with torch.no_grad():
        torch.manual_seed(10)
        first = model(input_ids).logits
        torch.manual_seed(11)
        second = model(input_ids).logits
        # In eval the same weights without any noise option give the same logits.
        clean = tiny_model(initializer_range=0.2, capacity_factor=1.0,
                           num_experts_per_tok=overrides["num_experts_per_tok"])
        clean.load_state_dict(model.state_dict())
        reference = clean(input_ids).logits
    assert torch.equal(first, second)
    assert torch.equal(first, reference)
