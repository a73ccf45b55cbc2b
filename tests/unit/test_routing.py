"""MoeSparseBlock against hand computations: a naive per-token / per-expert loop, DeepSpeed's aux-loss formulas,
the z-loss, and the capacity arithmetic behind the router state's `received_E`, `demand_E` and `dropped_fraction`.

Shape legend: T tokens, D hidden size, E experts, k experts per token.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from moe_model.moe_blocks import MoeSparseBlock
from moe_model.routing import route_tokens

T = 16  # tokens per block forward (batch 2 x sequence 8)
# Expert weights with std 0.2 give O(1) expert outputs and peaked router probabilities, so an absolute
# tolerance of 1e-5 is a real check (with the default 0.02 every output is ~1e-4).
WIDE_INIT = dict(initializer_range=0.2)


def first_block(model) -> MoeSparseBlock:
    block = model.model.layers[0].mlp
    assert isinstance(block, MoeSparseBlock)
    return block


def run_block(block: MoeSparseBlock, x_BSD: torch.Tensor):
    """The block's output and what its router state holds from that forward."""
    out_BSD = block(x_BSD)
    return out_BSD, block.router_state.pop()


def swiglu(mlp, x_TD: torch.Tensor) -> torch.Tensor:
    """One SwiGLU MLP written out from its weights (not through its forward)."""
    gate_TF = x_TD @ mlp.gate_proj.weight.T
    up_TF = x_TD @ mlp.up_proj.weight.T
    return (F.silu(gate_TF) * up_TF) @ mlp.down_proj.weight.T


def naive_moe(block: MoeSparseBlock, x_TD: torch.Tensor) -> torch.Tensor:
    """Route each token on its own and sum its experts' outputs, looping over tokens and chosen experts.

    DeepSpeed's gate-weight convention: top-1 weighs its expert by the raw softmax probability, top-2 and top-k
    renormalize the chosen probabilities to sum to 1.
    """
    ds_moe = block.moe.deepspeed_moe
    experts = ds_moe.experts.deepspeed_experts
    k = ds_moe.gate.k
    probs_TE = torch.softmax(x_TD.float() @ ds_moe.gate.wg.weight.float().T, dim=-1)
    out_TD = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        top_p, top_e = probs_TE[t].topk(k)
        weights = top_p if k == 1 else top_p / top_p.sum()
        for weight, e in zip(weights, top_e.tolist()):
            out_TD[t] += weight * swiglu(experts[e], x_TD[t : t + 1])[0]
    if block.moe.use_residual:
        coef_T2 = torch.softmax(x_TD @ block.moe.coefficient.weight.T + block.moe.coefficient.bias, dim=-1)
        out_TD = out_TD * coef_T2[:, :1] + swiglu(block.moe.mlp, x_TD) * coef_T2[:, 1:]
    if block.shared_experts is not None:
        out_TD = out_TD + swiglu(block.shared_experts, x_TD)
    return out_TD


def hand_aux_loss(logits_TE: torch.Tensor, k: int) -> torch.Tensor:
    """DeepSpeed's load-balancing loss, one formula per gate (top1gating / top2gating / topkgating)."""
    E = logits_TE.shape[1]
    probs_TE = torch.softmax(logits_TE, dim=-1)
    me_E = probs_TE.mean(0)
    if k == 1:
        ce_E = F.one_hot(probs_TE.argmax(-1), E).float().mean(0)
        return (me_E * ce_E).sum() * E
    if k == 2:
        ce_E = F.one_hot(probs_TE.argmax(-1), E).float().mean(0)  # first choice only
        return (me_E * ce_E).mean() * E * E
    chosen_TE = torch.zeros_like(probs_TE).scatter(1, probs_TE.topk(k, dim=-1).indices, 1.0)
    return (me_E * chosen_TE.mean(0)).mean() * E * E / k


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(dict(num_experts_per_tok=1, drop_tokens=False), id="top1"),
        pytest.param(dict(num_experts_per_tok=2, drop_tokens=False), id="top2"),
        pytest.param(dict(num_experts_per_tok=3, drop_tokens=False), id="top3"),
        pytest.param(dict(num_experts_per_tok=4, num_experts=8, drop_tokens=False), id="top4-of-8"),
        # drop_tokens=True, but capacity ceil(T / E * cf * k) >= T * k: no expert can overflow.
        pytest.param(dict(num_experts_per_tok=1, capacity_factor=4.0), id="top1-big-capacity"),
        pytest.param(dict(num_experts_per_tok=2, capacity_factor=4.0), id="top2-big-capacity"),
        pytest.param(dict(num_experts_per_tok=3, capacity_factor=4.0), id="top3-big-capacity"),
        pytest.param(dict(num_experts_per_tok=2, drop_tokens=False, num_shared_experts=1), id="top2-shared"),
        pytest.param(dict(num_experts_per_tok=2, drop_tokens=False, use_residual=True), id="top2-residual"),
        pytest.param(dict(num_experts_per_tok=1, drop_tokens=False, use_residual=True, num_shared_experts=2),
                     id="top1-residual-shared"),
    ],
)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_block_matches_naive_per_token_loop(tiny_model, overrides, training):
    model = tiny_model(**WIDE_INIT, **overrides).train(training)
    block = first_block(model)
    torch.manual_seed(1)
    x_BSD = torch.randn(2, T // 2, model.config.hidden_size)

    with torch.no_grad():
        out_BSD, routing = run_block(block, x_BSD)
        expected_TD = naive_moe(block, x_BSD.reshape(T, -1))

    assert out_BSD.abs().mean() > 0.05, "outputs too small for the tolerance to mean anything"
    torch.testing.assert_close(out_BSD.reshape(T, -1), expected_TD, rtol=1e-5, atol=1e-5)
    assert routing.dropped_fraction.item() == 0.0
    assert routing.received_E.sum().item() == T * model.config.num_experts_per_tok


@pytest.mark.parametrize("k", [1, 2, 3])
def test_aux_and_z_loss_match_hand_computation(tiny_model, k):
    model = tiny_model(**WIDE_INIT, num_experts_per_tok=k).train()
    block = first_block(model)
    torch.manual_seed(1)
    x_BSD = torch.randn(2, T // 2, model.config.hidden_size)

    _, routing = run_block(block, x_BSD)
    logits_TE = x_BSD.reshape(T, -1) @ block.router_weight.T

    torch.testing.assert_close(routing.router_logits_TE, logits_TE)
    torch.testing.assert_close(routing.aux_loss, hand_aux_loss(logits_TE, k))
    torch.testing.assert_close(routing.z_loss, torch.logsumexp(logits_TE, dim=-1).square().mean())
    # Both losses reach the router.
    (routing.aux_loss + routing.z_loss).backward()
    assert block.router_weight.grad.abs().sum() > 0


def test_model_loss_is_lm_plus_weighted_router_losses(tiny_model):
    # Layer 0 dense, layers 1 and 2 MoE: the router losses are summed over the MoE layers only.
    model = tiny_model(
        num_hidden_layers=3, first_k_dense_replace=1, num_experts_per_tok=3, router_aux_loss_coef=0.1,
        router_z_loss_coef=0.01,
    ).train()
    moe_inputs = []
    for layer in model.model.layers:
        if layer.is_moe:
            layer.mlp.register_forward_pre_hook(lambda module, args: moe_inputs.append((module, args[0])))
    torch.manual_seed(1)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 8))
    labels = input_ids.clone()
    labels[0, :3] = -100

    out = model(input_ids, labels=labels)

    assert len(moe_inputs) == 2
    aux = z = 0.0
    for block, x_BSD in moe_inputs:
        logits_TE = x_BSD.reshape(-1, x_BSD.shape[-1]) @ block.router_weight.T
        aux = aux + hand_aux_loss(logits_TE, k=3)
        z = z + torch.logsumexp(logits_TE, dim=-1).square().mean()
    torch.testing.assert_close(out.aux_loss, aux)
    torch.testing.assert_close(out.z_loss, z)

    # Position s predicts token s + 1; -100 targets are skipped.
    log_probs = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
    targets = labels[:, 1:]
    keep = targets != -100
    lm_loss = -log_probs[keep].gather(-1, targets[keep][:, None]).mean()
    torch.testing.assert_close(out.lm_loss, lm_loss)
    torch.testing.assert_close(out.loss, lm_loss + 0.1 * aux + 0.01 * z)


def routed_inputs(num_tokens: int, num_forward: int, hidden: int) -> torch.Tensor:
    """Tokens whose first coordinate is +1 (the first `num_forward`) or -1 (the rest); see `set_ordered_router`."""
    torch.manual_seed(2)
    x_TD = torch.randn(num_tokens, hidden)
    x_TD[:, 0] = -1.0
    x_TD[:num_forward, 0] = 1.0
    return x_TD[None]


def set_ordered_router(block: MoeSparseBlock) -> None:
    """Router logits = x[0] * (E-1, ..., 1, 0): +1 tokens rank experts 0 > 1 > ... > E-1, -1 tokens the reverse."""
    E = block.num_experts
    with torch.no_grad():
        block.router_weight.zero_()
        block.router_weight[:, 0] = torch.arange(E - 1, -1, -1, dtype=torch.float)


# MoeGate (the project's gate, here chosen by router_scaling_factor != 1) drops by the same capacity arithmetic.
OWN_GATE = dict(router_scaling_factor=2.0)


@pytest.mark.parametrize("gate", [pytest.param({}, id="deepspeed-gate"), pytest.param(OWN_GATE, id="moe-gate")])
@pytest.mark.parametrize(
    "k, num_forward, capacity_factor, min_capacity, training",
    [
        pytest.param(1, T, 1.0, 4, True, id="top1-all-to-expert0"),
        pytest.param(1, T, 0.25, 6, True, id="top1-min-capacity-wins"),
        pytest.param(1, T, 1.0, 4, False, id="top1-eval-never-drops"),
        pytest.param(2, 12, 1.0, 4, True, id="top2"),
        pytest.param(3, 12, 0.5, 4, True, id="top3"),
        pytest.param(3, 12, 0.5, 0, False, id="top3-eval-never-drops"),
    ],
)
def test_drops_follow_capacity_arithmetic(tiny_model, gate, k, num_forward, capacity_factor, min_capacity, training):
    model = tiny_model(
        **WIDE_INIT, **gate, num_experts_per_tok=k, drop_tokens=True, capacity_factor=capacity_factor,
        min_capacity=min_capacity,
    ).train(training)
    block = first_block(model)
    set_ordered_router(block)
    E = block.num_experts
    x_BTD = routed_inputs(T, num_forward, model.config.hidden_size)

    with torch.no_grad():
        out_BTD, routing = run_block(block, x_BTD)

    # Routes each expert is asked for: the first num_forward tokens pick experts 0..k-1, the rest E-1..E-k.
    requested_E = torch.zeros(E)
    requested_E[:k] += num_forward
    requested_E[E - k :] += T - num_forward
    capacity = max(math.ceil(T / E * capacity_factor * k), min_capacity)
    assert requested_E.clamp(max=capacity).sum() < k * T, "the case must overflow some expert"
    kept_E = requested_E.clamp(max=capacity) if training else requested_E  # eval and generate never drop

    assert block.moe.deepspeed_moe.exp_counts.tolist() == requested_E.tolist()  # DeepSpeed's count: pre-drop
    assert routing.demand_E.tolist() == requested_E.tolist()  # the router's demand: before the capacity limit
    assert routing.received_E.tolist() == kept_E.tolist()
    assert (routing.received_E.tolist() != block.moe.deepspeed_moe.exp_counts.tolist()) == training
    assert routing.dropped_fraction.item() == pytest.approx(1 - kept_E.sum().item() / (k * T), abs=1e-7)
    if k == 1:
        # A token whose only route is dropped gets no expert output at all.
        assert (out_BTD[0].abs().sum(-1) > 0).sum().item() == kept_E.sum().item()


@pytest.mark.parametrize("k", [1, 2, 3])
def test_no_drops_without_drop_tokens(tiny_model, k):
    model = tiny_model(**WIDE_INIT, num_experts_per_tok=k, drop_tokens=False).train()
    block = first_block(model)
    set_ordered_router(block)
    x_BTD = routed_inputs(T, T, model.config.hidden_size)  # every token wants the same k experts

    with torch.no_grad():
        _, routing = run_block(block, x_BTD)

    expected_E = torch.zeros(block.num_experts)
    expected_E[:k] = T
    assert routing.dropped_fraction.item() == 0.0
    assert routing.received_E.tolist() == expected_E.tolist()
    assert block.moe.deepspeed_moe.exp_counts.tolist() == expected_E.tolist()


def test_top_k_and_demand_match_a_naive_count(tiny_model):
    """The routing of the model's router logits and the routers' demand counts against sorting each token's
    router logits by hand."""
    model = tiny_model(num_experts=6, num_experts_per_tok=3, num_hidden_layers=3, first_k_dense_replace=1).train()
    input_ids = torch.randint(0, model.config.vocab_size, (2, 25), generator=torch.Generator().manual_seed(1))
    out = model(input_ids, output_router_logits=True)
    demand_LE = model.routing_metrics().demand_LE
    assert len(out.router_logits) == 2 and demand_LE.shape == (2, 6)
    for layer, logits_TE in enumerate(out.router_logits):
        top_experts_Tk = route_tokens(logits_TE, model.config).experts_Tk
        expected_E = torch.zeros(6)
        for t, row in enumerate(logits_TE):
            best = row.argsort(descending=True)[:3]
            assert top_experts_Tk[t].tolist() == best.tolist()
            expected_E[best] += 1
        assert demand_LE[layer].tolist() == expected_E.tolist()
