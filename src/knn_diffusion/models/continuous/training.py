"""The continuous backbone in the shared training loop (epsilon prediction, paper eq. 4 / 6.8).

The model only ever sees images: y = (f_img(x0), knn_img(x0, k)). The loop itself (DDP, EMA,
checkpoints, exact resume, callbacks) is :func:`knn_diffusion.training.loop.train_loop`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from knn_diffusion.models.conditioning import drop_conditions
from knn_diffusion.models.config import ConditioningConfig, ConditioningVariant
from knn_diffusion.models.continuous.config import (
    BACKBONE,
    BetaSchedule,
    ContinuousTrainConfig,
    DenoiserConfig,
    NoiseConfig,
    load_unet_preset,
)
from knn_diffusion.models.continuous.sampler import sample
from knn_diffusion.models.continuous.unet import ContinuousDenoiser
from knn_diffusion.training.data import ConditionedImages, EmbeddingSource
from knn_diffusion.training.loop import ImagesFn, LogFn, train_loop


def denoiser_config(cfg: ContinuousTrainConfig, resolution: int, embed_dim: int) -> DenoiserConfig:
    """The architecture this training config builds for data of the given resolution and embedding size."""
    variant = ConditioningVariant(cfg.variant)
    k = variant.neighbours(cfg.k)
    return DenoiserConfig(
        unet=load_unet_preset(cfg.preset, resolution),
        conditioning=ConditioningConfig(variant=variant, embed_dim=embed_dim, k=k),
        noise=NoiseConfig(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=BetaSchedule(cfg.beta_schedule)),
    )


def diffusion_loss(model: torch.nn.Module, noise_scheduler: DDPMScheduler, images: torch.Tensor,
                   cond: torch.Tensor, generator: torch.Generator, cond_dropout: float, hflip: bool,
                   amp_dtype: torch.dtype | None) -> torch.Tensor:
    """|| eps - eps_theta(x_t, t, y) ||^2 for one batch; all randomness from ``generator``."""
    batch = images.shape[0]
    if hflip:
        flip = (torch.rand(batch, generator=generator) < 0.5).to(images.device)
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    cond = drop_conditions(cond, cond_dropout, generator)
    noise = torch.randn(images.shape, generator=generator).to(images.device)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), generator=generator)
    timesteps = timesteps.to(images.device)
    noisy = noise_scheduler.add_noise(images, noise, timesteps)
    with torch.autocast(images.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        predicted = model(noisy, timesteps, cond)
    return F.mse_loss(predicted.float(), noise)


class ContinuousBackbone:
    """The pixel-space U-Net DDPM for :func:`train_loop`."""

    name = BACKBONE

    def __init__(self, cfg: ContinuousTrainConfig, model_config: DenoiserConfig,
                 eval_conditions: np.ndarray | None = None):
        self.cfg, self.model_config, self.eval_conditions = cfg, model_config, eval_conditions
        self.noise_scheduler = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps,
                                             beta_schedule=BetaSchedule(cfg.beta_schedule).value)

    def build(self) -> ContinuousDenoiser:
        return ContinuousDenoiser(self.model_config)

    def loss(self, model, train_model, batch, generator, amp_dtype):
        images, cond = batch
        return diffusion_loss(train_model, self.noise_scheduler, images, cond, generator, self.cfg.cond_dropout,
                              self.cfg.hflip, amp_dtype), {}

    def preview(self, ema_model, amp_dtype):
        if self.eval_conditions is None:
            return None
        s = self.cfg.sampling
        return sample(ema_model, self.eval_conditions, guidance=s.guidance, scheduler=s.scheduler, steps=s.steps,
                      seed=s.seed, autocast_dtype=amp_dtype)


def train_continuous(cfg: ContinuousTrainConfig, images: Sequence, embeddings: EmbeddingSource,
                     self_rows: np.ndarray, neighbours: np.ndarray, out_dir: str | os.PathLike,
                     on_log: LogFn | None = None, on_images: ImagesFn | None = None,
                     eval_conditions: np.ndarray | None = None, metadata: dict | None = None) -> Path:
    """Train (or resume) and return the final checkpoint directory ``out_dir/final``.

    ``images``: uint8 (N, H, W, 3), indexable by an int array (an ImageStore or a memmap).
    ``embeddings.get(rows) -> (n, d)`` over the index collection; ``self_rows`` (N,) each image's own
    row there, ``neighbours`` (N, k_max) its precomputed neighbours' rows. ``eval_conditions``
    (E, 1+k, d) are sampled into a grid every ``cfg.sample_every`` steps and at the end. Resume and
    retrain rules: :func:`train_loop`.
    """
    resolution = int(np.asarray(images[np.zeros(1, dtype=np.int64)]).shape[1])
    embed_dim = int(np.asarray(embeddings.get(np.asarray(self_rows[:1], dtype=np.int64))).shape[1])
    model_config = denoiser_config(cfg, resolution, embed_dim)
    dataset = ConditionedImages(images, embeddings, self_rows, neighbours, model_config.conditioning.k)
    return train_loop(ContinuousBackbone(cfg, model_config, eval_conditions), cfg, dataset, out_dir,
                      on_log=on_log, on_images=on_images,
                      metadata={**(metadata or {}), "resolution": resolution, "embed_dim": embed_dim})
