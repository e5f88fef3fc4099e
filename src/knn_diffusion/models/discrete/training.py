"""The discrete backbone's training objective: the VLB of the mask+uniform chain + an auxiliary x0 loss.

The network predicts p_theta(x_0 | x_n, y); p_theta(x_{n-1} | x_n, y) is the transition's posterior
averaged over that prediction (x0-parameterisation). Per sample, with n drawn from p(n):

    L_n  = KL(q(x_{n-1} | x_n, x_0) || p_theta(x_{n-1} | x_n, y))    for n >= 2
    L_1  = -log p_theta(x_0 | x_1, y)
    aux  = cross-entropy of x_0 under p_theta(x_0 | x_n, y)          (VQ-Diffusion's auxiliary loss)
    loss = (L_n + aux_weight * aux) / (N p(n))                         (per token, averaged)

so the expectation is the bound N E_n[L_n] (logged as ``vlb_estimate``, nats per token). The prior
term L_N = KL(q(x_N | x_0) || p(x_N)) does not depend on theta and is ~0 when gamma_bar_N ~ 1 (the
default), so it is not computed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from knn_diffusion.models.conditioning import drop_conditions
from knn_diffusion.models.config import ConditioningConfig, ConditioningVariant
from knn_diffusion.models.discrete.config import (
    DISCRETE,
    DiscreteConfig,
    DiscreteTrainConfig,
    TimestepSampling,
    load_transformer_preset,
)
from knn_diffusion.models.discrete.diffusion import DiscreteDiffusion
from knn_diffusion.models.discrete.generator import DiscreteGenerator
from knn_diffusion.models.discrete.transition import one_hot_log
from knn_diffusion.models.discrete.vq import Tokenizer
from knn_diffusion.training.data import ConditionedTokens, EmbeddingSource
from knn_diffusion.training.loop import ImagesFn, LogFn, train_loop


def discrete_loss(model: DiscreteDiffusion, train_model: torch.nn.Module, tokens: torch.Tensor,
                  cond: torch.Tensor, generator: torch.Generator, cfg: DiscreteTrainConfig,
                  amp_dtype: torch.dtype | None) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss of one batch of token maps (B, L) and its parts; all randomness from ``generator``.

    ``train_model`` is ``model`` or its DDP wrapper (forward only); ``model`` holds the transition
    and the timestep statistics.
    """
    transition, steps = model.transition, model.steps
    batch = tokens.shape[0]
    importance = cfg.timestep_sampling == TimestepSampling.importance
    p_n = model.step_probabilities(importance)  # (N,)
    n = torch.multinomial(p_n.cpu(), batch, replacement=True, generator=generator).to(tokens.device) + 1  # (B,)
    x_n = transition.q_sample(tokens, n, generator)  # (B, L)
    cond = drop_conditions(cond, cfg.cond_dropout, generator)
    with torch.autocast(tokens.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        log_x0_pred = train_model(x_n, n, cond)  # (B, V, L) float32
    log_x0 = one_hot_log(tokens, model.num_codes)  # (B, V, L)
    log_true = transition.posterior(log_x0, x_n, n)  # (B, V+1, L)
    log_model = transition.posterior(log_x0_pred, x_n, n)  # (B, V+1, L)
    kl = (log_true.exp() * (log_true - log_model)).sum(1)  # (B, L)
    decoder_nll = -log_model.gather(1, tokens[:, None]).squeeze(1)  # (B, L): -log p(x_0 | x_1)
    vlb = torch.where((n == 1)[:, None], decoder_nll, kl).mean(1)  # (B,) nats per token
    aux = -log_x0_pred.gather(1, tokens[:, None]).squeeze(1).mean(1)  # (B,)
    weight = 1.0 / (steps * p_n.to(tokens.device)[n - 1])  # (B,) importance correction
    loss = ((vlb + cfg.aux_weight * aux) * weight).mean()
    if importance:
        model.record_step_losses(n, vlb)
    parts = {"vlb_term": vlb.mean().item(), "aux_ce": aux.mean().item(),
             "vlb_estimate": (steps * (vlb * weight).mean()).item()}
    return loss, parts


def discrete_config(cfg: DiscreteTrainConfig, num_codes: int, height: int, width: int,
                    embed_dim: int) -> DiscreteConfig:
    """The architecture this training config builds for a tokenizer's vocabulary and token-map size."""
    variant = ConditioningVariant(cfg.variant)
    return DiscreteConfig(transformer=load_transformer_preset(cfg.preset, num_codes, height, width),
                          conditioning=ConditioningConfig(variant=variant, embed_dim=embed_dim,
                                                          k=variant.neighbours(cfg.k)),
                          transition=cfg.transition)


class DiscreteBackbone:
    """The transformer over VQ tokens for :func:`train_loop`; previews decode with the tokenizer."""

    name = DISCRETE

    def __init__(self, cfg: DiscreteTrainConfig, model_config: DiscreteConfig, tokenizer: Tokenizer | None = None,
                 eval_conditions: np.ndarray | None = None):
        self.cfg, self.model_config = cfg, model_config
        self.tokenizer, self.eval_conditions = tokenizer, eval_conditions

    def build(self) -> DiscreteDiffusion:
        return DiscreteDiffusion(self.model_config)

    def loss(self, model, train_model, batch, generator, amp_dtype):
        tokens, cond = batch
        return discrete_loss(model, train_model, tokens, cond, generator, self.cfg, amp_dtype)

    def preview(self, ema_model, amp_dtype):
        if self.eval_conditions is None or self.tokenizer is None:
            return None
        s = self.cfg.sampling
        generator = DiscreteGenerator(ema_model, self.tokenizer.to(next(ema_model.parameters()).device), s.truncation)
        return generator.sample(self.eval_conditions, guidance=s.guidance, steps=s.steps,
                                seeds=[s.seed + i for i in range(len(self.eval_conditions))])


def train_discrete(cfg: DiscreteTrainConfig, token_maps: np.ndarray, num_codes: int, embeddings: EmbeddingSource,
                   self_rows: np.ndarray, neighbours: np.ndarray, out_dir: str | os.PathLike, *,
                   tokenizer: Tokenizer | None = None, on_log: LogFn | None = None, on_images: ImagesFn | None = None,
                   eval_conditions: np.ndarray | None = None, metadata: dict | None = None) -> Path:
    """Train (or resume) on token maps (N, h, w) of codes < ``num_codes``; returns ``out_dir/final``.

    ``embeddings``, ``self_rows`` and ``neighbours`` as in :func:`train_continuous`; ``tokenizer``
    decodes the preview grids sampled from ``eval_conditions`` (E, 1+k, d). Resume and retrain rules:
    :func:`train_loop`.
    """
    token_maps = np.asarray(token_maps)
    if token_maps.ndim != 3:
        raise ValueError(f"token maps must be (N, h, w), got shape {token_maps.shape}")
    if token_maps.max(initial=0) >= num_codes:
        raise ValueError(f"token maps hold code {int(token_maps.max())} but the vocabulary has {num_codes} codes")
    embed_dim = int(np.asarray(embeddings.get(np.asarray(self_rows[:1], dtype=np.int64))).shape[1])
    model_config = discrete_config(cfg, num_codes, token_maps.shape[1], token_maps.shape[2], embed_dim)
    dataset = ConditionedTokens(token_maps, embeddings, self_rows, neighbours, model_config.conditioning.k)
    return train_loop(DiscreteBackbone(cfg, model_config, tokenizer, eval_conditions), cfg, dataset, out_dir,
                      on_log=on_log, on_images=on_images, metadata={**(metadata or {}), "embed_dim": embed_dim})
