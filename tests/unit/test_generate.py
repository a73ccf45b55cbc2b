"""Greedy generate() with the KV cache gives the tokens of generate() without it, for every shipped model config and
both MoE backends, on whatever transformers is installed (CI: the pinned lower bound). transformers 5.24 renamed the
cache from `past_key_values` to `cache`; run this file on the newest supported version too (README, Tests):

    /tmp/v525/bin/python -m pytest -q tests/unit/test_generate.py
"""

import copy

import pytest
import torch

from moe_model import MoeConfig, MoeForCausalLM
from moe_model.modeling_moe import CACHE_NAME
from moe_recipe.config import CONF_DIR, moe_config_kwargs
from moe_recipe.recipe import load_recipe


def greedy(model, input_ids, use_cache, attention_mask=None, max_new_tokens=6):
    return model.generate(
        input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=False, use_cache=use_cache,
        pad_token_id=0,
    )


def test_the_cache_goes_in_and_out_under_either_name(tiny_model):
    """The forward takes the cache as `cache` (transformers >= 5.24) or `past_key_values` (5.23), returns it under the
    installed version's name, and generate() keeps filling the one cache: a forward that ignored the name generate()
    passes would start an empty cache at every step and decode from the last token alone."""
    model = tiny_model(drop_tokens=False)
    input_ids = torch.randint(1, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full_BSV = model(input_ids).logits
        prefix = model(input_ids[:, :6], use_cache=True)
        assert getattr(prefix, CACHE_NAME).get_seq_length() == 6
        for name in ("cache", "past_key_values"):
            step = model(input_ids[:, 6:], **{name: copy.deepcopy(getattr(prefix, CACHE_NAME))})
            torch.testing.assert_close(step.logits, full_BSV[:, 6:], rtol=1e-5, atol=1e-5, msg=name)
            assert getattr(step, CACHE_NAME).get_seq_length() == 8
    result = model.generate(input_ids, max_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    assert getattr(result, CACHE_NAME).get_seq_length() == 8 + 4 - 1  # the last token is never fed back


@pytest.mark.parametrize("k", [2, 3])
def test_generate_with_and_without_cache_agree(tiny_model, k):
    # drop_tokens=False: with a capacity, routing would depend on how many tokens one forward sees.
    model = tiny_model(num_experts_per_tok=k, drop_tokens=False)
    torch.manual_seed(1)
    input_ids = torch.randint(1, model.config.vocab_size, (2, 8))
    assert torch.equal(greedy(model, input_ids, True), greedy(model, input_ids, False))

    # Left padding: row 0 holds 3 pads then the 5 tokens of `short`.
    short = input_ids[:1, 3:]
    padded = input_ids.clone()
    padded[0, :3] = 0
    attention_mask = torch.ones_like(padded)
    attention_mask[0, :3] = 0
    with_cache = greedy(model, padded, True, attention_mask)
    assert torch.equal(with_cache, greedy(model, padded, False, attention_mask))
    assert torch.equal(with_cache[0, 3:], greedy(model, short, True)[0])  # the pads change nothing
    assert torch.equal(with_cache[1], greedy(model, input_ids[1:], True)[0])


def test_generate_top1_single_sequence_with_cache(tiny_model):
    model = tiny_model(num_experts_per_tok=1, drop_tokens=False)  # min_capacity=4, the config default
    input_ids = torch.randint(1, model.config.vocab_size, (1, 8))
    assert torch.equal(greedy(model, input_ids, True), greedy(model, input_ids, False))


SHIPPED_MODELS = sorted(path.stem for path in (CONF_DIR / "model").glob("*.yaml"))
SMALL_SHAPE = dict(vocab_size=128, hidden_size=32, intermediate_size=32, moe_intermediate_size=16,
                   num_attention_heads=4, head_dim=None, max_position_embeddings=64, initializer_range=0.2)


def shrunk_model(name: str, moe_backend: str) -> MoeForCausalLM:
    """conf/model/NAME at a CPU size: its routing (experts, top-k, scores, groups, bias, capacity settings), shared
    experts and dense-layer layout as shipped; a few layers (the dense ones first) and small widths."""
    shipped = load_recipe([f"model={name}"], world_size=1, require_tokenizer=False).config.model
    arguments = moe_config_kwargs(shipped)
    num_layers = arguments["first_k_dense_replace"] + 2 * arguments["moe_layer_freq"]
    kv_heads = 4 if arguments["num_key_value_heads"] == arguments["num_attention_heads"] else 2
    backend = {"moe_backend": moe_backend}
    if moe_backend == "autoep":  # dropless: the capacity settings do not apply (and would warn)
        backend.update(drop_tokens=False, top2_2nd_expert_sampling=False)
    mla = dict(q_lora_rank=arguments["q_lora_rank"] and 24, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
               v_head_dim=8, num_key_value_heads=4) if arguments["attention"] == "mla" else {}
    config = MoeConfig(**{**arguments, **SMALL_SHAPE, "num_hidden_layers": num_layers, "num_key_value_heads": kv_heads,
                          **backend, **mla})
    torch.manual_seed(0)
    model = MoeForCausalLM(config).eval()
    if config.uses_expert_bias:  # as after training: a bias that changes choices
        for layer in model.moe_layers():
            layer.expert_bias_owner().e_score_correction_bias.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("moe_backend", ["deepspeed", "autoep"])
@pytest.mark.parametrize("name", SHIPPED_MODELS)
def test_generate_with_and_without_cache_agree_for_every_shipped_model_config(name, moe_backend):
    """Greedy decoding with the KV cache runs the MoE layers on one token at a time, without it on the whole prefix:
    they agree because inference never drops and routes each token on its own. The autoep block is also what a
    `moe-export --format hf` folder runs."""
    model = shrunk_model(name, moe_backend)
    input_ids = torch.randint(1, model.config.vocab_size, (3, 8), generator=torch.Generator().manual_seed(1))
    assert torch.equal(greedy(model, input_ids, True), greedy(model, input_ids, False))
