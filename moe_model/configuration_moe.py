"""Configuration of the MoE causal LM whose sparse blocks are DeepSpeed MoE layers."""

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from transformers import PretrainedConfig

NOISY_GATE_POLICIES = (None, "Jitter", "RSample")
SCORE_FUNCS = ("softmax", "sigmoid")
ATTENTIONS = ("gqa", "mla")  # grouped-query attention; DeepSeek-V2/V3's Multi-head Latent Attention
ROUTER_BALANCES = ("none", "aux", "global", "sequence")  # the balancing loss; the expert bias is router_expert_bias
# Configs saved before the expert bias had its own field wrote it into router_balance: old spelling -> the loss.
_BIAS_BALANCES = {"bias": "none", "bias+aux": "aux", "bias+global": "global", "bias+sequence": "sequence"}
# Settings of earlier versions that saved configs still carry: the layout (ep_size) and eval_capacity_factor (eval never
# drops tokens, so it had no effect).
_REMOVED_SETTINGS = ("ep_size", "eval_capacity_factor")
_warned_bias_balance = False  # the old spelling is pointed out once per process, not once per config built


def _split_bias_balance(balance: str, expert_bias: bool) -> tuple[str, bool]:
    """(router_balance, router_expert_bias) in today's form: an old spelling with the bias in router_balance ("bias",
    "bias+sequence", ...) becomes its loss (or "none") and router_expert_bias=True; anything else is returned as is."""
    if balance in _BIAS_BALANCES:
        return _BIAS_BALANCES[balance], True
    return balance, expert_bias


def upgrade_config_dict(config: dict[str, Any]) -> dict[str, Any]:
    """A saved config (a config.json, a checkpoint manifest's model) with today's fields, as MoeConfig loads it: the
    expert bias out of router_balance into router_expert_bias, the removed settings dropped. No warning."""
    upgraded = {key: value for key, value in config.items() if key not in _REMOVED_SETTINGS}
    if "router_balance" in upgraded:
        upgraded["router_balance"], upgraded["router_expert_bias"] = _split_bias_balance(
            upgraded["router_balance"], upgraded.get("router_expert_bias", False))
    return upgraded


Namer = Callable[[str], str]  # a field's name (router_balance) -> the name a message gives it
Message = Callable[[Namer], str]  # a message that names fields only through the namer it is given


class MoeConfigError(ValueError):
    """A MoeConfig setting that cannot work. Its message names the fields through a namer, so that a caller with its
    own names for them words it in those (the recipe: `model.router.balance` for `router_balance`) with
    `render(namer)`; str() uses MoeConfig's names."""

    def __init__(self, message: Message):
        super().__init__(f"MoeConfig: {message(lambda name: name)}")
        self.message = message

    def render(self, name: Namer) -> str:
        """The message with `name(field)` for each field it names."""
        return self.message(name)


@dataclass(frozen=True)
class MoeBackend:
    """What one implementation of the MoE layers supports. Config validation, checkpoints, export and the planner
    read this table instead of repeating the rules."""

    description: str
    capacity: bool  # an expert capacity: drop_tokens, capacity_factor, min_capacity
    noisy_gate: bool  # noisy_gate_policy (Jitter, RSample)
    random_token_selection: bool  # use_rts
    sampled_second_expert: bool  # top2_2nd_expert_sampling
    residual_moe: bool  # use_residual (PR-MoE)
    zero3: bool  # trains under ZeRO stage 3
    portable_checkpoint: bool  # layout-independent checkpoint state: resume at another layout, moe-export
    mixtral_export: bool  # moe-export --format mixtral and the other stock formats (moe_recipe/stock_export.py)
    planned: bool  # moe-plan models its memory and all-to-all


MOE_BACKENDS = {
    "deepspeed": MoeBackend(
        description="DeepSpeed's native MoE layers", capacity=True, noisy_gate=True, random_token_selection=True,
        sampled_second_expert=True, residual_moe=True, zero3=False, portable_checkpoint=True, mixtral_export=True,
        planned=True,
    ),
    "autoep": MoeBackend(
        description="DeepSpeed AutoEP's dropless layers", capacity=False, noisy_gate=False,
        random_token_selection=False, sampled_second_expert=False, residual_moe=False, zero3=True,
        portable_checkpoint=False, mixtral_export=False, planned=False,
    ),
}


def backends_with(capability: str) -> list[str]:
    """The backends that support `capability` (a MoeBackend field), for messages that say what to switch to."""
    return [name for name, backend in MOE_BACKENDS.items() if getattr(backend, capability)]


class MoeConfig(PretrainedConfig):
    r"""
    A decoder-only transformer (RMSNorm, RoPE, GQA or MLA through SDPA, SwiGLU) whose feed-forwards are, on the MoE
    layers, DeepSpeed MoE layers (`deepspeed.moe.layer.MoE`), optionally with shared experts beside the routed ones.

    The keyword arguments of `__init__`, their types and defaults are also the recipe's `model` section
    (moe_recipe/config.py derives its schema from them): a setting is added here, once.

    Routing (`moe_model.routing.route_tokens` is its one implementation):
      - scores: `router_score_func` "softmax" (Mixtral, Qwen3-MoE) or "sigmoid" (DeepSeek-V3) over fp32 logits;
      - choice: the top `num_experts_per_tok` (k) scores, plus the expert bias when `router_expert_bias`; with
        `router_n_group` groups of consecutive experts, only the `router_topk_group` groups with the highest sum
        of their two best scores are eligible (DeepSeek-V3's group-limited routing; with router_n_group = ep_size
        a group is one expert-parallel rank's experts, so a token's routes reach at most router_topk_group ranks);
      - weights: the chosen experts' unbiased scores, divided by their sum when `router_norm_topk_prob` (None:
        for k > 1, DeepSpeed's rule), times `router_scaling_factor`.
    Balancing: `router_balance` picks the loss, weighted by `router_aux_loss_coef`:
      - "aux": DeepSpeed's load-balancing loss, computed per rank on its own tokens (so it depends on the layout);
      - "global": the same Switch-style loss with the expert frequencies counted over the whole data- and
        expert-parallel world (Megatron-Core's global aux loss), so loss and gradient do not depend on the layout;
      - "sequence": DeepSeek-V3's complementary sequence-wise loss, averaged over sequences;
      - "none": no balancing loss.
    `router_expert_bias`, beside any of them, is auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias
    (`e_score_correction_bias`, a buffer) added to the scores for the choice only, moved by
    `router_bias_update_rate` towards balance after each optimizer step from the global load. DeepSeek-V3 pairs it
    with a small "sequence" loss. `router_z_loss_coef` weighs ST-MoE's z-loss in every case. Configs saved before
    the bias had its own field spell it in router_balance ("bias", "bias+sequence", ...); they load as that loss
    (or "none") with router_expert_bias=True, with a FutureWarning.
    Training-only options map onto DeepSpeed's MoE arguments: `capacity_factor`, `min_capacity`, `drop_tokens`
    (capacity-based token dropping while training; eval, generate() and exports never drop, so a sequence's
    outputs do not depend on its batch mates), `noisy_gate_policy` (None, "Jitter", "RSample"), `use_rts`
    (top-1 only), `top2_2nd_expert_sampling` (top-2 only), `use_residual` (PR-MoE). DeepSpeed's own gate routes
    when it can express the routing (softmax, no bias, no groups, no scaling, DeepSpeed's top-k normalisation);
    otherwise the layer gets `MoeGate`, the project's gate with the same contract.

    The parallel layout is not part of the config: the model is built for it (`MoeForCausalLM(config, ep_size=...,
    ep_rank=...)`), so a saved config never says how many ranks trained it. Configs saved by earlier versions carry
    an `ep_size` key, and an `eval_capacity_factor` that never had an effect; both are dropped on load.

    Attention (`attention`):
      - "gqa": grouped-query attention, `num_attention_heads` query heads of `head_dim` sharing
        `num_key_value_heads` key/value heads; `qk_norm` adds Qwen3's RMSNorm over each head of q and k before RoPE.
      - "mla": DeepSeek-V2/V3's Multi-head Latent Attention (moe_model/attention_mla.py), with DeepSeek-V3's fields:
        the query goes through a `q_lora_rank` bottleneck (None: projected directly, as DeepSeek-V2-Lite); keys and
        values come from one `kv_lora_rank` latent per token plus one `qk_rope_head_dim` key shared by all heads,
        which is all the KV cache holds; per head, q and k have `qk_nope_head_dim` dims without position and
        `qk_rope_head_dim` with RoPE, v has `v_head_dim`. `num_key_value_heads`, `head_dim` and `qk_norm` are for
        "gqa" only.

    Layer `i` is an MoE layer when `i >= first_k_dense_replace` and `i % moe_layer_freq == 0` (DeepSeek's rule);
    the others use a dense SwiGLU of `intermediate_size`.

    `moe_backend` picks the implementation of the MoE layers; both compute the same function from the same weights
    when no token is dropped, and one seed gives both the same initial weights:
      - "deepspeed": DeepSpeed's native MoE layer (capacity, token dropping, its gates' noise options).
      - "autoep": a Mixtral-layout block (`gate` + fused `experts.gate_up_proj` / `experts.down_proj`) that
        DeepSpeed AutoEP (the "expert_parallel" DeepSpeed config) swaps for its dropless grouped-GEMM layer; the
        only DeepSpeed MoE path that works with ZeRO-3. Always dropless, so the capacity settings do not apply.
    """

    model_type = "deepspeed_moe"
    # The settings that fix the names and shapes of the parameters and buffers: weights (a checkpoint, an export) load
    # only into a model that agrees on all of them.
    architecture_settings = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                             "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                             "attention", "qk_norm", "q_lora_rank", "kv_lora_rank", "qk_rope_head_dim",
                             "qk_nope_head_dim", "v_head_dim",
                             "num_experts", "num_shared_experts", "use_residual", "moe_layer_freq",
                             "first_k_dense_replace", "tie_word_embeddings", "moe_backend", "router_expert_bias")
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 4096,
        hidden_size: int = 64,
        intermediate_size: int = 128,  # the dense layers' SwiGLU
        moe_intermediate_size: int = 128,  # each expert's SwiGLU
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 2,
        head_dim: int | None = None,  # None: hidden_size // num_attention_heads (which must then divide evenly)
        attention: str = "gqa",  # gqa | mla
        qk_norm: bool = False,  # gqa: RMSNorm over each head of q and k before RoPE (Qwen3)
        q_lora_rank: int | None = None,  # mla: the query's low-rank bottleneck (None: no bottleneck)
        kv_lora_rank: int = 32,  # mla: the compressed key/value latent per token (what the cache holds)
        qk_rope_head_dim: int = 8,  # mla: per head, the q/k dims with RoPE (k's shared by all heads)
        qk_nope_head_dim: int = 16,  # mla: per head, the q/k dims without position
        v_head_dim: int = 16,  # mla: per head, the value dims
        max_position_embeddings: int = 256,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        num_experts: int = 8,
        num_experts_per_tok: int = 2,
        capacity_factor: float = 1.0,
        min_capacity: int = 4,
        drop_tokens: bool = True,
        noisy_gate_policy: str | None = None,
        use_rts: bool = False,  # DeepSpeed's top-1 gate only (its default is true)
        top2_2nd_expert_sampling: bool = False,  # DeepSpeed's top-2 gate only (its default is true)
        use_residual: bool = False,
        num_shared_experts: int = 0,
        moe_layer_freq: int = 1,
        first_k_dense_replace: int = 0,
        router_aux_loss_coef: float = 0.01,
        router_z_loss_coef: float = 0.001,
        router_balance: str = "aux",  # none | aux | global | sequence
        router_expert_bias: bool = False,
        router_score_func: str = "softmax",  # softmax | sigmoid
        router_norm_topk_prob: bool | None = None,  # None: for k > 1
        router_scaling_factor: float = 1.0,  # routed_scaling_factor: multiplies the routed experts' weights
        router_n_group: int | None = None,  # group-limited routing (n_group = ep_size: one group per rank) ...
        router_topk_group: int | None = None,  # ... of which each token may use topk_group
        router_bias_update_rate: float = 0.001,  # with router_expert_bias: the bias moves this much per step
        moe_backend: str = "deepspeed",  # deepspeed | autoep
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        **kwargs,
    ):
        global _warned_bias_balance
        if router_balance in _BIAS_BALANCES and not _warned_bias_balance:
            _warned_bias_balance = True
            loss = _BIAS_BALANCES[router_balance]
            warnings.warn(f"MoeConfig: router_balance={router_balance!r} is the old spelling of router_balance="
                          f"{loss!r} with router_expert_bias=True, and loads as that; write the new one (in the "
                          f"recipe: model.router.balance={loss} model.router.expert_bias=true).", FutureWarning,
                          stacklevel=2)
        router_balance, router_expert_bias = _split_bias_balance(router_balance, router_expert_bias)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.moe_intermediate_size = moe_intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.attention = attention
        self.qk_norm = qk_norm
        self.q_lora_rank = q_lora_rank
        self.kv_lora_rank = kv_lora_rank
        self.qk_rope_head_dim = qk_rope_head_dim
        self.qk_nope_head_dim = qk_nope_head_dim
        self.v_head_dim = v_head_dim
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.capacity_factor = capacity_factor
        self.min_capacity = min_capacity
        self.drop_tokens = drop_tokens
        self.noisy_gate_policy = None if noisy_gate_policy in (None, "None", "none") else noisy_gate_policy
        self.use_rts = use_rts
        self.top2_2nd_expert_sampling = top2_2nd_expert_sampling
        self.use_residual = use_residual
        self.num_shared_experts = num_shared_experts
        self.moe_layer_freq = moe_layer_freq
        self.first_k_dense_replace = first_k_dense_replace
        self.router_aux_loss_coef = router_aux_loss_coef
        self.router_z_loss_coef = router_z_loss_coef
        self.router_balance = router_balance
        self.router_expert_bias = router_expert_bias
        self.router_score_func = router_score_func
        self.router_norm_topk_prob = router_norm_topk_prob
        self.router_scaling_factor = router_scaling_factor
        self.router_n_group = router_n_group
        self.router_topk_group = router_topk_group
        self.router_bias_update_rate = router_bias_update_rate
        self.moe_backend = moe_backend
        for key in _REMOVED_SETTINGS:
            kwargs.pop(key, None)
        self.validate()
        if self.head_dim is None:  # derived after validate, which refuses a head count that does not divide
            self.head_dim = hidden_size // num_attention_heads
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def validate(self) -> None:
        """Raise a MoeConfigError (a ValueError) naming the field and the fix for any inconsistent setting."""

        def fail(message: Message) -> None:
            raise MoeConfigError(message)

        # Before head_dim is derived (by dividing): a head count of 0 is refused here, not met by ZeroDivisionError.
        for name in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "num_experts",
                     "num_experts_per_tok", "moe_layer_freq"):
            if getattr(self, name) < 1:
                fail(lambda n: f"{n(name)}={getattr(self, name)} must be >= 1.")
        H, Hkv = self.num_attention_heads, self.num_key_value_heads
        if self.head_dim is None and self.hidden_size % H:
            fail(lambda n: f"{n('hidden_size')}={self.hidden_size} is not divisible by {n('num_attention_heads')}={H}; "
                 f"pick a head count that divides it, or set {n('head_dim')} explicitly (the attention then projects "
                 "to num_attention_heads * head_dim).")
        head_dim = self.hidden_size // H if self.head_dim is None else self.head_dim
        if head_dim < 1:
            fail(lambda n: f"{n('head_dim')}={head_dim} must be >= 1.")
        if head_dim % 2:
            fail(lambda n: f"{n('head_dim')}={head_dim} must be even for rotary embeddings.")
        if H % Hkv:
            fail(lambda n: f"{n('num_attention_heads')}={H} is not divisible by {n('num_key_value_heads')}={Hkv}; "
                 f"pick {n('num_key_value_heads')} among the divisors of {n('num_attention_heads')}.")
        self.validate_attention(fail)
        for name in ("rope_theta", "rms_norm_eps", "capacity_factor"):
            if getattr(self, name) <= 0:
                fail(lambda n: f"{n(name)}={getattr(self, name)} must be > 0.")
        for name in ("min_capacity", "initializer_range", "num_shared_experts", "router_aux_loss_coef",
                     "router_z_loss_coef"):
            if getattr(self, name) < 0:
                fail(lambda n: f"{n(name)}={getattr(self, name)} must be >= 0.")
        k, E = self.num_experts_per_tok, self.num_experts
        if k > E:
            fail(lambda n: f"{n('num_experts_per_tok')}={k} (top-k) exceeds {n('num_experts')}={E}; lower "
                 f"{n('num_experts_per_tok')} or add experts.")
        if self.noisy_gate_policy not in NOISY_GATE_POLICIES:
            fail(lambda n: f"{n('noisy_gate_policy')}={self.noisy_gate_policy!r} must be one of None, 'Jitter', "
                 "'RSample'.")
        # DeepSpeed applies Jitter to every k, but RSample only inside its top-1 gate.
        if self.noisy_gate_policy == "RSample" and k != 1:
            fail(lambda n: f"{n('noisy_gate_policy')}='RSample' only acts with {n('num_experts_per_tok')}=1 in "
                 f"DeepSpeed's gate; use 'Jitter' or set {n('num_experts_per_tok')}=1.")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            fail(lambda n: f"{n('first_k_dense_replace')}={self.first_k_dense_replace} must lie in [0, "
                 f"{n('num_hidden_layers')}={self.num_hidden_layers}].")
        if not any(self.is_moe_layer(i) for i in range(self.num_hidden_layers)):
            fail(lambda n: f"no layer is an MoE layer with these {n('first_k_dense_replace')} / "
                 f"{n('moe_layer_freq')} settings.")
        self.validate_router(fail)
        if self.moe_backend not in MOE_BACKENDS:
            fail(lambda n: f"{n('moe_backend')}={self.moe_backend!r} must be one of {list(MOE_BACKENDS)}.")
        backend = self.backend_support
        unsupported = [(setting, off, capability) for setting, on, off, capability in (
            ("noisy_gate_policy", self.noisy_gate_policy is not None, "null", "noisy_gate"),
            ("use_residual", self.use_residual, "false", "residual_moe"),
        ) if on and not getattr(backend, capability)]
        if unsupported:
            fail(lambda n: f"{' and '.join(n(u[0]) for u in unsupported)} not supported by {n('moe_backend')}="
                 f"{self.moe_backend!r} ({backend.description}); set "
                 f"{' and '.join(f'{n(u[0])}={u[1]}' for u in unsupported)}, or use {n('moe_backend')}="
                 f"{' or '.join(repr(b) for b in backends_with(unsupported[0][2]))}.")
        ignored = [name for name, on, supported in (
            ("drop_tokens", self.drop_tokens, backend.capacity),
            ("top2_2nd_expert_sampling", self.top2_2nd_expert_sampling and k == 2, backend.sampled_second_expert),
        ) if on and not supported]
        if ignored:
            warnings.warn(f"MoeConfig: moe_backend={self.moe_backend!r} is dropless top-k routing, so {ignored} (and "
                          "the capacity settings) have no effect; set them to false to silence this warning.",
                          stacklevel=3)
        for message in self.ineffective_settings():
            warnings.warn(f"MoeConfig: {message}", stacklevel=3)

    def validate_attention(self, fail: Callable[[Message], None]) -> None:
        if self.attention not in ATTENTIONS:
            fail(lambda n: f"{n('attention')}={self.attention!r} must be one of {list(ATTENTIONS)}.")
        if self.attention != "mla":
            return
        if self.qk_norm:
            fail(lambda n: f"{n('qk_norm')}=true is for {n('attention')}='gqa'; MLA normalises its latents instead. "
                 f"Set {n('qk_norm')}=false.")
        for name in ("kv_lora_rank", "qk_rope_head_dim", "v_head_dim"):
            if getattr(self, name) < 1:
                fail(lambda n: f"{n(name)}={getattr(self, name)} must be >= 1.")
        if self.qk_nope_head_dim < 0:
            fail(lambda n: f"{n('qk_nope_head_dim')}={self.qk_nope_head_dim} must be >= 0.")
        if self.q_lora_rank is not None and self.q_lora_rank < 1:
            fail(lambda n: f"{n('q_lora_rank')}={self.q_lora_rank} must be >= 1, or null for no query bottleneck.")
        if self.qk_rope_head_dim % 2:
            fail(lambda n: f"{n('qk_rope_head_dim')}={self.qk_rope_head_dim} must be even for rotary embeddings.")

    def validate_router(self, fail: Callable[[Message], None]) -> None:
        if self.router_balance not in ROUTER_BALANCES:
            fail(lambda n: f"{n('router_balance')}={self.router_balance!r} must be one of {list(ROUTER_BALANCES)} "
                 f"(the balancing loss); the expert bias is {n('router_expert_bias')}=true, beside any of them.")
        if not isinstance(self.router_expert_bias, bool):
            fail(lambda n: f"{n('router_expert_bias')}={self.router_expert_bias!r} must be true or false.")
        if self.router_score_func not in SCORE_FUNCS:
            fail(lambda n: f"{n('router_score_func')}={self.router_score_func!r} must be one of {list(SCORE_FUNCS)}.")
        if self.router_scaling_factor <= 0:
            fail(lambda n: f"{n('router_scaling_factor')}={self.router_scaling_factor} must be > 0.")
        if self.router_bias_update_rate < 0:
            fail(lambda n: f"{n('router_bias_update_rate')}={self.router_bias_update_rate} must be >= 0.")
        if (self.router_n_group is None) != (self.router_topk_group is None):
            fail(lambda n: f"{n('router_n_group')} and {n('router_topk_group')} go together: set both (group-limited "
                 "routing) or neither.")
        if self.router_n_group is not None:
            E, groups, topk_group = self.num_experts, self.router_n_group, self.router_topk_group
            if groups < 1 or E % groups or E // groups < 2:
                fail(lambda n: f"{n('router_n_group')}={groups} must divide {n('num_experts')}={E} into groups of at "
                     "least 2 experts (a group is scored by the sum of its two best experts).")
            if not 1 <= topk_group <= groups:
                fail(lambda n: f"{n('router_topk_group')}={topk_group} must lie in [1, {n('router_n_group')}="
                     f"{groups}].")
            if topk_group * (E // groups) < self.num_experts_per_tok:
                fail(lambda n: f"{n('router_topk_group')}={topk_group} groups of {E // groups} experts hold fewer "
                     f"than {n('num_experts_per_tok')}={self.num_experts_per_tok}; raise {n('router_topk_group')}.")
        if not self.uses_deepspeed_gate and self.noisy_gate_policy is not None:
            fail(lambda n: f"{n('noisy_gate_policy')}={self.noisy_gate_policy!r} needs DeepSpeed's own gate, which "
                 f"cannot express this routing ({', '.join(self.routing_beyond_deepspeed_gate())}); set "
                 f"{n('noisy_gate_policy')}=null.")

    def ineffective_settings(self) -> list[str]:
        """Settings that are accepted but change nothing with this config: each one a message that says why."""
        k, messages = self.num_experts_per_tok, []
        deepspeed_gate = self.backend_support.capacity and self.uses_deepspeed_gate
        if self.use_rts and (k != 1 or not deepspeed_gate):
            messages.append("use_rts (Random Token Selection) acts only in DeepSpeed's top-1 gate; it has no effect "
                            f"with num_experts_per_tok={k}" + ("" if deepspeed_gate else " or this routing") +
                            "; set use_rts=false.")
        if self.top2_2nd_expert_sampling and self.backend_support.sampled_second_expert and (
                k != 2 or not deepspeed_gate):
            messages.append("top2_2nd_expert_sampling acts only in DeepSpeed's top-2 gate; it has no effect here; "
                            "set top2_2nd_expert_sampling=false.")
        if self.balance_loss is None and self.router_aux_loss_coef > 0:
            messages.append(f"router_aux_loss_coef={self.router_aux_loss_coef} has no effect with router_balance="
                            f"{self.router_balance!r} (no balancing loss); set it to 0, or use "
                            "router_balance='sequence' for DeepSeek-V3's small sequence-wise loss.")
        if self.attention == "mla" and self.num_key_value_heads != self.num_attention_heads:
            messages.append(f"num_key_value_heads={self.num_key_value_heads} has no effect with attention='mla' (every "
                            "head gets its own keys and values from the shared latent); set it to num_attention_heads="
                            f"{self.num_attention_heads}.")
        if not self.router_expert_bias and self.router_bias_update_rate != 0.001:
            messages.append("router_bias_update_rate has no effect without the expert bias (router_expert_bias=true).")
        return messages

    @property
    def rope_head_dim(self) -> int:
        """The dims RoPE rotates per head: head_dim with GQA, qk_rope_head_dim with MLA."""
        return self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

    @property
    def balance_loss(self) -> str | None:
        """The balancing loss ("aux", "global", "sequence"), or None for router_balance="none"."""
        return None if self.router_balance == "none" else self.router_balance

    @property
    def uses_expert_bias(self) -> bool:
        """Auxiliary-loss-free balancing: a per-expert bias on the scores for the top-k choice."""
        return self.router_expert_bias

    @property
    def norm_topk(self) -> bool:
        """Whether the chosen experts' weights are divided by their sum (None: DeepSpeed's rule, for k > 1)."""
        if self.router_norm_topk_prob is None:
            return self.num_experts_per_tok > 1
        return self.router_norm_topk_prob

    def routing_beyond_deepspeed_gate(self) -> list[str]:
        """What in this routing DeepSpeed's TopKGate cannot do (empty: it can route this config)."""
        return [what for what, on in (
            (f"router_score_func={self.router_score_func!r}", self.router_score_func != "softmax"),
            ("the expert bias", self.uses_expert_bias),
            ("group-limited routing", self.router_n_group is not None),
            (f"router_scaling_factor={self.router_scaling_factor}", self.router_scaling_factor != 1.0),
            (f"router_norm_topk_prob={self.router_norm_topk_prob}", self.norm_topk != (self.num_experts_per_tok > 1)),
        ) if on]

    @property
    def uses_deepspeed_gate(self) -> bool:
        """The native backend routes with DeepSpeed's TopKGate (else with the project's MoeGate)."""
        return not self.routing_beyond_deepspeed_gate()

    @property
    def backend_support(self) -> MoeBackend:
        """What this config's moe_backend supports."""
        return MOE_BACKENDS[self.moe_backend]

    def validate_ep_size(self, ep_size: int) -> None:
        """Raise a ValueError unless `ep_size` ranks can split the experts evenly."""
        if ep_size < 1 or self.num_experts % ep_size:
            divisors = [d for d in range(1, self.num_experts + 1) if self.num_experts % d == 0]
            raise ValueError(f"num_experts={self.num_experts} is not divisible by ep_size={ep_size}; choose an "
                             f"ep_size that divides num_experts (one of {divisors}).")

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace and layer_idx % self.moe_layer_freq == 0

    @property
    def moe_layer_indices(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]


__all__ = ["ATTENTIONS", "MOE_BACKENDS", "ROUTER_BALANCES", "SCORE_FUNCS", "MoeBackend", "MoeConfig", "MoeConfigError",
           "backends_with", "upgrade_config_dict"]
