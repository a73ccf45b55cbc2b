"""The pieces both attentions share (modeling_moe.py's grouped-query attention and attention_mla.py's latent one):
RMSNorm and the rotation of RoPE.

Shape legend: B batch, H heads, S sequence, Dh the rotated dims of a head.
"""

import torch
from torch import nn


class MoeRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_fp32 = x.float()
        x_fp32 = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x_fp32.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos_BSDh, sin_BSDh):
    """RoPE in the rotate-half layout (dim i pairs with i + Dh/2), on [B, H, S, Dh] queries and keys (any H each)."""
    cos, sin = cos_BSDh.unsqueeze(1), sin_BSDh.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


__all__ = ["MoeRMSNorm", "apply_rotary_pos_emb", "rotate_half"]
