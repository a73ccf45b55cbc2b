"""A Hugging Face-style MoE causal LM whose sparse blocks are DeepSpeed MoE layers.

Two implementations of the MoE layer, chosen by `MoeConfig.moe_backend`: `MoeSparseBlock` wraps DeepSpeed's native
MoE layer; `MoeAutoEPBlock` is the dropless block DeepSpeed AutoEP detects and replaces (see `autoep_layer_settings`).

Shape legend used in tensor names:
    B batch, S query length, P cached (past) length, T tokens (B * S), D hidden size, V vocab,
    H attention heads, Hkv key/value heads, Dh head dim,
    E experts, El local experts (E / ep_size), G ep_size, C capacity per expert, F expert intermediate size,
    k experts per token, N routed (token, slot) pairs (T * k), L MoE layers.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import TopKGate
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from .configuration_moe import MoeConfig


class MoeRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_fp32 = x.float()
        x_fp32 = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x_fp32.to(x.dtype)


class MoeRotaryEmbedding(nn.Module):
    def __init__(self, config: MoeConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.rope_theta = config.rope_theta
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self) -> torch.Tensor:
        dim = self.head_dim
        return 1.0 / (self.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs_BSh = position_ids_BS[..., None].float() * self.inv_freq.to(x.device)
        emb_BSDh = torch.cat((freqs_BSh, freqs_BSh), dim=-1)
        return emb_BSDh.cos().to(x.dtype), emb_BSDh.sin().to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos_BSDh, sin_BSDh):
    cos, sin = cos_BSDh.unsqueeze(1), sin_BSDh.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class MoeAttention(nn.Module):
    """Grouped-query attention through `F.scaled_dot_product_attention` (fused kernels where the device has them)."""

    def __init__(self, config: MoeConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x_BSD, position_embeddings, attn_mask, past_key_values: Cache | None) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q_BHSDh = self.q_proj(x_BSD).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)
        k_BHkvSDh = self.k_proj(x_BSD).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v_BHkvSDh = self.v_proj(x_BSD).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q_BHSDh, k_BHkvSDh = apply_rotary_pos_emb(q_BHSDh, k_BHkvSDh, *position_embeddings)
        if past_key_values is not None:
            k_BHkvSDh, v_BHkvSDh = past_key_values.update(k_BHkvSDh, v_BHkvSDh, self.layer_idx)
        out_BHSDh = F.scaled_dot_product_attention(
            q_BHSDh,
            k_BHkvSDh,
            v_BHkvSDh,
            attn_mask=attn_mask,
            is_causal=attn_mask is None and S > 1,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return self.o_proj(out_BHSDh.transpose(1, 2).reshape(B, S, -1))


class MoeMLP(nn.Module):
    """SwiGLU feed-forward: the dense layers, each expert and the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoeBatchedExperts(nn.Module):
    """A rank's local experts run as batched GEMMs instead of DeepSpeed's Python loop over experts.

    It keeps DeepSpeed's `deepspeed_experts` ModuleList (same parameters, same `allreduce=False` / `group_name`
    marks, same state-dict names), so the engine's expert-parallel gradient sync and its per-expert checkpoint
    files work unchanged. Every expert's buffer holds the same capacity C, so one `bmm` per projection covers all.
    """

    def __init__(self, deepspeed_experts: nn.ModuleList) -> None:
        super().__init__()
        self.deepspeed_experts = deepspeed_experts
        self.num_local_experts = len(deepspeed_experts)

    def _stacked(self, name: str) -> torch.Tensor:
        return torch.stack([getattr(expert, name).weight for expert in self.deepspeed_experts])

    def forward(self, inputs_GElCD: torch.Tensor) -> torch.Tensor:
        G, El, C, D = inputs_GElCD.shape
        x_ElND = inputs_GElCD.transpose(0, 1).reshape(El, G * C, D)
        gate_ElNF = torch.bmm(x_ElND, self._stacked("gate_proj").transpose(1, 2))
        up_ElNF = torch.bmm(x_ElND, self._stacked("up_proj").transpose(1, 2))
        out_ElND = torch.bmm(F.silu(gate_ElNF) * up_ElNF, self._stacked("down_proj").transpose(1, 2))
        return out_ElND.view(El, G, C, D).transpose(0, 1)


def draw_layer_seed() -> int:
    """One draw per MoE layer from the global RNG: the seed of the layer's experts (`MoePreTrainedModel._init_weights`).

    The blocks build their modules under `torch.random.fork_rng` after this draw: the constructors' random inits are
    overwritten by `_init_weights` anyway, and keeping them off the global stream makes every later draw independent
    of how a block is built, so one seed gives the same weights whatever ep_size and moe_backend are.
    """
    return int(torch.randint(0, 2**40, (), device="cpu"))


def router_z_loss(router_logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss: mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(router_logits_TE.float(), dim=-1).square().mean()


class MoeRoute(NamedTuple):
    probs_TE: torch.Tensor  # fp32 scores normalised over the experts (softmax; sigmoid / its sum): the losses' P
    weights_Tk: torch.Tensor  # combine weights of the chosen experts (normalised, scaled)
    experts_Tk: torch.Tensor  # the chosen experts, best first (by biased score)


def route_tokens(router_logits_TE: torch.Tensor, config: MoeConfig,
                 expert_bias_E: torch.Tensor | None = None) -> MoeRoute:
    """The router's decision for each token: the one implementation of `MoeConfig`'s routing (see its docstring).

    It is what AutoEP's TokenChoiceTopKRouter computes from the same settings (`autoep_layer_settings`), what
    `MoeGate` dispatches and what the recorder counts; DeepSpeed's TopKGate computes the same choices and weights
    for the configs it routes (softmax, no bias, no groups, no scaling, no noise).
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

    f_e = routes to e / tokens, both summed in place by `all_reduce` (the model passes `dist.all_reduce`: every rank
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


def update_expert_bias(bias_E: torch.Tensor, load_E: torch.Tensor, rate: float) -> None:
    """DeepSeek-V3's auxiliary-loss-free update, in place: b_e += rate * sign(mean load - load_e)."""
    bias_E.add_(torch.sign(load_E.mean() - load_E).to(bias_E.dtype), alpha=rate)


@dataclass
class MoeRouting:
    """What one MoE layer's router did with this rank's tokens in one forward pass."""

    router_logits_TE: torch.Tensor  # fp32, before any gate noise
    top_experts_Tk: torch.Tensor  # the router's top-k choices, best first: before capacity, without gate noise
    demand_E: torch.Tensor  # routes the router asked of each expert (its top-k), before the capacity limit
    tokens_per_expert_E: torch.Tensor  # routes each expert received, after the capacity limit
    dropped_fraction: torch.Tensor  # share of this layer's routes dropped at the capacity limit
    aux_loss: torch.Tensor  # the balancing loss of router_balance (0 when it has none)
    z_loss: torch.Tensor


class MoeRouterRecorder:
    """One MoE layer's routing numbers and balancing loss from its last forward, the same for both backends.

    The native block hands over its router logits and what the gate did (`record` with the routes it kept, and
    DeepSpeed's aux loss where that gate computed it). An autoep layer returns only hidden states and is replaced
    inside `deepspeed.initialize`, so `watch` follows its router's linear layer with a forward hook (`gate` on
    MoeAutoEPBlock, `router.gate` on AutoEP's AutoEPMoELayer) and records its logits: dropless. The choices are
    recomputed from the logits and the live expert bias with `route_tokens`, the function both routers compute.
    A plain object: nothing in the state dict. The decoder layer tells it the batch size (`batch_size`, for the
    sequence-wise loss) and pops it after every forward.
    """

    def __init__(self, config: MoeConfig) -> None:
        self.config = config
        self.num_experts = config.num_experts
        self.batch_size = 1
        self._gate: nn.Module | None = None
        self._routing: MoeRouting | None = None

    def record(self, router_logits_TE: torch.Tensor, *, training: bool, expert_bias_E: torch.Tensor | None = None,
               kept_routes: torch.Tensor | None = None, deepspeed_aux_loss: torch.Tensor | None = None) -> None:
        """`kept_routes`: every route's expert after the capacity limit, -1 where dropped (None: dropless).
        `deepspeed_aux_loss`: the loss DeepSpeed's gate computed, used for router_balance "aux" when given."""
        method = self.config.balance_loss
        # Autograd records the scores only for a loss computed from them here (not DeepSpeed's own aux loss).
        scores_need_grad = method in ("global", "sequence") or (method == "aux" and deepspeed_aux_loss is None)
        with torch.set_grad_enabled(torch.is_grad_enabled() and scores_need_grad):
            route = route_tokens(router_logits_TE, self.config, expert_bias_E)
        top_experts_Tk = route.experts_Tk
        with torch.no_grad():  # counts only: nothing here needs a gradient, nothing is saved for backward
            demand_E = count_routes(top_experts_Tk, self.num_experts)
            if kept_routes is None:
                received_E, dropped_fraction = demand_E, torch.zeros((), device=demand_E.device)
            else:
                received_E = count_routes(kept_routes, self.num_experts)
                dropped_fraction = 1 - received_E.sum() / kept_routes.numel()
        self._routing = MoeRouting(
            router_logits_TE=router_logits_TE, top_experts_Tk=top_experts_Tk, demand_E=demand_E,
            tokens_per_expert_E=received_E, dropped_fraction=dropped_fraction,
            aux_loss=self.balancing_loss(route, training, deepspeed_aux_loss), z_loss=router_z_loss(router_logits_TE),
        )

    def balancing_loss(self, route: MoeRoute, training: bool,
                       deepspeed_aux_loss: torch.Tensor | None) -> torch.Tensor:
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

    def watch(self, block: nn.Module) -> None:
        router = getattr(block, "router", None)
        gate = block.gate if router is None else router.gate
        if gate is not self._gate:
            owner = block.gate if router is None else router  # where the expert bias lives (AutoEP copies it)
            gate.register_forward_hook(lambda module, args, logits_TE: self.record(
                logits_TE, training=module.training, expert_bias_E=getattr(owner, EXPERT_BIAS, None)))
            self._gate = gate

    def pop(self) -> MoeRouting:
        routing, self._routing = self._routing, None
        return routing


# The expert bias's name, DeepSeek-V3's: AutoEP copies a buffer of this name into its router and adds it to the
# scores for the top-k choice, so both backends route with the same bias.
EXPERT_BIAS = "e_score_correction_bias"


def register_expert_bias(module: nn.Module, config: MoeConfig) -> None:
    """A persistent fp32 zero buffer on the router when router_balance uses the bias: saved and loaded with the
    weights, updated by `MoeForCausalLM.update_expert_bias`, never by the optimizer."""
    if config.uses_expert_bias:
        module.register_buffer(EXPERT_BIAS, torch.zeros(config.num_experts))


class MoeGate(nn.Module):
    """A gate with the contract of DeepSpeed's TopKGate, for routing that gate cannot express (sigmoid scores, the
    expert bias, groups, scaling, other top-k normalisation): DeepSpeed's MOELayer still dispatches, runs the
    all-to-alls and the experts, and its `wg` keeps the router's checkpoint name.

    Routing is `route_tokens`. While training with drop_tokens, each expert keeps at most
    capacity = max(ceil(T * k / E * capacity_factor), min_capacity) routes, first choices before second choices,
    in token order within each (GShard's priority, as DeepSpeed's top-2 gate); otherwise nothing is dropped and
    the capacity is the busiest expert's load, the maximum over the expert-parallel group (all ranks' buffers must
    have one shape for the all-to-all).
    """

    def __init__(self, config: MoeConfig) -> None:
        super().__init__()
        self.config = config
        self.num_experts = config.num_experts
        self.wg = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        register_expert_bias(self, config)
        self.ep_group = None

    def _set_ep_group(self, ep_group) -> None:  # DeepSpeed's MOELayer calls it when the engine creates the groups
        self.ep_group = ep_group

    def forward(self, x_TD: torch.Tensor, used_token=None, sparse_routes: bool = True, use_tutel: bool = False):
        if use_tutel or used_token is not None:
            raise NotImplementedError("MoeGate does not implement DeepSpeed's tutel path or used_token masks.")
        E = self.num_experts
        logits_TE = F.linear(x_TD.float(), self.wg.weight.float())
        route = route_tokens(logits_TE, self.config, getattr(self, EXPERT_BIAS, None))
        T, k = route.experts_Tk.shape
        experts_kT = route.experts_Tk.t()  # slot-major: every token's first choice comes before any second choice
        experts_N = experts_kT.reshape(-1)
        demand_E = count_routes(experts_N, E, dtype=torch.long)
        # Each route's place in its expert's buffer, in priority order: its rank among the routes to that expert.
        order_N = experts_N.argsort(stable=True)
        first_route_E = demand_E.cumsum(0) - demand_E
        locations_N = torch.empty_like(experts_N)
        locations_N[order_N] = torch.arange(experts_N.numel(), device=x_TD.device) - first_route_E[experts_N[order_N]]
        if self.training and self.config.drop_tokens:
            capacity = max(math.ceil(T * k / E * self.config.capacity_factor), self.config.min_capacity)
            kept_N = locations_N < capacity
        else:
            capacity = demand_E.max()
            if self.ep_group is not None and dist.get_world_size(self.ep_group) > 1:
                dist.all_reduce(capacity, op=dist.ReduceOp.MAX, group=self.ep_group)
            kept_N = torch.ones_like(experts_N, dtype=torch.bool)
        kept_kT = kept_N.view(k, T)
        indices_kT = torch.where(kept_kT, experts_kT, -1).to(torch.int32)
        locations_kT = (locations_N.view(k, T) * kept_kT).to(torch.int32)
        gates_kT = route.weights_Tk.t() * kept_kT
        aux_loss = logits_TE.new_zeros(())  # the recorder computes the balancing loss from the same logits
        return aux_loss, capacity, E, indices_kT, locations_kT, gates_kT, demand_E


class MoeSparseBlock(nn.Module):
    """DeepSpeed's MoE layer (router, capacity, all-to-all dispatch/combine, experts) plus shared experts.

    It holds experts `ep_rank * El .. (ep_rank + 1) * El - 1` of E, El = E / ep_size; DeepSpeed creates the
    expert-parallel groups and wires the all-to-all inside `deepspeed.initialize`. The gate is DeepSpeed's
    TopKGate where it can express the config's routing (`MoeConfig.uses_deepspeed_gate`), else `MoeGate`.
    """

    def __init__(self, config: MoeConfig, recorder: MoeRouterRecorder, ep_size: int = 1, ep_rank: int = 0) -> None:
        super().__init__()
        self.config = config
        self.num_experts = config.num_experts
        self.recorder = recorder
        layer_seed = draw_layer_seed()
        with torch.random.fork_rng(devices=[]):  # see draw_layer_seed
            self.moe = MoE(
                hidden_size=config.hidden_size,
                expert=MoeMLP(config.hidden_size, config.moe_intermediate_size),
                num_experts=config.num_experts,
                ep_size=ep_size,
                k=config.num_experts_per_tok,
                capacity_factor=config.capacity_factor,
                eval_capacity_factor=config.capacity_factor,  # unused: eval never drops (see forward)
                min_capacity=config.min_capacity,
                use_residual=config.use_residual,
                noisy_gate_policy=config.noisy_gate_policy,
                drop_tokens=config.drop_tokens,
                use_rts=config.use_rts,
                top2_2nd_expert_sampling=config.top2_2nd_expert_sampling,
            )
            if not config.uses_deepspeed_gate:
                self.moe.deepspeed_moe.gate = MoeGate(config)
            self.shared_experts = (
                MoeMLP(config.hidden_size, config.moe_intermediate_size * config.num_shared_experts)
                if config.num_shared_experts
                else None
            )
        self.moe.deepspeed_moe.experts = MoeBatchedExperts(self.moe.deepspeed_moe.experts.deepspeed_experts)
        self._seed_experts(layer_seed, ep_rank * self.moe.num_local_experts)
        # DeepSpeed's exp_counts are counted before the capacity limit; its gate's sparse routes mark each
        # dropped (token, slot) with expert -1, so keep them to count what the experts really received.
        self._routes_kT: torch.Tensor | None = None
        self.gate.register_forward_hook(self._keep_routes)

    def _seed_experts(self, layer_seed: int, first_global_expert: int) -> None:
        """Give every expert projection a seed from (layer draw, global expert id, projection).

        DeepSpeed deep-copies one expert, so without this all experts would start identical; with it, global
        expert i starts from the same tensor whatever ep_size is (see `MoePreTrainedModel._init_weights`).
        """
        for local_id, expert in enumerate(self.moe.deepspeed_moe.experts.deepspeed_experts):
            for proj_id, proj in enumerate((expert.gate_proj, expert.up_proj, expert.down_proj)):
                proj.expert_init_seed = layer_seed + 3 * (first_global_expert + local_id) + proj_id

    def _keep_routes(self, gate, args, output) -> None:
        self._routes_kT = output[3]

    @property
    def gate(self) -> nn.Module:
        return self.moe.deepspeed_moe.gate

    @property
    def router_weight(self) -> torch.Tensor:
        return self.gate.wg.weight

    @property
    def expert_bias(self) -> torch.Tensor | None:
        return getattr(self.gate, EXPERT_BIAS, None)

    def forward(self, hidden_BSD: torch.Tensor) -> torch.Tensor:
        gate = self.gate
        x_TD = hidden_BSD.reshape(-1, hidden_BSD.shape[-1])
        if isinstance(gate, TopKGate):
            # Capacity, the sampled second expert and the kept tokens (RTS) are training devices; DeepSpeed's gate
            # applies them in eval mode too. Inference never drops and is deterministic: a sequence's outputs do
            # not depend on its batch mates, and generate() with and without cache agree.
            gate.drop_tokens = self.training and self.config.drop_tokens
            gate.top2_2nd_expert_sampling = self.training and self.config.top2_2nd_expert_sampling
            gate.use_rts = self.training and self.config.use_rts
            # DeepSpeed's top-1 gate asserts T >= min_capacity (a cached decode step of one sequence has T = 1).
            # Below min_capacity every token fits anyway, so capping it changes no routing decision.
            gate.min_capacity = min(self.config.min_capacity, x_TD.shape[0])
        # The same fp32 logits the gate computes (before any jitter); recomputed here for the balancing and z
        # losses because the gate does not return them. T x D x E flops: negligible next to the experts.
        router_logits_TE = F.linear(x_TD.float(), self.router_weight.float())
        out_BSD, deepspeed_aux_loss, _ = self.moe(hidden_BSD)
        kept_routes_kT, self._routes_kT = self._routes_kT, None
        self.recorder.record(router_logits_TE, training=self.training, expert_bias_E=self.expert_bias,
                             kept_routes=kept_routes_kT,
                             deepspeed_aux_loss=deepspeed_aux_loss if isinstance(gate, TopKGate) else None)
        if self.shared_experts is not None:
            out_BSD = out_BSD + self.shared_experts(hidden_BSD)
        return out_BSD


def grouped_linear(x_ND: torch.Tensor, w_EOI: torch.Tensor, offsets_E: torch.Tensor, counts_E: torch.Tensor):
    """`x @ w[e].T` over each expert's contiguous rows of x: one grouped GEMM where torch has the kernel.

    torch 2.13's grouped_mm runs on CPU and in bf16 on CUDA; other CUDA dtypes loop over the experts, which needs
    the split sizes on the host (a sync).
    """
    if x_ND.device.type == "cpu" or x_ND.dtype == torch.bfloat16:
        return F.grouped_mm(x_ND, w_EOI.transpose(1, 2), offs=offsets_E)
    return torch.cat([x @ w.T for x, w in zip(x_ND.split(counts_E.tolist()), w_EOI)])


class MoeExperts(nn.Module):
    """All E experts' SwiGLU weights stacked in transformers' Mixtral layout, run as grouped GEMMs.

    `gate_up_proj[e]` is expert e's gate projection on top of its up projection ([2F, D]); `down_proj[e]` is [D, F].
    """

    def __init__(self, config: MoeConfig, layer_seed: int) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.intermediate_size = config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(config.num_experts, 2 * self.intermediate_size,
                                                     config.hidden_size))
        self.down_proj = nn.Parameter(torch.empty(config.num_experts, config.hidden_size, self.intermediate_size))
        self.act_fn = F.silu  # AutoEP checks it against the activation its grouped experts compute (SwiGLU)
        self.expert_init_seed = layer_seed

    def forward(self, x_TD: torch.Tensor, top_experts_Tk: torch.Tensor, top_weights_Tk: torch.Tensor) -> torch.Tensor:
        T, k = top_experts_Tk.shape
        experts_N = top_experts_Tk.flatten()
        order_N = experts_N.argsort(stable=True)  # routes grouped by expert; route n is token n // k
        counts_E = count_routes(experts_N, self.num_experts, dtype=torch.int32)
        offsets_E = counts_E.cumsum(0, dtype=torch.int32)
        x_ND = x_TD[order_N // k]
        gate_NF, up_NF = grouped_linear(x_ND, self.gate_up_proj, offsets_E, counts_E).chunk(2, dim=-1)
        out_ND = grouped_linear(self.act_fn(gate_NF) * up_NF, self.down_proj, offsets_E, counts_E)
        # Back to (token, slot) order, then the weighted sum over the k slots in fp32, as AutoEP combines.
        out_TkD = torch.empty_like(out_ND).index_copy_(0, order_N, out_ND).view(T, k, -1)
        return (out_TkD.float() * top_weights_Tk[..., None]).sum(1).to(x_TD.dtype)


class MoeAutoEPBlock(nn.Module):
    """A dropless top-k MoE block in the layout DeepSpeed AutoEP detects: router `gate`, `experts`, `shared_experts`.

    Under a DeepSpeed engine whose config enables "expert_parallel" (see `autoep_layer_settings`), AutoEP swaps it
    for its AutoEPMoELayer: experts split over ep_size ranks, all-to-all dispatch, grouped GEMMs, ZeRO-3 support.
    This forward computes the same function in one process (inference, export, tests). Like AutoEP's layer it
    returns the hidden states only; `MoeRouterRecorder` reads the routing from the router's logits.

    The routing is `route_tokens`, which is what AutoEP's router computes from the same settings, including the
    expert bias (`e_score_correction_bias` on `gate`, which AutoEP copies into its router); so both backends agree
    whenever the native one drops no token.
    """

    def __init__(self, config: MoeConfig) -> None:
        super().__init__()
        self.config = config
        layer_seed = draw_layer_seed()
        with torch.random.fork_rng(devices=[]):  # see draw_layer_seed
            self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
            register_expert_bias(self.gate, config)
            self.experts = MoeExperts(config, layer_seed)
            self.shared_experts = (
                MoeMLP(config.hidden_size, config.moe_intermediate_size * config.num_shared_experts)
                if config.num_shared_experts
                else None
            )

    def forward(self, hidden_BSD: torch.Tensor) -> torch.Tensor:
        x_TD = hidden_BSD.reshape(-1, hidden_BSD.shape[-1])
        route = route_tokens(self.gate(x_TD), self.config, getattr(self.gate, EXPERT_BIAS, None))
        out_BSD = self.experts(x_TD, route.experts_Tk, route.weights_Tk).view_as(hidden_BSD)
        if self.shared_experts is not None:
            out_BSD = out_BSD + self.shared_experts(hidden_BSD)
        return out_BSD


def autoep_layer_settings(config: MoeConfig) -> dict:
    """The "expert_parallel" keys with which DeepSpeed AutoEP finds every MoeAutoEPBlock and routes as it does.

    Custom patterns rather than a preset: they go through AutoEP's default adapter, which leaves transformers'
    output recorders alone (the mixtral preset's adapter retargets them, and fails with transformers 5.23.0).
    Dense layers match the layer pattern too; AutoEP skips them because they have no `experts`. AutoEP logs that
    its router implements no z-loss: `MoeRouterRecorder` adds it, and the balancing loss, outside the replaced
    layer. AutoEP's groups are scored by their two best experts, as `route_tokens` does.
    """
    settings = {
        "moe_layer_pattern": r"model\.layers\.\d+\.mlp",
        "router_pattern": "gate",
        "expert_pattern": "experts",
        "expert_w1": "gate_up_proj",
        "expert_w2": "down_proj",
        "expert_w3": None,  # gate and up fused in expert_w1
        "expert_activation": "swiglu",
        "num_experts_attr": "num_experts",
        "top_k_attr": "num_experts_per_tok",
        "score_func": config.router_score_func,
        "score_apply": "post",
        "route_norm": config.norm_topk,
        "routed_scaling_factor": config.router_scaling_factor,
        "has_shared_experts": config.num_shared_experts > 0,
    }
    if config.router_n_group is not None:
        settings.update(num_expert_groups=config.router_n_group, num_limited_groups=config.router_topk_group)
    if config.num_shared_experts:
        settings["shared_experts_pattern"] = "shared_experts"
    return settings


class MoeDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: MoeConfig, layer_idx: int, ep_size: int = 1, ep_rank: int = 0) -> None:
        super().__init__()
        self.self_attn = MoeAttention(config, layer_idx)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.router_recorder = MoeRouterRecorder(config) if self.is_moe else None
        if not self.is_moe:
            self.mlp = MoeMLP(config.hidden_size, config.intermediate_size)
        elif config.moe_backend == "autoep":
            self.mlp = MoeAutoEPBlock(config)
        else:
            self.mlp = MoeSparseBlock(config, self.router_recorder, ep_size, ep_rank)
        self.input_layernorm = MoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = MoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_BSD, position_embeddings, attn_mask=None, past_key_values=None) -> torch.Tensor:
        hidden_BSD = hidden_BSD + self.self_attn(
            self.input_layernorm(hidden_BSD), position_embeddings, attn_mask, past_key_values
        )
        if self.is_moe:
            self.router_recorder.batch_size = hidden_BSD.shape[0]
            if not isinstance(self.mlp, MoeSparseBlock):
                self.router_recorder.watch(self.mlp)  # autoep: AutoEP may have replaced the block since the last call
        return hidden_BSD + self.mlp(self.post_attention_layernorm(hidden_BSD))

    def expert_bias_owner(self) -> nn.Module | None:
        """The module whose `e_score_correction_bias` buffer this MoE layer routes with (None without a bias):
        DeepSpeed's gate slot (MoeGate), MoeAutoEPBlock's gate, or AutoEP's router once it replaced the block."""
        if not self.is_moe:
            return None
        owner = self.mlp.gate if isinstance(self.mlp, (MoeSparseBlock, MoeAutoEPBlock)) else self.mlp.router
        return owner if getattr(owner, EXPERT_BIAS, None) is not None else None


@dataclass
class MoeModelOutputWithPast(ModelOutput):
    last_hidden_state: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    routing: tuple[MoeRouting, ...] | None = None


@dataclass
class MoeCausalLMOutputWithPast(ModelOutput):
    """`loss` = `lm_loss` + router_aux_loss_coef * `aux_loss` + router_z_loss_coef * `z_loss`.

    `aux_loss` (the balancing loss of router_balance, 0 when it has none) and `z_loss` are summed over the MoE
    layers; `layer_aux_loss` and `layer_z_loss` ([L]) hold them per MoE layer, `expert_bias` ([L, E]) the bias each
    layer routed with (None without one). The routing fields hold this rank's tokens, one row per MoE layer:
    `router_logits` (L x [T, E], fp32), `top_experts` ([L, T, k]: the router's top-k choices, best first, before
    the capacity limit and without gate noise), `router_demand` ([L, E]: those choices counted per expert),
    `tokens_per_expert` ([L, E]: the (token, slot) routes each expert received after the capacity limit) and
    `dropped_fraction` ([L]: the share of routes dropped there).
    """

    loss: torch.FloatTensor | None = None
    lm_loss: torch.FloatTensor | None = None
    aux_loss: torch.FloatTensor | None = None
    z_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    top_experts: torch.LongTensor | None = None
    router_demand: torch.FloatTensor | None = None
    tokens_per_expert: torch.FloatTensor | None = None
    dropped_fraction: torch.FloatTensor | None = None
    layer_aux_loss: torch.FloatTensor | None = None
    layer_z_loss: torch.FloatTensor | None = None
    expert_bias: torch.FloatTensor | None = None


class MoePreTrainedModel(PreTrainedModel):
    config: MoeConfig
    config_class = MoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MoeDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if hasattr(module, "expert_init_seed"):
                generator = torch.Generator().manual_seed(module.expert_init_seed)
                init.copy_(module.weight, torch.randn(module.weight.shape, generator=generator) * std)
                return
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, MoeExperts):
            # Expert e from the seeds MoeSparseBlock gives its expert e's (gate, up, down): both backends start equal.
            def draw(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
                return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * std

            E, D, F_ = module.num_experts, module.gate_up_proj.shape[-1], module.intermediate_size
            seeds = [module.expert_init_seed + 3 * e for e in range(E)]
            init.copy_(module.gate_up_proj, torch.stack([torch.cat([draw(s, (F_, D)), draw(s + 1, (F_, D))])
                                                         for s in seeds]))
            init.copy_(module.down_proj, torch.stack([draw(s + 2, (D, F_)) for s in seeds]))
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, MoeRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, MoeRotaryEmbedding):
            # A non-persistent buffer: from_pretrained builds the model on the meta device and must recompute it.
            init.copy_(module.inv_freq, module.compute_inv_freq())


def build_attention_mask(attention_mask_BP, batch: int, query_len: int, past_len: int, device) -> torch.Tensor | None:
    """A boolean [B, 1, S, P+S] mask (True = attend), or None when SDPA's own causal mask suffices."""
    if attention_mask_BP is None and past_len == 0:
        return None
    q_pos_S1 = torch.arange(past_len, past_len + query_len, device=device)[:, None]
    k_pos_1P = torch.arange(past_len + query_len, device=device)[None, :]
    mask_BSP = (k_pos_1P <= q_pos_S1).expand(batch, -1, -1)
    if attention_mask_BP is not None:
        # Each query always sees itself, so rows of left padding never become all -inf (NaN in SDPA).
        mask_BSP = (mask_BSP & attention_mask_BP[:, None, :].bool()) | (k_pos_1P == q_pos_S1)
    return mask_BSP[:, None]


class MoeModel(MoePreTrainedModel):
    def __init__(self, config: MoeConfig, *, ep_size: int = 1, ep_rank: int = 0) -> None:
        super().__init__(config)
        config.validate_ep_size(ep_size)
        if not 0 <= ep_rank < ep_size:
            raise ValueError(f"ep_rank={ep_rank} must lie in [0, ep_size={ep_size}).")
        self.ep_size, self.ep_rank = ep_size, ep_rank
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(
            [MoeDecoderLayer(config, i, ep_size, ep_rank) for i in range(config.num_hidden_layers)]
        )
        self.norm = MoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = MoeRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> MoeModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None and not self.training:
            past_key_values = DynamicCache(config=self.config)
        if not use_cache:
            past_key_values = None
        hidden_BSD = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, S, _ = hidden_BSD.shape
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + S, device=hidden_BSD.device)[None].expand(B, -1)
        attn_mask = build_attention_mask(attention_mask, B, S, past_len, hidden_BSD.device)
        position_embeddings = self.rotary_emb(hidden_BSD, position_ids)
        routing = []
        for layer in self.layers:
            hidden_BSD = layer(hidden_BSD, position_embeddings, attn_mask, past_key_values)
            if layer.router_recorder is not None:
                routing.append(layer.router_recorder.pop())
        return MoeModelOutputWithPast(
            last_hidden_state=self.norm(hidden_BSD), past_key_values=past_key_values, routing=tuple(routing)
        )


class MoeForCausalLM(MoePreTrainedModel, GenerationMixin):
    """The causal LM, built for one place in an expert-parallel layout.

    `ep_size` ranks split the experts of every native MoE layer; this one, `ep_rank` in its expert-parallel group,
    holds global experts `ep_rank * E / ep_size` onwards (DeepSpeed's layout puts consecutive global ranks in one
    group, see `moe_recipe.engine.build_model`). One seed gives global expert i the same weights for every ep_size.
    The layout is not stored in the config; `from_pretrained(path, ep_size=..., ep_rank=...)` passes it through.
    Weights load by name, so a folder holding every expert under its global id (an export) loads whole at ep_size 1;
    the recipe's checkpoints hand each layout its experts (moe_recipe/reshard.py).
    autoep layers hold all experts whatever ep_size is: DeepSpeed AutoEP splits them when it replaces them.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MoeConfig, *, ep_size: int = 1, ep_rank: int = 0) -> None:
        super().__init__(config)
        self.ep_size, self.ep_rank = ep_size, ep_rank
        self.model = MoeModel(config, ep_size=ep_size, ep_rank=ep_rank)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast:
        """`labels` are the input ids (the shift happens here); -100 marks positions without a target."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        hidden_BSD = outputs.last_hidden_state
        logits_BSV = self.lm_head(hidden_BSD[:, -logits_to_keep:] if logits_to_keep else hidden_BSD)
        routing = outputs.routing
        layer_aux_loss = torch.stack([r.aux_loss for r in routing])
        layer_z_loss = torch.stack([r.z_loss for r in routing])
        aux_loss, z_loss = layer_aux_loss.sum(), layer_z_loss.sum()
        lm_loss = loss = None
        if labels is not None:
            lm_loss = F.cross_entropy(
                logits_BSV[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
            loss = lm_loss + self.config.router_aux_loss_coef * aux_loss + self.config.router_z_loss_coef * z_loss
        return MoeCausalLMOutputWithPast(
            loss=loss,
            lm_loss=lm_loss,
            aux_loss=aux_loss,
            z_loss=z_loss,
            logits=logits_BSV,
            past_key_values=outputs.past_key_values,
            router_logits=tuple(r.router_logits_TE for r in routing),
            top_experts=torch.stack([r.top_experts_Tk for r in routing]),
            router_demand=torch.stack([r.demand_E for r in routing]),
            tokens_per_expert=torch.stack([r.tokens_per_expert_E for r in routing]),
            dropped_fraction=torch.stack([r.dropped_fraction for r in routing]),
            layer_aux_loss=layer_aux_loss,
            layer_z_loss=layer_z_loss,
            expert_bias=self.expert_bias(),
        )

    def moe_layers(self) -> list[MoeDecoderLayer]:
        return [layer for layer in self.model.layers if layer.is_moe]

    def expert_bias(self) -> torch.Tensor | None:
        """[L, E] fp32: each MoE layer's expert bias (router_balance 'bias'), or None."""
        if not self.config.uses_expert_bias:
            return None
        return torch.stack([getattr(layer.expert_bias_owner(), EXPERT_BIAS).detach().float()
                            for layer in self.moe_layers()])

    @torch.no_grad()
    def update_expert_bias(self, load_LE: torch.Tensor) -> None:
        """After an optimizer step: move each MoE layer's expert bias towards balance from its load `load_LE`
        ([L, E] routes per expert, counted over the step's whole global batch: every rank then applies the same
        update). A bias cast with the weights (`model.to(torch.bfloat16)`; DeepSpeed 0.19.8's bf16 engine keeps
        fp32 buffers) goes back to fp32 first, so that updates of router_bias_update_rate are not rounded away."""
        for layer, load_E in zip(self.moe_layers(), load_LE):
            owner = layer.expert_bias_owner()
            bias_E = getattr(owner, EXPERT_BIAS)
            if bias_E.dtype != torch.float32:
                bias_E = bias_E.float()
                setattr(owner, EXPERT_BIAS, bias_E)
            update_expert_bias(bias_E, load_E.to(bias_E.device), self.config.router_bias_update_rate)


__all__ = [
    "MoeAutoEPBlock",
    "MoeBatchedExperts",
    "MoeCausalLMOutputWithPast",
    "MoeExperts",
    "MoeForCausalLM",
    "MoeGate",
    "MoeModel",
    "MoePreTrainedModel",
    "MoeRouterRecorder",
    "MoeRouting",
    "MoeSparseBlock",
    "autoep_layer_settings",
    "count_routes",
    "global_balancing_loss",
    "load_balancing_loss",
    "route_tokens",
    "router_z_loss",
    "sequence_balancing_loss",
    "update_expert_bias",
]
