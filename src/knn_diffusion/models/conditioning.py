"""From retrieved embeddings to the tokens a generator cross-attends to (shared by both backbones).

The condition is a (B, 1+K, d) tensor: row 0 is the query embedding (f_img(x0) in training,
f_txt(t) at inference), rows 1..K its nearest neighbours in the image index. Every layer here is
bias-free, so the all-zero null condition maps to all-zero tokens: the cross-attention then adds only
a constant, which is why the paper can use y' = 0 for classifier-free guidance without fine-tuning
(supplement 6.7). Optional condition dropout trains that path explicitly as well.

The variants are a registry: :data:`CONDITIONERS` maps each :class:`ConditioningVariant` to its
:class:`Conditioner` subclass (``@register``). A new variant is one enum member (with what it needs)
and one class here. Subclasses keep the attribute names ``query_proj`` / ``knn_proj`` / ``attention``,
so the weights of every checkpoint keep their names.
"""

from __future__ import annotations

import torch
from torch import nn

from knn_diffusion.models.config import ConditioningConfig, ConditioningVariant


class Conditioner(nn.Module):
    """(B, 1+K, d) query + neighbour embeddings -> (B, T, width) cross-attention tokens.

    The base projects the query to one token; a subclass turns that token and the K neighbour
    embeddings into the variant's tokens (:meth:`tokens`).
    """

    variant: ConditioningVariant

    def __init__(self, config: ConditioningConfig, width: int):
        super().__init__()
        self.k = config.k
        self.query_proj = nn.Linear(config.embed_dim, width, bias=False)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        if cond.ndim != 3:
            raise ValueError(f"condition must be (B, 1+K, d), got shape {tuple(cond.shape)}")
        return self.tokens(self.query_proj(cond[:, :1]), cond[:, 1:])  # query (B, 1, width), knn (B, K, d)

    def tokens(self, query: torch.Tensor, knn: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


CONDITIONERS: dict[ConditioningVariant, type[Conditioner]] = {}


def register(variant: ConditioningVariant):
    """Class decorator: the conditioner of ``variant``."""
    def add(cls: type[Conditioner]) -> type[Conditioner]:
        cls.variant = variant
        CONDITIONERS[variant] = cls
        return cls
    return add


def build_conditioner(config: ConditioningConfig, width: int) -> Conditioner:
    """The registered conditioner of ``config.variant``."""
    variant = ConditioningVariant(config.variant)
    if variant not in CONDITIONERS:
        raise ValueError(f"conditioning variant {variant.value!r} has no conditioner registered in "
                         f"models/conditioning.py (registered: {sorted(v.value for v in CONDITIONERS)})")
    return CONDITIONERS[variant](config, width)


@register(ConditioningVariant.no_knn)
class QueryOnly(Conditioner):
    """One token: the query (T=1); neighbours are ignored."""

    def tokens(self, query: torch.Tensor, knn: torch.Tensor) -> torch.Tensor:
        return query


@register(ConditioningVariant.tokens)
class NeighbourTokens(Conditioner):
    """The query token followed by one token per neighbour (T=1+K). The neighbours' projection is apart
    from the query's, so the network can tell the query from its neighbours."""

    def __init__(self, config: ConditioningConfig, width: int):
        super().__init__(config, width)
        self.knn_proj = nn.Linear(config.embed_dim, width, bias=False)

    def tokens(self, query: torch.Tensor, knn: torch.Tensor) -> torch.Tensor:
        return torch.cat([query, self.knn_proj(knn)], dim=1)  # (B, 1+K, width)


def _attention(config: ConditioningConfig, width: int) -> nn.MultiheadAttention:
    if width % config.heads:
        raise ValueError(f"conditioning heads={config.heads} must divide the token width {width}")
    return nn.MultiheadAttention(width, config.heads, bias=False, batch_first=True)


@register(ConditioningVariant.self_attention)
class SelfAttentionTokens(NeighbourTokens):
    """The 1+K tokens contextualised by one residual self-attention layer (T=1+K)."""

    def __init__(self, config: ConditioningConfig, width: int):
        super().__init__(config, width)
        self.attention = _attention(config, width)

    def tokens(self, query: torch.Tensor, knn: torch.Tensor) -> torch.Tensor:
        tokens = super().tokens(query, knn)  # (B, 1+K, width)
        mixed, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        return tokens + mixed


@register(ConditioningVariant.cross_attention_pooled)
class CrossAttentionPooled(Conditioner):
    """One token: the query plus its attention over the neighbours (T=1)."""

    def __init__(self, config: ConditioningConfig, width: int):
        super().__init__(config, width)
        self.knn_proj = nn.Linear(config.embed_dim, width, bias=False)
        self.attention = _attention(config, width)

    def tokens(self, query: torch.Tensor, knn: torch.Tensor) -> torch.Tensor:
        if knn.shape[1] == 0:
            return query
        neighbours = self.knn_proj(knn)  # (B, K, width)
        pooled, _ = self.attention(query, neighbours, neighbours, need_weights=False)
        return query + pooled  # (B, 1, width)


@register(ConditioningVariant.concat_linear)
class ConcatLinear(Conditioner):
    """The query token and one linear projection of all K neighbours concatenated (T=2; K fixed)."""

    def __init__(self, config: ConditioningConfig, width: int):
        super().__init__(config, width)
        if config.k < 1:
            raise ValueError("conditioning variant 'concat_linear' needs k >= 1 neighbours")
        self.knn_proj = nn.Linear(config.k * config.embed_dim, width, bias=False)

    def tokens(self, query: torch.Tensor, knn: torch.Tensor) -> torch.Tensor:
        if knn.shape[1] != self.k:
            raise ValueError(f"'concat_linear' was trained with k={self.k} neighbours, got {knn.shape[1]}")
        return torch.cat([query, self.knn_proj(knn.flatten(1)).unsqueeze(1)], dim=1)  # (B, 2, width)


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
