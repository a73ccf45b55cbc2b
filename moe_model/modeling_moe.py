"""A Hugging Face-style MoE causal LM whose sparse blocks are DeepSpeed MoE layers.

Two implementations of the MoE layer, chosen by `MoeConfig.moe_backend`: `MoeSparseBlock` wraps DeepSpeed's native
MoE layer; `MoeAutoEPBlock` is the dropless block DeepSpeed AutoEP detects and replaces (see `autoep_layer_settings`).

Shape legend used in tensor names:
    B batch, S query length, P cached (past) length, T tokens (B * S), D hidden size, V vocab,
    H attention heads, Hkv key/value heads, Dh head dim,
    E experts, El local experts (E / ep_size), G ep_size, C capacity per expert, F expert intermediate size,
    k experts per token, N routed (token, slot) pairs (T * k), L MoE layers.
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from deepspeed.moe.layer import MoE
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


def renormalizes_top_k(config: MoeConfig) -> bool:
    """DeepSpeed's gates weigh a top-1 expert by its softmax probability; top-2 and top-k weights are renormalized."""
    return config.num_experts_per_tok > 1


class MoeRoute(NamedTuple):
    probs_TE: torch.Tensor  # fp32 softmax over the router logits
    weights_Tk: torch.Tensor  # combine weights of the chosen experts
    experts_Tk: torch.Tensor  # the chosen experts, best first


def route_top_k(router_logits_TE: torch.Tensor, k: int, renormalize: bool) -> MoeRoute:
    """Softmax (fp32) top-k routing, as AutoEP's router and DeepSpeed's gates without noise or capacity.

    The one place top-k is taken: the autoep block routes with it, the recorder counts the router's demand with it.
    """
    probs_TE = torch.softmax(router_logits_TE.float(), dim=-1)
    top_probs_Tk, top_experts_Tk = probs_TE.topk(k, dim=-1)
    if renormalize:
        top_probs_Tk = top_probs_Tk / top_probs_Tk.sum(dim=-1, keepdim=True)
    return MoeRoute(probs_TE, top_probs_Tk, top_experts_Tk)


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


@dataclass
class MoeRouting:
    """What one MoE layer's router did with this rank's tokens in one forward pass."""

    router_logits_TE: torch.Tensor  # fp32, before any gate noise
    top_experts_Tk: torch.Tensor  # the router's top-k choices, best first: before capacity, without gate noise
    demand_E: torch.Tensor  # routes the router asked of each expert (its top-k), before the capacity limit
    tokens_per_expert_E: torch.Tensor  # routes each expert received, after the capacity limit
    dropped_fraction: torch.Tensor  # share of this layer's routes dropped at the capacity limit
    aux_loss: torch.Tensor
    z_loss: torch.Tensor


class MoeRouterRecorder:
    """One MoE layer's routing numbers from its last forward, the same ones for both backends.

    The native block hands over what DeepSpeed's gate did (`record` with the routes it kept and its aux loss). An
    autoep layer returns only hidden states and is replaced inside `deepspeed.initialize`, so `watch` follows its
    router's linear layer with a forward hook (`gate` on MoeAutoEPBlock, `router.gate` on AutoEP's AutoEPMoELayer)
    and records its logits: dropless, with the aux loss of DeepSpeed's gate. A plain object: nothing in the state
    dict. The model pops it after every layer.
    """

    def __init__(self, config: MoeConfig) -> None:
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.renormalize = renormalizes_top_k(config)
        self._gate: nn.Module | None = None
        self._routing: MoeRouting | None = None

    def record(self, router_logits_TE: torch.Tensor, kept_routes: torch.Tensor | None = None,
               aux_loss: torch.Tensor | None = None) -> None:
        """`kept_routes`: every route's expert after the capacity limit, -1 where dropped (None: dropless).
        `aux_loss`: the layer's own load-balancing loss (None: DeepSpeed's formula over the router's top-k)."""
        with torch.no_grad():  # counts only: nothing here needs a gradient, nothing is saved for backward
            top_experts_Tk = route_top_k(router_logits_TE, self.top_k, self.renormalize).experts_Tk
            demand_E = count_routes(top_experts_Tk, self.num_experts)
            if kept_routes is None:
                received_E, dropped_fraction = demand_E, torch.zeros((), device=demand_E.device)
            else:
                received_E = count_routes(kept_routes, self.num_experts)
                dropped_fraction = 1 - received_E.sum() / kept_routes.numel()
        if aux_loss is None:
            aux_loss = load_balancing_loss(torch.softmax(router_logits_TE.float(), dim=-1), top_experts_Tk)
        self._routing = MoeRouting(
            router_logits_TE=router_logits_TE, top_experts_Tk=top_experts_Tk, demand_E=demand_E,
            tokens_per_expert_E=received_E, dropped_fraction=dropped_fraction, aux_loss=aux_loss,
            z_loss=router_z_loss(router_logits_TE),
        )

    def watch(self, block: nn.Module) -> None:
        router = getattr(block, "router", None)
        gate = block.gate if router is None else router.gate
        if gate is not self._gate:
            gate.register_forward_hook(lambda module, args, logits_TE: self.record(logits_TE))
            self._gate = gate

    def pop(self) -> MoeRouting:
        routing, self._routing = self._routing, None
        return routing


class MoeSparseBlock(nn.Module):
    """DeepSpeed's MoE layer (router, capacity, all-to-all dispatch/combine, experts) plus shared experts.

    It holds experts `ep_rank * El .. (ep_rank + 1) * El - 1` of E, El = E / ep_size; DeepSpeed creates the
    expert-parallel groups and wires the all-to-all inside `deepspeed.initialize`.
    """

    def __init__(self, config: MoeConfig, recorder: MoeRouterRecorder, ep_size: int = 1, ep_rank: int = 0) -> None:
        super().__init__()
        self.recorder = recorder
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.use_rts = config.use_rts
        self.min_capacity = config.min_capacity
        self.top2_2nd_expert_sampling = config.top2_2nd_expert_sampling
        layer_seed = draw_layer_seed()
        with torch.random.fork_rng(devices=[]):  # see draw_layer_seed
            self.moe = MoE(
                hidden_size=config.hidden_size,
                expert=MoeMLP(config.hidden_size, config.moe_intermediate_size),
                num_experts=config.num_experts,
                ep_size=ep_size,
                k=config.num_experts_per_tok,
                capacity_factor=config.capacity_factor,
                eval_capacity_factor=config.eval_capacity_factor,
                min_capacity=config.min_capacity,
                use_residual=config.use_residual,
                noisy_gate_policy=config.noisy_gate_policy,
                drop_tokens=config.drop_tokens,
                use_rts=config.use_rts,
                top2_2nd_expert_sampling=config.top2_2nd_expert_sampling,
            )
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
        self.moe.deepspeed_moe.gate.register_forward_hook(self._keep_routes)

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
    def router_weight(self) -> torch.Tensor:
        return self.moe.deepspeed_moe.gate.wg.weight

    def forward(self, hidden_BSD: torch.Tensor) -> torch.Tensor:
        # DeepSpeed's gate samples the second expert and the kept tokens (RTS) in eval mode too; both are training
        # regularizers, and inference must be deterministic (generate with and without cache must agree).
        gate = self.moe.deepspeed_moe.gate
        gate.top2_2nd_expert_sampling = self.training and self.top2_2nd_expert_sampling
        gate.use_rts = self.training and self.use_rts
        x_TD = hidden_BSD.reshape(-1, hidden_BSD.shape[-1])
        # DeepSpeed's top-1 gate asserts T >= min_capacity (a cached decode step of one sequence has T = 1).
        # Below min_capacity every token fits anyway, so capping it changes no routing decision.
        gate.min_capacity = min(self.min_capacity, x_TD.shape[0])
        # The same fp32 logits DeepSpeed's gate computes (before any jitter); recomputed here for the z-loss
        # because the gate does not return them. T x D x E flops: negligible next to the experts.
        router_logits_TE = F.linear(x_TD.float(), self.router_weight.float())
        out_BSD, aux_loss, _ = self.moe(hidden_BSD)
        kept_routes_kT, self._routes_kT = self._routes_kT, None
        self.recorder.record(router_logits_TE, kept_routes=kept_routes_kT, aux_loss=aux_loss)
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

    The routing is DeepSpeed's native gate without drops or noise: softmax over fp32 logits, top-k, renormalized
    for k > 1; so both backends agree whenever the native one drops no token.
    """

    def __init__(self, config: MoeConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.renormalize = renormalizes_top_k(config)
        layer_seed = draw_layer_seed()
        with torch.random.fork_rng(devices=[]):  # see draw_layer_seed
            self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
            self.experts = MoeExperts(config, layer_seed)
            self.shared_experts = (
                MoeMLP(config.hidden_size, config.moe_intermediate_size * config.num_shared_experts)
                if config.num_shared_experts
                else None
            )

    def forward(self, hidden_BSD: torch.Tensor) -> torch.Tensor:
        x_TD = hidden_BSD.reshape(-1, hidden_BSD.shape[-1])
        route = route_top_k(self.gate(x_TD), self.top_k, self.renormalize)
        out_BSD = self.experts(x_TD, route.experts_Tk, route.weights_Tk).view_as(hidden_BSD)
        if self.shared_experts is not None:
            out_BSD = out_BSD + self.shared_experts(hidden_BSD)
        return out_BSD


def autoep_layer_settings(config: MoeConfig) -> dict:
    """The "expert_parallel" keys with which DeepSpeed AutoEP finds every MoeAutoEPBlock and routes as it does.

    Custom patterns rather than a preset: they go through AutoEP's default adapter, which leaves transformers'
    output recorders alone (the mixtral preset's adapter retargets them, and fails with transformers 5.23.0).
    Dense layers match the layer pattern too; AutoEP skips them because they have no `experts`. AutoEP logs that
    its router implements no z-loss: `MoeRouterRecorder` adds it, and the aux loss, outside the replaced layer.
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
        "score_func": "softmax",
        "score_apply": "post",
        "route_norm": renormalizes_top_k(config),
        "has_shared_experts": config.num_shared_experts > 0,
    }
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
        if self.is_moe and not isinstance(self.mlp, MoeSparseBlock):
            self.router_recorder.watch(self.mlp)  # autoep: AutoEP may have replaced the block since the last call
        return hidden_BSD + self.mlp(self.post_attention_layernorm(hidden_BSD))


@dataclass
class MoeModelOutputWithPast(ModelOutput):
    last_hidden_state: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    routing: tuple[MoeRouting, ...] | None = None


@dataclass
class MoeCausalLMOutputWithPast(ModelOutput):
    """`loss` = `lm_loss` + router_aux_loss_coef * `aux_loss` + router_z_loss_coef * `z_loss`.

    `aux_loss` and `z_loss` are summed over the MoE layers. `aux_loss` is DeepSpeed's load-balancing loss, computed
    per rank on its local tokens. The routing fields hold this rank's tokens, one row per MoE layer:
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
        aux_loss = torch.stack([r.aux_loss for r in routing]).sum()
        z_loss = torch.stack([r.z_loss for r in routing]).sum()
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
        )


__all__ = [
    "MoeAutoEPBlock",
    "MoeBatchedExperts",
    "MoeCausalLMOutputWithPast",
    "MoeExperts",
    "MoeForCausalLM",
    "MoeModel",
    "MoePreTrainedModel",
    "MoeRouterRecorder",
    "MoeRouting",
    "MoeSparseBlock",
    "autoep_layer_settings",
    "count_routes",
    "route_top_k",
    "router_z_loss",
]
