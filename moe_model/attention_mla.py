"""Multi-head Latent Attention (DeepSeek-V2, DeepSeek-V3): `MoeConfig.attention="mla"`.

Every token is compressed to one latent of `kv_lora_rank` dims (normalised) plus one `qk_rope_head_dim` key that
carries RoPE and is shared by all heads; `kv_b_proj` expands the latent into each head's position-free key
(`qk_nope_head_dim`) and its value (`v_head_dim`). The KV cache holds the latent and the rotated shared key only:
kv_lora_rank + qk_rope_head_dim numbers per token and layer, against 2 x H x Dh for multi-head attention. Queries go
through a `q_lora_rank` bottleneck (with its own RMSNorm), or one projection when q_lora_rank is None.

The parameter names and shapes are transformers' `DeepseekV3Attention` (q_a_proj, q_a_layernorm, q_b_proj,
kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj), and so is the function, with one difference in layout: RoPE
here rotates halves (dim i pairs with i + R/2, as the GQA attention), DeepSeek's checkpoints pair neighbours
(`rope_interleave=True`); moe_recipe/stock_export.py permutes the rotated rows on export.

Shape legend: B batch, S query length, P cached + new length, H heads, C kv_lora_rank, R qk_rope_head_dim,
N qk_nope_head_dim, Dv v_head_dim, D hidden size.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache

from .configuration_moe import MoeConfig
from .layers import MoeRMSNorm, apply_rotary_pos_emb


class MoeMLAttention(nn.Module):
    """DeepSeek-V3's Multi-head Latent Attention through `F.scaled_dot_product_attention`, scaled by
    1/sqrt(N + R); the KV cache stores the [B, 1, P, C] latent and the [B, 1, P, R] rotated key."""

    def __init__(self, config: MoeConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = H = config.num_attention_heads
        self.kv_lora_rank = C = config.kv_lora_rank
        self.rope_dim = R = config.qk_rope_head_dim
        self.nope_dim = N = config.qk_nope_head_dim
        self.v_head_dim = Dv = config.v_head_dim
        D = config.hidden_size
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * (N + R), bias=False)
        else:
            self.q_a_proj = nn.Linear(D, config.q_lora_rank, bias=False)
            self.q_a_layernorm = MoeRMSNorm(config.q_lora_rank, eps=config.rms_norm_eps)
            self.q_b_proj = nn.Linear(config.q_lora_rank, H * (N + R), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, C + R, bias=False)
        self.kv_a_layernorm = MoeRMSNorm(C, eps=config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(C, H * (N + Dv), bias=False)
        self.o_proj = nn.Linear(H * Dv, D, bias=False)

    def query(self, x_BSD: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "q_proj"):
            return self.q_proj(x_BSD)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BSD)))

    def forward(self, x_BSD, position_embeddings, attn_mask, past_key_values: Cache | None) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        H, C, R, N, Dv = self.num_heads, self.kv_lora_rank, self.rope_dim, self.nope_dim, self.v_head_dim
        q_BHSK = self.query(x_BSD).view(B, S, H, N + R).transpose(1, 2)
        q_nope_BHSN, q_rope_BHSR = q_BHSK.split([N, R], dim=-1)
        latent_BSC, k_rope_BSR = self.kv_a_proj_with_mqa(x_BSD).split([C, R], dim=-1)
        latent_B1SC = self.kv_a_layernorm(latent_BSC)[:, None]
        q_rope_BHSR, k_rope_B1SR = apply_rotary_pos_emb(q_rope_BHSR, k_rope_BSR[:, None], *position_embeddings)
        if past_key_values is not None:  # the cache holds the compressed latent and the shared rotated key
            latent_B1SC, k_rope_B1SR = past_key_values.update(latent_B1SC, k_rope_B1SR, self.layer_idx)
        P = latent_B1SC.shape[2]
        kv_BHPK = self.kv_b_proj(latent_B1SC[:, 0]).view(B, P, H, N + Dv).transpose(1, 2)
        k_nope_BHPN, v_BHPDv = kv_BHPK.split([N, Dv], dim=-1)
        k_BHPK = torch.cat([k_nope_BHPN, k_rope_B1SR.expand(-1, H, -1, -1)], dim=-1)
        # Built [B, S, H, K] and viewed [B, H, S, K], as the GQA attention's q: SDPA's output then comes in that
        # layout, and o_proj reads it without a copy.
        q_BHSK = torch.cat([q_nope_BHSN.transpose(1, 2), q_rope_BHSR.transpose(1, 2)], dim=-1).transpose(1, 2)
        out_BHSDv = F.scaled_dot_product_attention(
            q_BHSK, k_BHPK, v_BHPDv, attn_mask=attn_mask, is_causal=attn_mask is None and S > 1,
        )
        return self.o_proj(out_BHSDv.transpose(1, 2).reshape(B, S, H * Dv))


__all__ = ["MoeMLAttention"]
