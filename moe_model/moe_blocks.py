"""The MoE blocks: experts, gates, and the two implementations of an MoE layer (`MoeConfig.moe_backend`).

`MoeSparseBlock` wraps DeepSpeed's native MoE layer (`deepspeed.moe.layer.MoE`); `MoeAutoEPBlock` is the dropless block
DeepSpeed AutoEP detects and replaces (see `autoep_layer_settings`). Both report what their router decided to the
layer's `MoeRouterState` (moe_model/routing.py).

Shape legend: B batch, S sequence, T tokens (B * S), D hidden size, E experts, El local experts (E / ep_size),
G ep_size, C capacity per expert, F expert intermediate size, k experts per token, N routed (token, slot) pairs.
"""

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .configuration_moe import MoeConfig
from .routing import EXPERT_BIAS, MoeRoute, MoeRouterState, count_routes, register_expert_bias, route_tokens


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


class MoeGate(nn.Module):
    """A gate with the contract of DeepSpeed's TopKGate, for routing that gate cannot express (sigmoid scores, the
    expert bias, groups, scaling, other top-k normalisation): DeepSpeed's MOELayer still dispatches, runs the
    all-to-alls and the experts, and its `wg` keeps the router's checkpoint name.

    Routing is `route_tokens`. While training with drop_tokens, each expert keeps at most
    capacity = max(ceil(T * k / E * capacity_factor), min_capacity) routes, first choices before second choices,
    in token order within each (GShard's priority, as DeepSpeed's top-2 gate); otherwise nothing is dropped and
    the capacity is the busiest expert's load, the maximum over the expert-parallel group (all ranks' buffers must
    have one shape for the all-to-all). `route` keeps its last decision for the block to record, so top-k is
    computed once per layer.
    """

    def __init__(self, config: MoeConfig) -> None:
        super().__init__()
        self.config = config
        self.route: MoeRoute | None = None
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
        route = self.route = route_tokens(logits_TE, self.config, getattr(self, EXPERT_BIAS, None))
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
        aux_loss = logits_TE.new_zeros(())  # the router state computes the balancing loss
        return aux_loss, capacity, E, indices_kT, locations_kT, gates_kT, demand_E


def deepspeed_moe_layer() -> type[nn.Module]:
    """DeepSpeed's MoE layer class, imported when a native block is built: the rest of the model (the autoep block,
    which `moe-export --format hf` folders run) needs no DeepSpeed. The import sits in a try block because
    transformers' remote-code loader refuses a module whose imports outside try blocks are not installed."""
    try:
        from deepspeed.moe.layer import MoE
    except ImportError as error:
        raise ImportError("moe_backend='deepspeed' builds DeepSpeed's MoE layers: install deepspeed, or build the "
                          "model with moe_backend='autoep' (the dropless block; plain PyTorch outside DeepSpeed)."
                          ) from error
    return MoE


class MoeSparseBlock(nn.Module):
    """DeepSpeed's MoE layer (router, capacity, all-to-all dispatch/combine, experts) plus shared experts.

    It holds experts `ep_rank * El .. (ep_rank + 1) * El - 1` of E, El = E / ep_size; DeepSpeed creates the
    expert-parallel groups and wires the all-to-all inside `deepspeed.initialize`. The gate is DeepSpeed's
    TopKGate where it can express the config's routing (`MoeConfig.uses_deepspeed_gate`), else `MoeGate`.
    The block records into `router_state`, the layer's MoeRouterState, the router logits, the routes the gate kept
    and, from MoeGate, its route (DeepSpeed's TopKGate returns no top-k: the router state computes it).
    """

    def __init__(self, config: MoeConfig, router_state: MoeRouterState, ep_size: int = 1, ep_rank: int = 0) -> None:
        super().__init__()
        self.config = config
        self.num_experts = config.num_experts
        self.router_state = router_state
        layer_seed = draw_layer_seed()
        with torch.random.fork_rng(devices=[]):  # see draw_layer_seed
            self.moe = deepspeed_moe_layer()(
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
        deepspeed_gate = not isinstance(gate, MoeGate)  # DeepSpeed's TopKGate
        x_TD = hidden_BSD.reshape(-1, hidden_BSD.shape[-1])
        if deepspeed_gate:
            # Capacity, the sampled second expert and the kept tokens (RTS) are training devices; DeepSpeed's gate
            # applies them in eval mode too. Inference never drops and is deterministic: a sequence's outputs do
            # not depend on its batch mates, and generate() with and without cache agree.
            gate.drop_tokens = self.training and self.config.drop_tokens
            gate.top2_2nd_expert_sampling = self.training and self.config.top2_2nd_expert_sampling
            gate.use_rts = self.training and self.config.use_rts
            # DeepSpeed's top-1 gate asserts T >= min_capacity (a cached decode step of one sequence has T = 1).
            # Below min_capacity every token fits anyway, so capping it changes no routing decision.
            gate.min_capacity = min(self.config.min_capacity, x_TD.shape[0])
        # The same fp32 logits the gate computes (before any jitter), for the router state's losses: DeepSpeed's gate
        # does not return them, and MoeGate's work the same way, so that both gates train alike. T x D x E flops:
        # negligible next to the experts.
        router_logits_TE = F.linear(x_TD.float(), self.router_weight.float())
        out_BSD, deepspeed_aux_loss, _ = self.moe(hidden_BSD)
        kept_routes_kT, self._routes_kT = self._routes_kT, None
        if deepspeed_gate:
            self.router_state.record(router_logits_TE, training=self.training, kept_routes=kept_routes_kT,
                                     deepspeed_aux_loss=deepspeed_aux_loss)
        else:
            route, gate.route = gate.route, None
            self.router_state.record(router_logits_TE, training=self.training, route=route, kept_routes=kept_routes_kT)
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
    This forward computes the same function in one process (inference, export, tests) and records its routing with
    the layer's `router_state`; AutoEP's layer returns the hidden states only, and the router state reads its router's
    logits (`MoeRouterState.watch`).

    The routing is `route_tokens`, which is what AutoEP's router computes from the same settings, including the
    expert bias (`e_score_correction_bias` on `gate`, which AutoEP copies into its router); so both backends agree
    whenever the native one drops no token.
    """

    def __init__(self, config: MoeConfig, router_state: MoeRouterState) -> None:
        super().__init__()
        self.config = config
        self.router_state = router_state
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
        router_logits_TE = self.gate(x_TD)
        route = route_tokens(router_logits_TE, self.config, getattr(self.gate, EXPERT_BIAS, None))
        self.router_state.record(router_logits_TE, training=self.training, route=route)
        out_BSD = self.experts(x_TD, route.experts_Tk, route.weights_Tk).view_as(hidden_BSD)
        if self.shared_experts is not None:
            out_BSD = out_BSD + self.shared_experts(hidden_BSD)
        return out_BSD


def autoep_layer_settings(config: MoeConfig) -> dict:
    """The "expert_parallel" keys with which DeepSpeed AutoEP finds every MoeAutoEPBlock and routes as it does.

    Custom patterns rather than a preset: they go through AutoEP's default adapter, which leaves transformers'
    output recorders alone (the mixtral preset's adapter retargets them, and fails with transformers 5.23.0).
    Dense layers match the layer pattern too; AutoEP skips them because they have no `experts`. AutoEP logs that
    its router implements no z-loss: `MoeRouterState` adds it, and the balancing loss, outside the replaced
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
