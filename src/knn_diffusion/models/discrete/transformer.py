"""The discrete backbone's network: a decoder-only transformer over VQ token maps (paper 6.7).

Each block is full self-attention over the h*w tokens, cross-attention to the kNN condition tokens
(the shared :class:`~knn_diffusion.models.conditioning.Conditioner`), and a feed-forward layer; the
diffusion step n enters every layer norm through adaptive layer norm (scale and shift from n). The
output is x0-parameterised: log p(x_0 | x_n, y) over the V codes at every position.

The cross-attention keys and values have no bias, so the all-zero null condition (zero tokens)
contributes only a constant: guidance with y' = 0 works without fine-tuning (supplement 6.7).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from knn_diffusion.models.conditioning import build_conditioner
from knn_diffusion.models.discrete.config import DiscreteConfig, TransformerConfig


class SelfAttention(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, L, C)
        q, k, v = (t.view(B, L, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, L, hs)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)  # (B, nh, L, hs)
        return self.proj(y.transpose(1, 2).reshape(B, L, C))  # (B, L, C)


class CrossAttention(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.n_head = config.n_head
        self.q = nn.Linear(config.n_embd, config.n_embd)
        self.kv = nn.Linear(config.n_embd, 2 * config.n_embd, bias=False)  # zero condition -> zero keys/values
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        T = context.shape[1]
        q = self.q(x).view(B, L, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, L, hs)
        k, v = self.kv(context).split(C, dim=2)  # 2 x (B, T, C)
        k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)  # (B, nh, L, hs)
        return self.proj(y.transpose(1, 2).reshape(B, L, C))  # (B, L, C)


class MLP(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        hidden = config.mlp_ratio * config.n_embd
        self.fc = nn.Linear(config.n_embd, hidden)
        self.proj = nn.Linear(hidden, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Adaptive layer norm's affine part: x (B, L, C), shift/scale (B, C)."""
    return x * (1 + scale[:, None]) + shift[:, None]


class Block(nn.Module):
    """Self-attention, cross-attention, feed-forward; each after an AdaLN conditioned on the step."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(config.n_embd, elementwise_affine=False) for _ in range(3))
        self.ada = nn.Linear(config.n_embd, 6 * config.n_embd)  # step embedding -> 3 x (shift, scale)
        self.self_attn = SelfAttention(config)
        self.cross_attn = CrossAttention(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, step: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        s1, c1, s2, c2, s3, c3 = self.ada(step).chunk(6, dim=1)  # 6 x (B, C)
        x = x + self.self_attn(modulate(self.norms[0](x), s1, c1))
        x = x + self.cross_attn(modulate(self.norms[1](x), s2, c2), context)
        return x + self.mlp(modulate(self.norms[2](x), s3, c3))  # (B, L, C)


def step_embedding(n: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the diffusion step: n (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=n.device, dtype=torch.float32) / half)
    angles = n.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([angles.sin(), angles.cos(), torch.zeros_like(angles[:, :dim % 2])], dim=1)


class TokenDenoiser(nn.Module):
    """p_theta(x_0 | x_n, n, y): token map x_n (B, L) with [MASK] = V -> log-probabilities (B, V, L)."""

    def __init__(self, config: DiscreteConfig):
        super().__init__()
        self.config = config
        t = config.transformer
        self.num_codes = t.num_codes
        self.conditioner = build_conditioner(config.conditioning, width=t.n_embd)
        self.token_emb = nn.Embedding(t.num_codes + 1, t.n_embd)  # the V codes and [MASK]
        self.pos_emb = nn.Parameter(torch.zeros(1, t.height * t.width, t.n_embd))
        self.step_mlp = nn.Sequential(nn.Linear(t.n_embd, t.n_embd), nn.SiLU(), nn.Linear(t.n_embd, t.n_embd))
        self.drop = nn.Dropout(t.dropout)
        self.blocks = nn.ModuleList(Block(t) for _ in range(t.n_layer))
        self.norm_out = nn.LayerNorm(t.n_embd)
        self.head = nn.Linear(t.n_embd, t.num_codes)
        nn.init.normal_(self.pos_emb, std=0.02)
        for block in self.blocks:  # start every block at a plain (unmodulated) layer norm
            nn.init.zeros_(block.ada.weight)
            nn.init.zeros_(block.ada.bias)

    def forward(self, x_n: torch.Tensor, n: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x_n (B, L) long, n (B,) in 1..N, cond (B, 1+K, d) -> log p(x_0 | x_n, y) (B, V, L), float32."""
        context = self.conditioner(cond)  # (B, T, C)
        step = self.step_mlp(step_embedding(n, self.pos_emb.shape[-1]))  # (B, C)
        x = self.drop(self.token_emb(x_n) + self.pos_emb)  # (B, L, C)
        for block in self.blocks:
            x = block(x, step, context)
        logits = self.head(self.norm_out(x))  # (B, L, V)
        return F.log_softmax(logits.float(), dim=-1).transpose(1, 2)  # (B, V, L)


def count_parameters(config: DiscreteConfig) -> int:
    """Parameter count without allocating weights (built on the meta device)."""
    with torch.device("meta"):
        model = TokenDenoiser(config)
    return sum(p.numel() for p in model.parameters())
