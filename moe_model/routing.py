"""Routing: how a token chooses its experts, the balancing losses, and the router state of each MoE layer.

`route_tokens` is the one implementation of `MoeConfig`'s routing; `MoeRouterState` (one per MoE layer, OLMo-core's
`MoERouter` pattern) owns the layer's numbers: it takes what the router decided in a forward pass, computes the
balancing loss and the z-loss for the model's loss, counts the routes on the device, and hands them to the trainer
in one reduce per log window (`MoeRoutingMetrics.reduce`); after each optimizer step `post_step` moves the expert
bias from the step's global load.

Shape legend: T tokens, E experts, k experts per token, G groups, N routed (token, slot) pairs (T * k), L MoE layers.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from .configuration_moe import MoeConfig

# The expert bias's name, DeepSeek-V3's: AutoEP copies a buffer of this name into its router and adds it to the
# scores for the top-k choice, so both backends route with the same bias.
EXPERT_BIAS = "e_score_correction_bias"


class MoeRoute(NamedTuple):
    probs_TE: torch.Tensor  # fp32 scores normalised over the experts (softmax; sigmoid / its sum): the losses' P
    weights_Tk: torch.Tensor  # combine weights of the chosen experts (normalised, scaled)
    experts_Tk: torch.Tensor  # the chosen experts, best first (by biased score)


def route_tokens(router_logits_TE: torch.Tensor, config: MoeConfig,
                 expert_bias_E: torch.Tensor | None = None) -> MoeRoute:
    """The router's decision for each token: the one implementation of `MoeConfig`'s routing (see its docstring).

    It is what AutoEP's TokenChoiceTopKRouter computes from the same settings (`autoep_layer_settings`) and what
    `MoeGate` dispatches; DeepSpeed's TopKGate computes the same choices and weights for the configs it routes
    (softmax, no bias, no groups, no scaling, no noise).
    """
    logits_TE = router_logits_TE.float()
    if config.router_score_func == "sigmoid":
        scores_TE = torch.sigmoid(logits_TE)
        probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
    else:
        scores_TE = probs_TE = torch.softmax(logits_TE, dim=-1)
    choice_TE = scores_TE.detach() if expert_bias_E is None else scores_TE.detach() + expert_bias_E.float()
    if config.router_n_group is not None:
        T, E, G = choice_TE.shape[0], choice_TE.shape[1], config.router_n_group
        choice_TGe = choice_TE.view(T, G, E // G)
        group_score_TG = choice_TGe.topk(2, dim=-1).values.sum(-1)  # DeepSeek-V3: a group's two best experts
        top_groups_Tg = group_score_TG.topk(config.router_topk_group, dim=-1).indices
        excluded_TG = torch.ones_like(group_score_TG, dtype=torch.bool).scatter_(1, top_groups_Tg, False)
        choice_TE = choice_TGe.masked_fill(excluded_TG[..., None], float("-inf")).view(T, E)
    experts_Tk = choice_TE.topk(config.num_experts_per_tok, dim=-1).indices
    weights_Tk = scores_TE.gather(1, experts_Tk)
    if config.norm_topk:
        weights_Tk = weights_Tk / (weights_Tk.sum(dim=-1, keepdim=True) + 1e-20)
    return MoeRoute(probs_TE, weights_Tk * config.router_scaling_factor, experts_Tk)


def count_routes(experts: torch.Tensor, num_experts: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[E] routes per expert; negative entries (routes dropped at the capacity limit) count for no expert.

    The one place experts are counted. A scatter, not bincount: bincount sizes its output from the data, a host sync.
    """
    experts_N = experts.flatten().long()
    buckets_N = torch.where(experts_N < 0, num_experts, experts_N)
    counts = torch.zeros(num_experts + 1, device=experts_N.device, dtype=dtype)
    counts.scatter_add_(0, buckets_N, torch.ones_like(buckets_N, dtype=dtype))
    return counts[:num_experts]


def router_z_loss(router_logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss: mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(router_logits_TE.float(), dim=-1).square().mean()


def load_balancing_loss(probs_TE: torch.Tensor, top_experts_Tk: torch.Tensor) -> torch.Tensor:
    """DeepSpeed's gate aux loss: E * sum_e(mean probability of e * share of tokens routed to e) / k'.

    Its top-1 and top-2 gates count first choices only (k' = 1); its top-k gate (k > 2) counts all k (k' = k).
    `top_experts_Tk` must hold the best expert first.
    """
    T, E = probs_TE.shape
    counted_Tk = top_experts_Tk[:, :1] if top_experts_Tk.shape[1] <= 2 else top_experts_Tk
    share_E = count_routes(counted_Tk, E) / T
    return (probs_TE.mean(0) * share_E).sum() * E / counted_Tk.shape[1]


def global_balancing_loss(probs_TE: torch.Tensor, top_experts_Tk: torch.Tensor,
                          all_reduce: Callable[[torch.Tensor], object] | None = None) -> torch.Tensor:
    """The Switch loss E/k * sum_e f_e * P_e with the routed fractions f counted over the global batch.

    f_e = routes to e / tokens, both summed in place by `all_reduce` (the router passes `dist.all_reduce`: every rank
    of the default process group, the data- and expert-parallel world; None: this batch alone); P_e is the mean
    score on this rank. Each rank's loss is then linear in its own tokens' scores with the same f, so the ranks'
    mean (what data parallelism averages the gradient over) is the loss of the whole batch: the same value and
    gradient for any layout (Megatron-Core's global aux loss, the Qwen team's global-batch balancing). 1.0 when the
    routes are balanced.
    """
    T, E = probs_TE.shape
    k = top_experts_Tk.shape[1]
    with torch.no_grad():
        counts = torch.cat([count_routes(top_experts_Tk, E), probs_TE.new_tensor([T])])
        if all_reduce is not None:
            all_reduce(counts)
        fraction_E = counts[:E] / counts[E]
    return (fraction_E * probs_TE.mean(0)).sum() * E / k


def sequence_balancing_loss(probs_TE: torch.Tensor, top_experts_Tk: torch.Tensor, batch_size: int) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss, averaged over the batch's sequences:
    per sequence, sum_e f_e * P_e with f_e = E / (k S) * routes of its S tokens to e and P_e its mean score."""
    T, E = probs_TE.shape
    k = top_experts_Tk.shape[1]
    S = T // batch_size
    with torch.no_grad():
        routes_BE = torch.zeros(batch_size, E, device=probs_TE.device)
        routes_BE.scatter_add_(1, top_experts_Tk.reshape(batch_size, S * k),
                               torch.ones(batch_size, S * k, device=probs_TE.device))
        fraction_BE = routes_BE * E / (k * S)
    return (fraction_BE * probs_TE.view(batch_size, S, E).mean(1)).sum(-1).mean()


def expert_bias_delta(load_E: torch.Tensor, rate: float) -> torch.Tensor:
    """DeepSeek-V3's auxiliary-loss-free update of the expert bias: rate * sign(mean load - load_e)."""
    return torch.sign(load_E.mean() - load_E) * rate


def register_expert_bias(module: nn.Module, config: MoeConfig) -> None:
    """A persistent fp32 zero buffer on the router when the config uses the expert bias: saved and loaded with the
    weights, moved by `MoeRouterState.post_step`, never by the optimizer."""
    if config.uses_expert_bias:
        module.register_buffer(EXPERT_BIAS, torch.zeros(config.num_experts))


@dataclass
class MoeLayerRouting:
    """What one MoE layer's router did with this rank's tokens in one forward pass, until the model collects it."""

    aux_loss: torch.Tensor  # the balancing loss of router_balance (0 without one), in autograd
    z_loss: torch.Tensor  # in autograd
    demand_E: torch.Tensor  # routes the router asked of each expert (its top-k), before the capacity limit
    received_E: torch.Tensor  # routes each expert received, after the capacity limit
    dropped_fraction: torch.Tensor  # share of the routes dropped at the capacity limit
    training: bool  # a training forward: its counts go into the log window and the bias update
    router_logits_TE: torch.Tensor  # fp32, before any gate noise


# The layout of a router's window sums: [aux loss, z loss, dropped fraction, forwards, received E, demand E].
_AUX, _Z, _DROPPED, _FORWARDS, _PER_LAYER = 0, 1, 2, 3, 4


class MoeRouterState:
    """One MoE layer's router numbers: its losses for the model's loss, its route counts, and its expert bias.

    `record` takes what the router decided in a forward pass: the logits, and the route where the block computed it
    (MoeGate, MoeAutoEPBlock), else it is computed here from the logits and the live expert bias (DeepSpeed's
    TopKGate and AutoEP's replaced layer return no route). The model `pop`s each layer's losses after the layer ran;
    routes of training forwards are summed on the device, never syncing the host: `compute_metrics` (read by
    `MoeRoutingMetrics.reduce`, once per log window) and the step's demand (`post_step`, once per optimizer step).
    The expert bias is a buffer of the gate (`e_score_correction_bias`, a checkpoint name that AutoEP also reads);
    `bias_owner` returns the module that holds it now. A plain object: nothing of it is in the state dict.
    """

    def __init__(self, config: MoeConfig, bias_owner: Callable[[], nn.Module | None]) -> None:
        self.config = config
        self.num_experts = config.num_experts
        self.bias_owner = bias_owner
        self.batch_size = 1  # the decoder layer sets it each forward, for the sequence-wise loss
        self._pending: MoeLayerRouting | None = None
        self._window: torch.Tensor | None = None  # sums since the last compute_metrics(reset=True)
        self._step_demand_E: torch.Tensor | None = None  # the router's choices since the last post_step
        self._watched: nn.Module | None = None

    @property
    def expert_bias(self) -> torch.Tensor | None:
        owner = self.bias_owner()
        return None if owner is None else getattr(owner, EXPERT_BIAS, None)

    def record(self, router_logits_TE: torch.Tensor, *, training: bool, route: MoeRoute | None = None,
               kept_routes: torch.Tensor | None = None, deepspeed_aux_loss: torch.Tensor | None = None) -> None:
        """`route`: the block's own decision (None: computed here). `kept_routes`: every route's expert after the
        capacity limit, -1 where dropped (None: nothing dropped). `deepspeed_aux_loss`: the loss DeepSpeed's gate
        computed, used for router_balance "aux" when given."""
        method = self.config.balance_loss
        if route is None:
            # Autograd records the scores only for a loss computed from them here (not DeepSpeed's own aux loss).
            scores_need_grad = method in ("global", "sequence") or (method == "aux" and deepspeed_aux_loss is None)
            with torch.set_grad_enabled(torch.is_grad_enabled() and scores_need_grad):
                route = route_tokens(router_logits_TE, self.config, self.expert_bias)
        with torch.no_grad():  # counts only: nothing here needs a gradient, nothing is saved for backward
            demand_E = count_routes(route.experts_Tk, self.num_experts)
            if kept_routes is None:
                received_E, dropped_fraction = demand_E, torch.zeros((), device=demand_E.device)
            else:
                received_E = count_routes(kept_routes, self.num_experts)
                dropped_fraction = 1 - received_E.sum() / kept_routes.numel()
        self._pending = MoeLayerRouting(
            aux_loss=self._balancing_loss(route, training, deepspeed_aux_loss), z_loss=router_z_loss(router_logits_TE),
            demand_E=demand_E, received_E=received_E, dropped_fraction=dropped_fraction, training=training,
            router_logits_TE=router_logits_TE,
        )

    def _balancing_loss(self, route: MoeRoute, training: bool, deepspeed_aux_loss: torch.Tensor | None):
        method = self.config.balance_loss
        if method == "aux":
            if deepspeed_aux_loss is not None:
                return deepspeed_aux_loss
            return load_balancing_loss(route.probs_TE, route.experts_Tk)
        if method == "global":
            # Only training reduces over the world: eval, generate() and export run in one process or unsynced.
            reduce = training and dist.is_available() and dist.is_initialized()
            return global_balancing_loss(route.probs_TE, route.experts_Tk, dist.all_reduce if reduce else None)
        if method == "sequence":
            return sequence_balancing_loss(route.probs_TE, route.experts_Tk, self.batch_size)
        return route.probs_TE.new_zeros(())

    def watch(self, layer: nn.Module) -> None:
        """Record from a MoE layer that reports nothing itself (AutoEP's AutoEPMoELayer, which replaces the block
        inside `deepspeed.initialize`): a forward hook on its router's linear layer takes the logits."""
        gate = layer.router.gate
        if gate is not self._watched:
            gate.register_forward_hook(lambda module, args, logits_TE: self.record(logits_TE, training=module.training))
            self._watched = gate

    def pop(self) -> MoeLayerRouting:
        """The last forward's routing; a training forward's counts go into the sums. Called by the model once per
        forward (not by the layer: activation checkpointing runs the layer's forward again in backward)."""
        routing, self._pending = self._pending, None
        if routing.training:
            with torch.no_grad():
                if self._window is None:
                    self._window = torch.zeros(_PER_LAYER + 2 * self.num_experts, device=routing.demand_E.device)
                self._window += torch.cat([
                    torch.stack([routing.aux_loss.detach().float(), routing.z_loss.detach().float(),
                                 routing.dropped_fraction.float(), routing.aux_loss.new_ones((), dtype=torch.float)]),
                    routing.received_E, routing.demand_E,
                ])
                if self.config.uses_expert_bias:
                    if self._step_demand_E is None:
                        self._step_demand_E = torch.zeros_like(routing.demand_E)
                    self._step_demand_E += routing.demand_E
        return routing

    def compute_metrics(self, reset: bool = True) -> torch.Tensor:
        """This rank's sums over the training forwards since the last reset: [aux loss, z loss, dropped fraction,
        forwards, received routes per expert (E), demanded routes per expert (E)]."""
        if self._window is None:
            return torch.zeros(_PER_LAYER + 2 * self.num_experts)
        sums = self._window.clone()
        if reset:
            self._window.zero_()
        return sums

    def step_demand(self) -> torch.Tensor | None:
        """[E] this rank's router choices since the last `post_step`, counted with the expert bias only (None
        before the first training forward)."""
        return self._step_demand_E

    @torch.no_grad()
    def post_step(self, global_demand_E: torch.Tensor) -> None:
        """After an optimizer step: move the expert bias towards balance by the load of the step's whole global batch
        (`global_demand_E`, this router's `step_demand` summed over every rank, so each applies the same update),
        and start the next step's count. A bias cast with the weights (`model.to(torch.bfloat16)`; DeepSpeed 0.19.8's
        bf16 engine keeps fp32 buffers) goes back to fp32 first, so that updates of router_bias_update_rate are not
        rounded away."""
        owner = self.bias_owner()
        bias_E = getattr(owner, EXPERT_BIAS)
        if bias_E.dtype != torch.float32:
            bias_E = bias_E.float()
            setattr(owner, EXPERT_BIAS, bias_E)
        bias_E += expert_bias_delta(global_demand_E.to(bias_E.device), self.config.router_bias_update_rate)
        if self._step_demand_E is not None:
            self._step_demand_E.zero_()


@dataclass
class MoeRoutingMetrics:
    """The routers' numbers over one log window, summed over every rank, on the host (one row per MoE layer)."""

    forwards: int  # training forwards per rank (micro steps)
    aux_loss_L: torch.Tensor  # each layer's balancing loss, the mean over forwards and ranks
    z_loss_L: torch.Tensor  # each layer's z-loss, the same mean
    dropped_L: torch.Tensor  # share of routes dropped, the same mean
    received_LE: torch.Tensor  # routes each expert received after the capacity limit, summed
    demand_LE: torch.Tensor  # routes the router asked of each expert, summed

    @classmethod
    def reduce(cls, routers: list[MoeRouterState], reset: bool = True, group=None) -> "MoeRoutingMetrics":
        """Collective over `group` (None: every rank) when a process group exists: one all_reduce for all layers,
        then one copy to the host. Every rank calls it at the same step; `reset` starts the next window."""
        sums_LX = torch.stack([router.compute_metrics(reset) for router in routers])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums_LX, group=group)
        sums_LX = sums_LX.cpu()  # syncs the device: once per log window
        E = routers[0].num_experts
        forwards_all_ranks = sums_LX[0, _FORWARDS].clamp(min=1)
        world = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
        return cls(
            forwards=round(sums_LX[0, _FORWARDS].item() / world),
            aux_loss_L=sums_LX[:, _AUX] / forwards_all_ranks,
            z_loss_L=sums_LX[:, _Z] / forwards_all_ranks,
            dropped_L=sums_LX[:, _DROPPED] / forwards_all_ranks,
            received_LE=sums_LX[:, _PER_LAYER:_PER_LAYER + E],
            demand_LE=sums_LX[:, _PER_LAYER + E:],
        )


def routers_post_step(routers: list[MoeRouterState], group=None) -> None:
    """Collective after each optimizer step when the routers use the expert bias: sum every router's step demand over
    `group` (None: every rank, the data- and expert-parallel world) in one all_reduce, then each moves its bias."""
    if not routers or not routers[0].config.uses_expert_bias:
        return
    demand_LE = torch.stack([router.step_demand() for router in routers])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(demand_LE, group=group)
    for router, demand_E in zip(routers, demand_LE):
        router.post_step(demand_E)


__all__ = [
    "EXPERT_BIAS",
    "MoeLayerRouting",
    "MoeRoute",
    "MoeRouterState",
    "MoeRoutingMetrics",
    "count_routes",
    "expert_bias_delta",
    "global_balancing_loss",
    "load_balancing_loss",
    "register_expert_bias",
    "route_tokens",
    "router_z_loss",
    "routers_post_step",
    "sequence_balancing_loss",
]
