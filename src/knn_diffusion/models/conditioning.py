"""From retrieved embeddings to the tokens a generator cross-attends to (shared by both backbones).

The condition is a (B, 1+K, d) tensor: row 0 is the query embedding (f_img(x0) in training,
f_txt(t) at inference), rows 1..K its nearest neighbours in the image index. Every layer here is
bias-free, so the all-zero null condition maps to all-zero tokens: the cross-attention then adds only
a constant, which is why the paper can use y' = 0 for classifier-free guidance without fine-tuning
(supplement 6.7). Optional condition dropout trains that path explicitly as well.
"""

from __future__ import annotations

import torch
from torch import nn

from knn_diffusion.models.config import ConditioningConfig, ConditioningVariant


class Conditioner(nn.Module):
    """(B, 1+K, d) query + neighbour embeddings -> (B, T, width) cross-attention tokens.

    T by variant: tokens / self_attention 1+K; cross_attention_pooled 1; concat_linear 2
    (the query token followed by one linear projection of all K neighbours); no_knn 1.
    """

    def __init__(self, config: ConditioningConfig, width: int):
        super().__init__()
        self.variant = ConditioningVariant(config.variant)
        self.k = config.k
        d = config.embed_dim
        self.query_proj = nn.Linear(d, width, bias=False)
        if self.variant == ConditioningVariant.concat_linear:
            if config.k < 1:
                raise ValueError("conditioning variant 'concat_linear' needs k >= 1 neighbours")
            self.knn_proj = nn.Linear(config.k * d, width, bias=False)
        elif self.variant != ConditioningVariant.no_knn:
            # A projection apart from the query's lets the network tell the query from its neighbours.
            self.knn_proj = nn.Linear(d, width, bias=False)
        if self.variant in (ConditioningVariant.self_attention, ConditioningVariant.cross_attention_pooled):
            if width % config.heads:
                raise ValueError(f"conditioning heads={config.heads} must divide the token width {width}")
            self.attention = nn.MultiheadAttention(width, config.heads, bias=False, batch_first=True)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        if cond.ndim != 3:
            raise ValueError(f"condition must be (B, 1+K, d), got shape {tuple(cond.shape)}")
        query = self.query_proj(cond[:, :1])  # (B, 1, width)
        if self.variant == ConditioningVariant.no_knn:
            return query
        knn = cond[:, 1:]  # (B, K, d)
        if self.variant == ConditioningVariant.concat_linear:
            if knn.shape[1] != self.k:
                raise ValueError(f"'concat_linear' was trained with k={self.k} neighbours, got {knn.shape[1]}")
            return torch.cat([query, self.knn_proj(knn.flatten(1)).unsqueeze(1)], dim=1)  # (B, 2, width)
        neighbours = self.knn_proj(knn)  # (B, K, width)
        if self.variant == ConditioningVariant.cross_attention_pooled:
            if knn.shape[1] == 0:
                return query
            pooled, _ = self.attention(query, neighbours, neighbours, need_weights=False)
            return query + pooled  # (B, 1, width)
        tokens = torch.cat([query, neighbours], dim=1)  # (B, 1+K, width)
        if self.variant == ConditioningVariant.self_attention:
            mixed, _ = self.attention(tokens, tokens, tokens, need_weights=False)
            tokens = tokens + mixed
        return tokens


def null_condition(cond: torch.Tensor) -> torch.Tensor:
    """The unconditional input y' = 0 with the shape of ``cond``."""
    return torch.zeros_like(cond)


def drop_conditions(cond: torch.Tensor, probability: float, generator: torch.Generator | None = None
                    ) -> torch.Tensor:
    """Replace each sample's whole condition by the null one with ``probability``.

    ``generator`` is a CPU generator, so the choice is the same on every device.
    """
    if probability <= 0:
        return cond
    keep = torch.rand(cond.shape[0], generator=generator) >= probability  # drawn on the CPU generator
    keep = keep.to(device=cond.device, dtype=cond.dtype)
    return cond * keep[:, None, None]  # (B, 1+K, d)
