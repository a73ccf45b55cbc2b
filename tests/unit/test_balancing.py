"""Router scoring and load balancing against small references written from the papers' formulas, one token and one
expert at a time: sigmoid / softmax scores, the expert bias (DeepSeek-V3, arXiv 2412.19437, eqs. 16-17 and
section 2.1.2), group-limited routing (DeepSeek-V3's node-limited routing), top-k normalisation and the routed
scaling factor; the global-batch balancing loss (Switch Transformer's loss with the fractions of the whole batch:
Qwen, arXiv 2501.11873), DeepSeek-V3's sequence-wise loss (eqs. 17-20) and the bias update rule. Then the model
around them: the losses it adds, what the bias does and does not touch, and inference that never drops.

Shape legend: B batch, S sequence, T tokens, E experts, k experts per token, L MoE layers.
"""

import itertools
import json
import math
import re

import pytest
import torch

from moe_model import MoeConfig, configuration_moe
from moe_model.configuration_moe import ROUTER_BALANCES, MoeConfigError, upgrade_config_dict
from moe_model.moe_blocks import MoeGate, MoeSparseBlock
from moe_model.routing import expert_bias_delta, global_balancing_loss, route_tokens, sequence_balancing_loss

WIDE_INIT = dict(initializer_range=0.2)  # peaked routers and O(1) expert outputs: tolerances mean something


def reference_route(logits_E: list[float], *, score_func: str, k: int, bias: list[float] | None = None,
                    n_group: int | None = None, topk_group: int | None = None, normalise: bool,
                    scale: float = 1.0) -> tuple[list[int], list[float]]:
    """One token, in plain Python: the chosen experts (best first) and their combine weights."""
    E = len(logits_E)
    if score_func == "sigmoid":
        scores = [1 / (1 + math.exp(-x)) for x in logits_E]
    else:
        total = sum(math.exp(x) for x in logits_E)
        scores = [math.exp(x) / total for x in logits_E]
    choice = [s + (bias[e] if bias else 0.0) for e, s in enumerate(scores)]
    eligible = list(range(E))
    if n_group:
        size = E // n_group
        group_score = [sum(sorted(choice[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(n_group)]
        groups = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
        eligible = [e for e in range(E) if e // size in groups]
    chosen = sorted(eligible, key=lambda e: -choice[e])[:k]
    weights = [scores[e] for e in chosen]  # the unbiased scores: the bias only chooses
    if normalise:
        weights = [w / sum(weights) for w in weights]
    return chosen, [w * scale for w in weights]


ROUTINGS = {
    "softmax-top2": dict(router_score_func="softmax", num_experts_per_tok=2),
    "softmax-top1-unnormalised": dict(router_score_func="softmax", num_experts_per_tok=1),
    "sigmoid-top3-normalised-scaled": dict(router_score_func="sigmoid", num_experts_per_tok=3,
                                           router_norm_topk_prob=True, router_scaling_factor=2.5),
    "sigmoid-groups-bias": dict(router_score_func="sigmoid", num_experts_per_tok=4, router_n_group=4,
                                router_topk_group=2, router_norm_topk_prob=True, router_balance="none",
                                router_expert_bias=True),
    "softmax-groups-unnormalised": dict(router_score_func="softmax", num_experts_per_tok=2, router_n_group=2,
                                        router_topk_group=1, router_norm_topk_prob=False),
}


@pytest.mark.parametrize("overrides", ROUTINGS.values(), ids=ROUTINGS.keys())
def test_route_tokens_matches_the_per_token_reference(tiny_config, overrides):
    config = tiny_config(num_experts=8, router_aux_loss_coef=0.0, **overrides)
    generator = torch.Generator().manual_seed(0)
    logits_TE = torch.randn(32, 8, generator=generator) * 2
    bias_E = torch.randn(8, generator=generator) * 0.3 if config.uses_expert_bias else None

    route = route_tokens(logits_TE, config, bias_E)

    for t in range(32):
        experts, weights = reference_route(
            logits_TE[t].tolist(), score_func=config.router_score_func, k=config.num_experts_per_tok,
            bias=None if bias_E is None else bias_E.tolist(), n_group=config.router_n_group,
            topk_group=config.router_topk_group, normalise=config.norm_topk, scale=config.router_scaling_factor)
        assert route.experts_Tk[t].tolist() == experts, t
        torch.testing.assert_close(route.weights_Tk[t], torch.tensor(weights), rtol=1e-5, atol=1e-6)
    if config.router_n_group:  # every token's experts lie in at most topk_group groups
        groups_Tk = route.experts_Tk // (8 // config.router_n_group)
        assert max(len(set(row)) for row in groups_Tk.tolist()) <= config.router_topk_group


def test_the_bias_changes_the_choice_but_not_the_weights(tiny_config):
    config = tiny_config(num_experts=8, num_experts_per_tok=2, router_expert_bias=True, router_balance="none",
                         router_aux_loss_coef=0.0, router_norm_topk_prob=False)
    logits_TE = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    bias_E = torch.zeros(8)
    bias_E[5] = 10.0  # expert 5 wins every choice

    route = route_tokens(logits_TE, config, bias_E)

    assert (route.experts_Tk[:, 0] == 5).all()
    torch.testing.assert_close(route.weights_Tk[:, 0], torch.softmax(logits_TE, -1)[:, 5])


def test_global_loss_is_the_switch_loss_of_the_whole_batch():
    """Two 'ranks' holding halves of a batch: each computes its loss with the whole batch's route fractions and its
    own mean scores; their mean is the Switch loss E/k * sum_i f_i P_i of the whole batch (what data parallelism
    averages the gradient over), and the gradient of that mean is the whole batch's gradient."""
    E, k = 6, 2
    generator = torch.Generator().manual_seed(0)
    logits_TE = torch.randn(20, E, generator=generator, requires_grad=True)
    probs_TE = torch.softmax(logits_TE, -1)
    experts_Tk = probs_TE.topk(k, -1).indices
    f = [sum(int(e in row) for row in experts_Tk.tolist()) / 20 for e in range(E)]  # routes to e per token
    P = probs_TE.mean(0)
    whole = E / k * sum(f[e] * P[e] for e in range(E))
    (whole_grad,) = torch.autograd.grad(whole, logits_TE, retain_graph=True)

    whole_batch_counts = torch.tensor([f[e] * 20 for e in range(E)] + [20.0])
    halves = []
    for half in (slice(0, 10), slice(10, 20)):
        halves.append(global_balancing_loss(probs_TE[half], experts_Tk[half],
                                            all_reduce=lambda counts: counts.copy_(whole_batch_counts)))
    mean = (halves[0] + halves[1]) / 2
    (mean_grad,) = torch.autograd.grad(mean, logits_TE)

    torch.testing.assert_close(mean, whole)
    torch.testing.assert_close(mean_grad, whole_grad)
    local = global_balancing_loss(probs_TE[:10], experts_Tk[:10])
    assert not torch.allclose(local, whole), "the test batch must route its halves differently"


def test_sequence_loss_matches_deepseek_v3():
    """L = mean over sequences of sum_i f_i P_i, f_i = E / (k S) * routes of the sequence to i, P_i = the
    sequence's mean normalised score s'_i = s_i / sum_j s_j."""
    B, S, E, k = 3, 5, 8, 2
    generator = torch.Generator().manual_seed(0)
    scores_TE = torch.sigmoid(torch.randn(B * S, E, generator=generator))
    probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True)
    experts_Tk = scores_TE.topk(k, -1).indices

    expected = 0.0
    for b in range(B):
        rows = range(b * S, (b + 1) * S)
        for i in range(E):
            f_i = E / (k * S) * sum(int(i in experts_Tk[t].tolist()) for t in rows)
            P_i = sum(probs_TE[t, i].item() for t in rows) / S
            expected += f_i * P_i / B

    assert sequence_balancing_loss(probs_TE, experts_Tk, batch_size=B).item() == pytest.approx(expected, rel=1e-6)


def test_bias_update_follows_the_sign_rule():
    """b_i <- b_i + gamma * sign(mean load - load_i): overloaded experts down, underloaded up, balanced ones stay."""
    bias_E = torch.tensor([0.0, 0.1, -0.2, 0.3])
    load_E = torch.tensor([10.0, 2.0, 4.0, 4.0])  # mean 5

    bias_E += expert_bias_delta(load_E, rate=0.01)

    torch.testing.assert_close(bias_E, torch.tensor([-0.01, 0.11, -0.19, 0.31]))
    bias_E += expert_bias_delta(torch.full((4,), 5.0), rate=0.01)
    torch.testing.assert_close(bias_E, torch.tensor([-0.01, 0.11, -0.19, 0.31]))


# --- the model around them -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("balance, expert_bias", [("aux", False), ("global", False), ("sequence", False),
                                                   ("sequence", True), ("none", True), ("none", False)])
def test_model_adds_the_configured_balancing_loss(tiny_model, balance, expert_bias):
    coef = 0.0 if balance == "none" else 0.1
    model = tiny_model(**WIDE_INIT, num_experts=8, num_experts_per_tok=2, drop_tokens=False, num_hidden_layers=3,
                       first_k_dense_replace=1, router_balance=balance, router_expert_bias=expert_bias,
                       router_aux_loss_coef=coef, router_z_loss_coef=0.01).train()
    input_ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    out = model(input_ids, labels=input_ids, output_router_logits=True)
    layer_aux_loss = model.routing_metrics().aux_loss_L  # one forward: each layer's loss

    expected_L = []
    for logits_TE, router in zip(out.router_logits, model.routers()):
        experts_Tk = route_tokens(logits_TE, model.config, router.expert_bias).experts_Tk
        probs_TE = torch.softmax(logits_TE, -1)
        if balance == "global":  # one process: the whole batch is this rank's
            expected_L.append(global_balancing_loss(probs_TE, experts_Tk))
        elif balance == "sequence":
            expected_L.append(sequence_balancing_loss(probs_TE, experts_Tk, batch_size=2))
        elif balance == "aux":
            expected_L.append(layer_aux_loss[len(expected_L)])  # DeepSpeed's, checked in test_routing.py
        else:
            expected_L.append(torch.tensor(0.0))
    torch.testing.assert_close(layer_aux_loss, torch.stack(expected_L).detach())
    torch.testing.assert_close(out.aux_loss.detach(), layer_aux_loss.sum())
    torch.testing.assert_close(out.loss, out.lm_loss + coef * out.aux_loss + 0.01 * out.z_loss)
    out.loss.backward()
    router_grads = [layer.mlp.router_weight.grad for layer in model.moe_layers()]
    assert all(grad is not None and grad.abs().sum() > 0 for grad in router_grads)
    assert model.config.uses_expert_bias is expert_bias
    if expert_bias:
        assert model.expert_bias().shape == (2, 8) and not model.expert_bias().requires_grad


def test_expert_bias_is_a_buffer_moved_only_by_the_routers_post_step(tiny_model, tmp_path):
    model = tiny_model(num_experts=8, router_balance="none", router_expert_bias=True, router_aux_loss_coef=0.0,
                       router_bias_update_rate=0.5)
    names = [name for name, _ in model.named_buffers() if name.endswith("e_score_correction_bias")]
    assert names == [f"model.layers.{i}.mlp.moe.deepspeed_moe.gate.e_score_correction_bias" for i in (0, 1)]
    assert not any("e_score_correction_bias" in name for name, _ in model.named_parameters())
    assert all(isinstance(layer.mlp.moe.deepspeed_moe.gate, MoeGate) for layer in model.moe_layers())

    load_LE = torch.tensor([[8.0, 0, 0, 0, 0, 0, 0, 0], [1.0] * 8])
    for router, load_E in zip(model.routers(), load_LE):
        router.post_step(load_E)
    expected = torch.stack([torch.tensor([-0.5] + [0.5] * 7), torch.zeros(8)])
    torch.testing.assert_close(model.expert_bias(), expected)
    input_ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    model.train()(input_ids, labels=input_ids).loss.backward()
    torch.testing.assert_close(model.expert_bias(), expected)  # the optimizer's backward leaves it alone
    assert all(router.step_demand().sum() == 2 * 8 * 2 for router in model.routers())
    model.post_step()  # one process: the step's load is this batch's
    assert not torch.equal(model.expert_bias(), expected)
    assert all(router.step_demand().sum() == 0 for router in model.routers())  # the next step counts afresh
    expected = model.expert_bias()

    model.save_pretrained(tmp_path)  # saved with the weights: a reloaded model routes with the same bias
    loaded = type(model).from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.expert_bias(), expected)

    model.to(torch.bfloat16)  # as a bf16 engine casts the buffers: the update goes back to fp32 first
    for router in model.routers():
        router.post_step(torch.ones(8))
    assert model.expert_bias().dtype == torch.float32
    assert all(layer.mlp.expert_bias.dtype == torch.float32 for layer in model.moe_layers())


@pytest.mark.parametrize("backend", ["deepspeed", "autoep"])
@pytest.mark.parametrize("routing", [
    pytest.param(dict(num_experts_per_tok=2), id="deepspeed-gate"),
    pytest.param(dict(num_experts_per_tok=1), id="deepspeed-top1-gate"),
    pytest.param(dict(num_experts_per_tok=3, router_score_func="sigmoid", router_n_group=4, router_topk_group=2,
                      router_balance="none", router_expert_bias=True), id="moe-gate"),
])
def test_eval_logits_of_a_sequence_do_not_depend_on_its_batch(tiny_model, backend, routing):
    """Trained with a capacity that drops routes, but evaluated dropless: a sequence alone gives the same logits
    as inside a batch of 8 random others."""
    coef = {"router_aux_loss_coef": 0.0} if routing.get("router_balance") == "none" else {}
    model = tiny_model(**WIDE_INIT, num_experts=8, drop_tokens=backend == "deepspeed", capacity_factor=0.5,
                       min_capacity=0, moe_backend=backend, **routing, **coef)
    input_ids = torch.randint(0, model.config.vocab_size, (9, 12), generator=torch.Generator().manual_seed(1))
    if backend == "deepspeed":
        with torch.no_grad():
            model.train()(input_ids)
            assert model.routing_metrics().dropped_L.max() > 0, "training must drop in this case"
    model.eval()

    with torch.no_grad():
        batched = model(input_ids)
        alone = model(input_ids[4:5])

    torch.testing.assert_close(alone.logits[0], batched.logits[4], rtol=1e-5, atol=1e-5)


def test_moe_gate_drops_first_choices_last_and_in_token_order(tiny_model):
    """Training with drop_tokens: GShard's priority (every token's first choice before any second choice, then
    token order), the capacity max(ceil(T k / E cf), min_capacity) and DeepSpeed's sparse route contract."""
    model = tiny_model(num_experts=4, num_experts_per_tok=2, router_scaling_factor=1.5, capacity_factor=0.5,
                       min_capacity=0).train()
    gate = model.moe_layers()[0].mlp.moe.deepspeed_moe.gate
    assert isinstance(gate, MoeGate)
    with torch.no_grad():
        gate.wg.weight.zero_()
        gate.wg.weight[:, 0] = torch.tensor([3.0, 2.0, 1.0, 0.0])  # x[0] = 1: experts 0 > 1 > 2 > 3
    x_TD = torch.zeros(6, model.config.hidden_size)
    x_TD[:, 0] = 1.0

    _, capacity, E, indices_kT, locations_kT, gates_kT, demand_E = gate(x_TD)

    assert int(capacity) == math.ceil(6 * 2 / 4 * 0.5) == 2  # every token wants experts 0 and 1
    assert demand_E.tolist() == [6, 6, 0, 0]
    assert indices_kT.tolist() == [[0, 0, -1, -1, -1, -1], [1, 1, -1, -1, -1, -1]]
    assert locations_kT.tolist() == [[0, 1, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0]]
    probs = torch.softmax(torch.tensor([3.0, 2.0, 1.0, 0.0]), 0)
    torch.testing.assert_close(gates_kT[:, 0], probs[:2] / probs[:2].sum() * 1.5)
    assert gates_kT[:, 2:].abs().sum() == 0


@pytest.mark.parametrize("overrides, message", [
    (dict(router_balance="global+sequence"), "router_balance='global\\+sequence' must be one of"),
    (dict(router_balance="bais"), "router_balance='bais' must be"),
    (dict(router_balance="sequence+bias"), "router_balance='sequence\\+bias' must be"),
    (dict(router_expert_bias="true"), "router_expert_bias='true' must be true or false"),
    (dict(router_score_func="relu"), "router_score_func='relu' must be one of"),
    (dict(router_n_group=3), "router_n_group and router_topk_group go together"),
    (dict(num_experts=8, router_n_group=3, router_topk_group=1), "router_n_group=3 must divide num_experts=8"),
    (dict(num_experts=8, router_n_group=8, router_topk_group=1), "groups of at least 2 experts"),
    (dict(num_experts=8, router_n_group=4, router_topk_group=5), "router_topk_group=5 must lie in"),
    (dict(num_experts=8, num_experts_per_tok=3, router_n_group=4, router_topk_group=1),
     "router_topk_group=1 groups of 2 experts hold fewer than num_experts_per_tok=3"),
    (dict(router_score_func="sigmoid", noisy_gate_policy="Jitter"), "noisy_gate_policy='Jitter' needs DeepSpeed"),
    (dict(router_scaling_factor=0.0), "router_scaling_factor=0.0 must be > 0"),
])
def test_router_settings_are_validated(tiny_config, overrides, message):
    with pytest.raises(MoeConfigError, match=message) as err:
        tiny_config(**overrides)
    assert str(err.value).startswith("MoeConfig: ")


@pytest.mark.parametrize("balance", ROUTER_BALANCES)
@pytest.mark.parametrize("expert_bias", [False, True])
def test_every_balancing_loss_goes_with_and_without_the_expert_bias(tiny_config, balance, expert_bias):
    config = tiny_config(router_balance=balance, router_expert_bias=expert_bias,
                         router_aux_loss_coef=0.0 if balance == "none" else 0.01)
    assert config.balance_loss == (None if balance == "none" else balance)
    assert config.uses_expert_bias is expert_bias


@pytest.mark.parametrize("old, balance", [("bias", "none"), ("bias+aux", "aux"), ("bias+global", "global"),
                                          ("bias+sequence", "sequence")])
def test_a_saved_config_with_the_bias_spelled_in_router_balance_loads_with_one_warning(tiny_config, tmp_path,
                                                                                        monkeypatch, old, balance):
    """config.json of an export written before router_expert_bias existed; also eval_capacity_factor, dropped."""
    saved = tiny_config(router_aux_loss_coef=0.0).to_dict()
    del saved["router_expert_bias"]
    (tmp_path / "config.json").write_text(json.dumps({**saved, "router_balance": old, "eval_capacity_factor": 2.0}))
    monkeypatch.setattr(configuration_moe, "_warned_bias_balance", False)
    with pytest.warns(FutureWarning, match=rf"router_balance='{re.escape(old)}' is the old spelling of router_balance="
                                           rf"'{balance}' with router_expert_bias=True") as warned:
        config = MoeConfig.from_pretrained(tmp_path)
        MoeConfig.from_pretrained(tmp_path)  # once per process
    assert len([w for w in warned if issubclass(w.category, FutureWarning)]) == 1
    assert (config.router_balance, config.router_expert_bias, config.balance_loss) == (
        balance, True, None if balance == "none" else balance)
    assert not hasattr(config, "eval_capacity_factor") and "eval_capacity_factor" not in config.to_dict()
    upgraded = upgrade_config_dict({**saved, "router_balance": old, "eval_capacity_factor": 2.0})  # no warning
    assert (upgraded["router_balance"], upgraded["router_expert_bias"]) == (balance, True)
    assert "eval_capacity_factor" not in upgraded


@pytest.mark.parametrize("overrides, warning", [
    (dict(num_experts_per_tok=2, use_rts=True), "use_rts .* has no effect with num_experts_per_tok=2"),
    (dict(num_experts_per_tok=1, use_rts=True, router_score_func="sigmoid"), "use_rts .* or this routing"),
    (dict(num_experts_per_tok=3, top2_2nd_expert_sampling=True), "top2_2nd_expert_sampling acts only"),
    (dict(router_balance="none", router_expert_bias=True), "router_aux_loss_coef=0.01 has no effect with "
                                                           "router_balance='none'"),
    (dict(router_bias_update_rate=0.01), "router_bias_update_rate has no effect without the expert bias"),
])
def test_settings_without_effect_warn(tiny_config, overrides, warning):
    with pytest.warns(UserWarning, match=warning):
        tiny_config(**overrides)


def test_deepspeed_gate_routes_what_it_can_express(tiny_model):
    """DeepSpeed's TopKGate stays the native gate wherever it computes the config's routing; anything else gets
    MoeGate; and both route the same where both can."""
    from deepspeed.moe.sharded_moe import TopKGate

    for overrides, gate_type in [(dict(), TopKGate), (dict(router_balance="global"), TopKGate),
                                 (dict(router_norm_topk_prob=True), TopKGate),
                                 (dict(router_norm_topk_prob=False), MoeGate),
                                 (dict(router_scaling_factor=2.0), MoeGate)]:
        model = tiny_model(**overrides)
        assert all(type(layer.mlp.gate) is gate_type for layer in model.moe_layers()), overrides
    deepspeed_gate = tiny_model(**WIDE_INIT, drop_tokens=False)
    moe_gate = tiny_model(**WIDE_INIT, drop_tokens=False)
    for layer in moe_gate.moe_layers():  # the same routing through the project's gate
        gate = MoeGate(moe_gate.config)
        gate.wg.weight.data.copy_(layer.mlp.gate.wg.weight)
        layer.mlp.moe.deepspeed_moe.gate = gate
        gate.register_forward_hook(layer.mlp._keep_routes)
    input_ids = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(2))
    for mode in ("train", "eval"):
        a, b = getattr(deepspeed_gate, mode)()(input_ids), getattr(moe_gate, mode)()(input_ids)
        torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
    routing_a, routing_b = deepspeed_gate.routing_metrics(), moe_gate.routing_metrics()  # the training forward
    assert torch.equal(routing_a.received_LE, routing_b.received_LE)
    assert torch.equal(routing_a.demand_LE, routing_b.demand_LE)
    torch.testing.assert_close(routing_a.aux_loss_L, routing_b.aux_loss_L)


def test_every_layer_of_a_group_limited_model_reaches_at_most_topk_group_ranks(tiny_model):
    """router_n_group = ep_size: a group is one expert-parallel rank's experts, so a token's routes reach at most
    router_topk_group ranks (the all-to-all the planner counts)."""
    ep_size, topk_group = 4, 2
    model = tiny_model(num_experts=8, num_experts_per_tok=4, router_score_func="sigmoid", router_n_group=ep_size,
                       router_topk_group=topk_group, router_aux_loss_coef=0.0, router_balance="none")
    out = model(torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0)), output_router_logits=True)
    top_experts_LTk = torch.stack([route_tokens(logits_TE, model.config).experts_Tk for logits_TE in out.router_logits])
    ranks_LTk = top_experts_LTk // (8 // ep_size)
    spans = [len(set(row)) for row in itertools.chain.from_iterable(ranks_LTk.tolist())]
    assert max(spans) <= topk_group and min(spans) >= 1
    assert isinstance(model.moe_layers()[0].mlp, MoeSparseBlock)
