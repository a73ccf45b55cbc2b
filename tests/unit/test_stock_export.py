"""Stock-architecture exports (moe_recipe/stock_export.py): each shipped model config, shrunk to a CPU size, exported
to the transformers class it claims to be, gives this model's logits (max abs diff < 1e-4, fp32) and greedy
generation; a config the class cannot compute is refused with the reason."""

import re

import pytest
import torch
from huggingface_hub import save_torch_state_dict
from transformers import AutoModelForCausalLM

from moe_model import MoeConfig, MoeForCausalLM
from moe_recipe.config import moe_config_kwargs
from moe_recipe.recipe import load_recipe
from moe_recipe.stock_export import STOCK_FORMATS, rope_rows_to_interleaved, to_stock

SMALL_SHAPE = dict(vocab_size=128, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                   num_attention_heads=4, max_position_embeddings=64, initializer_range=0.1, drop_tokens=False)
SMALL_MLA = dict(q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12)


def shrunk(model_name: str, **overrides) -> MoeConfig:
    """The shipped conf/model config's architecture and routing (attention kind, qk_norm, shared experts, dense
    layers first, scores, top-k, groups, bias, scaling) at a CPU size: the dense layers and two MoE layers."""
    arguments = moe_config_kwargs(load_recipe([f"model={model_name}"], world_size=1,
                                              require_tokenizer=False).config.model)
    shape = {**SMALL_SHAPE, "num_hidden_layers": arguments["first_k_dense_replace"] + 2,
             "num_experts": 8, "num_experts_per_tok": 2}
    if arguments["head_dim"] is not None:
        shape["head_dim"] = 16  # wider than hidden / heads, as Qwen3's
    if arguments["router_n_group"] is not None:
        shape.update(router_n_group=4, router_topk_group=2)
    if arguments["attention"] == "mla":
        shape.update(SMALL_MLA, num_key_value_heads=4)
    else:
        shape["num_key_value_heads"] = 2
    return MoeConfig(**{**arguments, **shape, **overrides})


def trained_like(config: MoeConfig) -> MoeForCausalLM:
    torch.manual_seed(0)
    model = MoeForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # norms away from 1, so that a misplaced scale shows
                p.uniform_(0.5, 1.5)
        if config.uses_expert_bias:  # as after training: a bias that changes choices
            for layer in model.moe_layers():
                layer.expert_bias_owner().e_score_correction_bias.normal_(0, 0.05)
    return model


def export_and_load(model: MoeForCausalLM, fmt: str, folder):
    config, weights = to_stock(fmt, model.config, {k: v.clone() for k, v in model.state_dict().items()})
    save_torch_state_dict(weights, str(folder), safe_serialization=True)
    config.save_pretrained(folder)
    stock = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(stock).__name__ == STOCK_FORMATS[fmt].architecture
    return stock


@pytest.mark.parametrize("fmt, model_name", [
    ("mixtral", "mixtral_8x7b"),
    ("qwen3_moe", "qwen3_moe"),
    ("qwen2_moe", "deepseek_moe_16b"),  # shared experts, a dense first layer, softmax without renormalisation
    ("deepseek_v3", "deepseek_v3"),  # MLA, 3 dense layers, shared expert, sigmoid, bias, groups, scaling 2.5
])
def test_stock_export_gives_this_models_logits(fmt, model_name, tmp_path):
    model = trained_like(shrunk(model_name))
    assert STOCK_FORMATS[fmt].blockers(model.config) == []
    stock = export_and_load(model, fmt, tmp_path)
    input_ids = torch.randint(1, 128, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(input_ids).logits, stock(input_ids).logits
    assert (ours - theirs).abs().max() < 1e-4
    generate = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(input_ids, **generate), stock.generate(input_ids, **generate))


def test_deepseek_v3_export_has_deepseeks_layout(tmp_path):
    """Interleaved RoPE (rope_interleave, as DeepSeek's checkpoints) and its config: the rotated rows are permuted
    on the way out, the rest is copied."""
    assert torch.equal(rope_rows_to_interleaved(torch.arange(8)), torch.tensor([0, 4, 1, 5, 2, 6, 3, 7]))
    config = shrunk("deepseek_v3", q_lora_rank=None, router_expert_bias=False, router_n_group=None,
                    router_topk_group=None)  # a direct query projection; no bias (exported as zeros), no groups
    model = trained_like(config)
    stock = export_and_load(model, "deepseek_v3", tmp_path)
    assert stock.config.rope_interleave and stock.config.first_k_dense_replace == 3
    assert stock.config.n_routed_experts == 8 and stock.config.routed_scaling_factor == 2.5
    input_ids = torch.randint(1, 128, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model(input_ids).logits - stock(input_ids).logits).abs().max() < 1e-4


@pytest.mark.parametrize("fmt, model_name, overrides, reason", [
    ("mixtral", "qwen3_moe", {}, "qk_norm=True (Mixtral has no norm on q and k)"),
    ("mixtral", "deepseek_v3", {}, "attention='mla' (Mixtral has grouped-query attention)"),
    ("qwen3_moe", "mixtral_8x7b", {}, "qk_norm=False (Qwen3-MoE normalises each head of q and k"),
    ("qwen3_moe", "qwen3_moe", {"num_shared_experts": 1}, "shared experts (num_shared_experts=1"),
    ("qwen3_moe", "qwen3_moe", {"router_scaling_factor": 2.0}, "router_scaling_factor=2.0"),
    ("qwen2_moe", "mixtral_8x7b", {}, "no shared expert (Qwen2-MoE always has one"),
    ("qwen2_moe", "deepseek_moe_16b", {"router_score_func": "sigmoid"}, "router_score_func='sigmoid'"),
    ("qwen2_moe", "deepseek_moe_16b", {"router_balance": "none", "router_expert_bias": True}, "the expert bias"),
    ("deepseek_v3", "qwen3_moe", {}, "attention='gqa' (DeepSeek-V3 has Multi-head Latent Attention"),
    ("deepseek_v3", "deepseek_v3", {"num_shared_experts": 0}, "no shared expert (DeepSeek-V3 always has one)"),
    ("deepseek_v3", "deepseek_v3", {"router_score_func": "softmax"}, "router_score_func='softmax'"),
    ("deepseek_v3", "deepseek_v3", {"moe_layer_freq": 2, "first_k_dense_replace": 0}, "moe_layer_freq=2"),
    ("deepseek_v3", "deepseek_v3", {"rms_norm_eps": 1e-5}, "rms_norm_eps=1e-05"),
])
def test_stock_export_refuses_what_the_class_cannot_compute(fmt, model_name, overrides, reason):
    config = shrunk(model_name, **overrides)
    with pytest.raises(ValueError, match=f"--format {fmt} .*{re.escape(reason)}"):
        to_stock(fmt, config, {})
