"""Configuration of the MoE causal LM whose sparse blocks are DeepSpeed MoE layers."""

import warnings
from dataclasses import dataclass

from transformers import PretrainedConfig

NOISY_GATE_POLICIES = (None, "Jitter", "RSample")


@dataclass(frozen=True)
class MoeBackend:
    """What one implementation of the MoE layers supports. Config validation, checkpoints, export and the planner
    read this table instead of repeating the rules."""

    description: str
    capacity: bool  # an expert capacity: drop_tokens, capacity_factor, eval_capacity_factor, min_capacity
    noisy_gate: bool  # noisy_gate_policy (Jitter, RSample)
    random_token_selection: bool  # use_rts
    sampled_second_expert: bool  # top2_2nd_expert_sampling
    residual_moe: bool  # use_residual (PR-MoE)
    zero3: bool  # trains under ZeRO stage 3
    portable_checkpoint: bool  # layout-independent checkpoint state: resume at another layout, moe-export
    mixtral_export: bool  # moe-export --format mixtral
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
    A decoder-only transformer (RMSNorm, RoPE, GQA through SDPA, SwiGLU) whose feed-forwards are, on the MoE layers,
    DeepSpeed MoE layers (`deepspeed.moe.layer.MoE`), optionally with shared experts beside the routed ones.

    Routing options map one to one onto DeepSpeed's MoE arguments:
    `num_experts`, `num_experts_per_tok` (k), `capacity_factor`, `eval_capacity_factor`, `min_capacity`,
    `drop_tokens`, `noisy_gate_policy` (None, "Jitter", "RSample"), `use_rts`, `top2_2nd_expert_sampling`,
    `use_residual` (PR-MoE).

    The parallel layout is not part of the config: the model is built for it (`MoeForCausalLM(config, ep_size=...,
    ep_rank=...)`), so a saved config never says how many ranks trained it. Configs saved by earlier versions carry
    an `ep_size` key; it is dropped on load.

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
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 4096,
        hidden_size: int = 64,
        intermediate_size: int = 128,
        moe_intermediate_size: int = 128,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 2,
        head_dim: int | None = None,
        max_position_embeddings: int = 256,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        num_experts: int = 8,
        num_experts_per_tok: int = 2,
        capacity_factor: float = 1.0,
        eval_capacity_factor: float = 1.0,
        min_capacity: int = 4,
        drop_tokens: bool = True,
        noisy_gate_policy: str | None = None,
        use_rts: bool = True,
        top2_2nd_expert_sampling: bool = True,
        use_residual: bool = False,
        num_shared_experts: int = 0,
        moe_layer_freq: int = 1,
        first_k_dense_replace: int = 0,
        router_aux_loss_coef: float = 0.01,
        router_z_loss_coef: float = 0.001,
        moe_backend: str = "deepspeed",
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.moe_intermediate_size = moe_intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
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
        self.moe_backend = moe_backend
        kwargs.pop("ep_size", None)  # the layout, stored by configs saved before it moved out of the config
        self.validate()
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def validate(self) -> None:
        """Raise a ValueError naming the field and the fix for any inconsistent setting."""

        def fail(message: str) -> None:
            raise ValueError(f"MoeConfig: {message}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                     "num_experts", "num_experts_per_tok", "moe_layer_freq"):
            if getattr(self, name) < 1:
                fail(f"{name}={getattr(self, name)} must be >= 1.")
        if self.num_attention_heads % self.num_key_value_heads:
            fail(f"num_attention_heads={self.num_attention_heads} is not divisible by num_key_value_heads="
                 f"{self.num_key_value_heads}; pick num_key_value_heads among the divisors of num_attention_heads.")
        if self.head_dim % 2:
            fail(f"head_dim={self.head_dim} must be even for rotary embeddings.")
        if self.num_experts_per_tok > self.num_experts:
            fail(f"num_experts_per_tok={self.num_experts_per_tok} (top-k) exceeds num_experts={self.num_experts}; "
                 "lower num_experts_per_tok or add experts.")
        if self.noisy_gate_policy not in NOISY_GATE_POLICIES:
            fail(f"noisy_gate_policy={self.noisy_gate_policy!r} must be one of None, 'Jitter', 'RSample'.")
        if self.noisy_gate_policy is not None and self.num_experts_per_tok != 1:
            # DeepSpeed applies Jitter to every k, but RSample only inside its top-1 gate.
            if self.noisy_gate_policy == "RSample":
                fail("noisy_gate_policy='RSample' only acts with num_experts_per_tok=1 in DeepSpeed's gate; "
                     "use 'Jitter' or set num_experts_per_tok=1.")
        if self.capacity_factor <= 0 or self.eval_capacity_factor <= 0:
            fail("capacity_factor and eval_capacity_factor must be > 0.")
        if self.min_capacity < 0:
            fail(f"min_capacity={self.min_capacity} must be >= 0.")
        if self.num_shared_experts < 0:
            fail(f"num_shared_experts={self.num_shared_experts} must be >= 0.")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            fail(f"first_k_dense_replace={self.first_k_dense_replace} must lie in [0, num_hidden_layers="
                 f"{self.num_hidden_layers}].")
        if not any(self.is_moe_layer(i) for i in range(self.num_hidden_layers)):
            fail("no layer is an MoE layer with these first_k_dense_replace / moe_layer_freq settings.")
        if self.router_aux_loss_coef < 0 or self.router_z_loss_coef < 0:
            fail("router_aux_loss_coef and router_z_loss_coef must be >= 0.")
        if self.moe_backend not in MOE_BACKENDS:
            fail(f"moe_backend={self.moe_backend!r} must be one of {list(MOE_BACKENDS)}.")
        backend = self.backend_support
        unsupported = [(setting, off, capability) for setting, on, off, capability in (
            ("noisy_gate_policy", self.noisy_gate_policy is not None, "noisy_gate_policy=null", "noisy_gate"),
            ("use_residual", self.use_residual, "use_residual=false", "residual_moe"),
        ) if on and not getattr(backend, capability)]
        if unsupported:
            fail(f"{' and '.join(u[0] for u in unsupported)} not supported by moe_backend={self.moe_backend!r} "
                 f"({backend.description}); set {' and '.join(u[1] for u in unsupported)}, or use moe_backend="
                 f"{' or '.join(repr(b) for b in backends_with(unsupported[0][2]))}.")
        ignored = [name for name, on, supported in (
            ("drop_tokens", self.drop_tokens, backend.capacity),
            ("top2_2nd_expert_sampling", self.top2_2nd_expert_sampling and self.num_experts_per_tok == 2,
             backend.sampled_second_expert),
        ) if on and not supported]
        if ignored:
            warnings.warn(f"MoeConfig: moe_backend={self.moe_backend!r} is dropless top-k routing, so {ignored} (and "
                          "the capacity settings) have no effect; set them to false to silence this warning.",
                          stacklevel=3)

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


__all__ = ["MOE_BACKENDS", "MoeBackend", "MoeConfig", "backends_with"]
