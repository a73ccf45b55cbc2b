"""A Hugging Face-style MoE causal LM whose sparse blocks are DeepSpeed MoE layers: the transformer, in HF's layout.

The MoE blocks are in moe_blocks.py (`MoeConfig.moe_backend` picks `MoeSparseBlock`, DeepSpeed's native MoE layer, or
`MoeAutoEPBlock`, the block DeepSpeed AutoEP replaces); routing, balancing losses and the router state of each MoE
layer are in routing.py.

Shape legend used in tensor names:
    B batch, S query length, P cached (past) length, T tokens (B * S), D hidden size, V vocab,
    H attention heads, Hkv key/value heads, Dh head dim, E experts, L MoE layers.
The Multi-head Latent Attention (`MoeConfig.attention="mla"`) is in attention_mla.py; RMSNorm and RoPE's rotation,
which both attentions use, in layers.py.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast as HFMoeCausalLMOutputWithPast
from transformers.modeling_outputs import MoeModelOutputWithPast as HFMoeModelOutputWithPast

from .attention_mla import MoeMLAttention
from .configuration_moe import MoeConfig
from .layers import MoeRMSNorm, apply_rotary_pos_emb
from .moe_blocks import MoeAutoEPBlock, MoeExperts, MoeMLP, MoeSparseBlock
from .routing import EXPERT_BIAS, MoeRouterState, MoeRoutingMetrics, routers_post_step

# transformers 5.24 renamed the KV cache, as forward argument and output field, from `past_key_values` to `cache`; 5.23
# knows only the old name. generate() passes the cache under the installed version's name and reads it back from the
# output under that name: a forward that ignored `cache` would build a fresh cache at every step and decode from the
# last token alone (5.25: wrong tokens, no error). So the forward takes either name and the outputs subclass
# transformers' own, whose field has the installed version's name (CACHE_NAME).
CACHE_NAME = "cache" if "cache" in HFMoeModelOutputWithPast.__dataclass_fields__ else "past_key_values"


class MoeRotaryEmbedding(nn.Module):
    def __init__(self, config: MoeConfig) -> None:
        super().__init__()
        self.head_dim = config.rope_head_dim
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


class MoeAttention(nn.Module):
    """Grouped-query attention through `F.scaled_dot_product_attention` (fused kernels where the device has them);
    with `qk_norm`, Qwen3's RMSNorm over each head of q and k before RoPE."""

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
        if config.qk_norm:
            self.q_norm = MoeRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = MoeRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.qk_norm = config.qk_norm

    def forward(self, x_BSD, position_embeddings, attn_mask, cache: Cache | None) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q_BHSDh = self.q_proj(x_BSD).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)
        k_BHkvSDh = self.k_proj(x_BSD).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v_BHkvSDh = self.v_proj(x_BSD).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q_BHSDh, k_BHkvSDh = self.q_norm(q_BHSDh), self.k_norm(k_BHkvSDh)
        q_BHSDh, k_BHkvSDh = apply_rotary_pos_emb(q_BHSDh, k_BHkvSDh, *position_embeddings)
        if cache is not None:
            k_BHkvSDh, v_BHkvSDh = cache.update(k_BHkvSDh, v_BHkvSDh, self.layer_idx)
        out_BHSDh = F.scaled_dot_product_attention(
            q_BHSDh,
            k_BHkvSDh,
            v_BHkvSDh,
            attn_mask=attn_mask,
            is_causal=attn_mask is None and S > 1,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return self.o_proj(out_BHSDh.transpose(1, 2).reshape(B, S, -1))


class MoeDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: MoeConfig, layer_idx: int, ep_size: int = 1, ep_rank: int = 0) -> None:
        super().__init__()
        self.self_attn = (MoeMLAttention if config.attention == "mla" else MoeAttention)(config, layer_idx)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.router_state = MoeRouterState(config, self.expert_bias_owner) if self.is_moe else None
        if not self.is_moe:
            self.mlp = MoeMLP(config.hidden_size, config.intermediate_size)
        elif config.moe_backend == "autoep":
            self.mlp = MoeAutoEPBlock(config, self.router_state)
        else:
            self.mlp = MoeSparseBlock(config, self.router_state, ep_size, ep_rank)
        self.input_layernorm = MoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = MoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_BSD, position_embeddings, attn_mask=None, cache=None) -> torch.Tensor:
        hidden_BSD = hidden_BSD + self.self_attn(
            self.input_layernorm(hidden_BSD), position_embeddings, attn_mask, cache
        )
        if self.is_moe:
            self.router_state.batch_size = hidden_BSD.shape[0]
            if not isinstance(self.mlp, (MoeSparseBlock, MoeAutoEPBlock)):
                self.router_state.watch(self.mlp)  # AutoEP replaced the block inside deepspeed.initialize
        return hidden_BSD + self.mlp(self.post_attention_layernorm(hidden_BSD))

    def expert_bias_owner(self) -> nn.Module | None:
        """The module whose `e_score_correction_bias` buffer this MoE layer routes with (None without a bias):
        DeepSpeed's gate slot (MoeGate), MoeAutoEPBlock's gate, or AutoEP's router once it replaced the block."""
        if not self.is_moe:
            return None
        owner = self.mlp.gate if isinstance(self.mlp, (MoeSparseBlock, MoeAutoEPBlock)) else self.mlp.router
        return owner if getattr(owner, EXPERT_BIAS, None) is not None else None


@dataclass
class MoeModelOutputWithPast(HFMoeModelOutputWithPast):
    """transformers' MoE model output (its cache field is CACHE_NAME) plus `aux_loss` and `z_loss`, summed over the
    MoE layers; `router_logits` (one [T, E] fp32 tensor per MoE layer) only when asked for
    (`output_router_logits=True`)."""

    aux_loss: torch.FloatTensor | None = None
    z_loss: torch.FloatTensor | None = None


@dataclass
class MoeCausalLMOutputWithPast(HFMoeCausalLMOutputWithPast):
    """transformers' MoE causal-LM output (its cache field is CACHE_NAME) plus `lm_loss` and `z_loss`.

    `loss` = `lm_loss` + router_aux_loss_coef * `aux_loss` + router_z_loss_coef * `z_loss`.
    `aux_loss` (the balancing loss of router_balance, 0 when it has none) and `z_loss` are summed over the MoE
    layers. `router_logits` holds one [T, E] fp32 tensor per MoE layer (this rank's tokens) when asked for
    (`output_router_logits=True`). Training statistics (routes per expert, drops, each layer's losses) are not
    outputs: each MoE layer's `MoeRouterState` sums them (`MoeForCausalLM.routing_metrics`).
    """

    lm_loss: torch.FloatTensor | None = None
    z_loss: torch.FloatTensor | None = None


class MoePreTrainedModel(PreTrainedModel):
    config: MoeConfig
    config_class = MoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MoeDecoderLayer"]
    _skip_keys_device_placement = [CACHE_NAME]
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
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool = False,
        past_key_values: Cache | None = None,  # the cache's name up to transformers 5.23 (see CACHE_NAME)
        **kwargs,
    ) -> MoeModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        cache = past_key_values if cache is None else cache
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and not self.training:
            cache = DynamicCache(config=self.config)
        if not use_cache:
            cache = None
        hidden_BSD = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, S, _ = hidden_BSD.shape
        past_len = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + S, device=hidden_BSD.device)[None].expand(B, -1)
        attn_mask = build_attention_mask(attention_mask, B, S, past_len, hidden_BSD.device)
        position_embeddings = self.rotary_emb(hidden_BSD, position_ids)
        aux_losses, z_losses, router_logits = [], [], []
        for layer in self.layers:
            hidden_BSD = layer(hidden_BSD, position_embeddings, attn_mask, cache)
            if layer.router_state is not None:
                # Collected here, once per forward: activation checkpointing runs the layer again in backward.
                routing = layer.router_state.pop()
                aux_losses.append(routing.aux_loss)
                z_losses.append(routing.z_loss)
                router_logits.append(routing.router_logits_TE)
        return MoeModelOutputWithPast(
            last_hidden_state=self.norm(hidden_BSD), aux_loss=torch.stack(aux_losses).sum(),
            z_loss=torch.stack(z_losses).sum(), router_logits=tuple(router_logits) if output_router_logits else None,
            **{CACHE_NAME: cache},
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
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        output_router_logits: bool = False,
        past_key_values: Cache | None = None,  # the cache's name up to transformers 5.23 (see CACHE_NAME)
        **kwargs,
    ) -> MoeCausalLMOutputWithPast:
        """`labels` are the input ids (the shift happens here); -100 marks positions without a target. The KV cache
        comes as `cache` (transformers >= 5.24) or `past_key_values` (5.23) and goes out under CACHE_NAME."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=past_key_values if cache is None else cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
        )
        hidden_BSD = outputs.last_hidden_state
        logits_BSV = self.lm_head(hidden_BSD[:, -logits_to_keep:] if logits_to_keep else hidden_BSD)
        aux_loss, z_loss = outputs.aux_loss, outputs.z_loss
        lm_loss = loss = None
        if labels is not None:
            lm_loss = F.cross_entropy(
                logits_BSV[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
            loss = lm_loss + self.config.router_aux_loss_coef * aux_loss + self.config.router_z_loss_coef * z_loss
        return MoeCausalLMOutputWithPast(
            loss=loss, lm_loss=lm_loss, aux_loss=aux_loss, z_loss=z_loss, logits=logits_BSV,
            router_logits=outputs.router_logits, **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
        )

    def moe_layers(self) -> list[MoeDecoderLayer]:
        return [layer for layer in self.model.layers if layer.is_moe]

    def expert_bias(self) -> torch.Tensor | None:
        """[L, E] fp32: each MoE layer's expert bias (router_expert_bias), or None."""
        if not self.config.uses_expert_bias:
            return None
        return torch.stack([router.expert_bias.detach().float() for router in self.routers()])

    def routers(self) -> list[MoeRouterState]:
        """Each MoE layer's router state, in decoder order."""
        return [layer.router_state for layer in self.moe_layers()]

    def routing_metrics(self, reset: bool = True, group=None) -> MoeRoutingMetrics:
        """Collective: the routers' sums since the last reset, over every rank of `group` (None: all), in one
        all_reduce (`MoeRoutingMetrics.reduce`)."""
        return MoeRoutingMetrics.reduce(self.routers(), reset=reset, group=group)

    def post_step(self, group=None) -> None:
        """Collective, after each optimizer step: with the expert bias, every MoE layer moves its bias by the load of
        the step's global batch, summed over `group` (None: every rank) in one all_reduce (`routers_post_step`)."""
        routers_post_step(self.routers(), group=group)


__all__ = [
    "MoeCausalLMOutputWithPast",
    "MoeDecoderLayer",
    "MoeForCausalLM",
    "MoeModel",
    "MoeModelOutputWithPast",
    "MoePreTrainedModel",
]
