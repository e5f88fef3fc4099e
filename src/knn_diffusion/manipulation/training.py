"""Fine-tuning the text-to-image model into the manipulation model, in the shared training loop.

Target: the original I. Inputs: I_manip (extra channels) and the condition (f_img(I * M), its k
neighbours among the training images). Loss, EMA, checkpoints, exact resume and callbacks are the
continuous backbone's and :func:`knn_diffusion.training.loop.train_loop`'s; only the batch (it carries
the source images) and the model differ.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from diffusers import DDPMScheduler

from knn_diffusion.manipulation.config import ManipulationTrainConfig
from knn_diffusion.manipulation.model import BACKBONE, ManipulationDenoiser, WithSource
from knn_diffusion.models.continuous.config import BetaSchedule
from knn_diffusion.models.continuous.sampler import sample, to_uint8
from knn_diffusion.models.continuous.training import diffusion_loss
from knn_diffusion.models.continuous.unet import ContinuousDenoiser
from knn_diffusion.training.data import ConditionedImages, EmbeddingSource
from knn_diffusion.training.loop import ImagesFn, LogFn, train_loop

PREVIEW_PAIRS = 3  # preview rows of (I_manip | model output | I): a 3 x 3 grid


def unit_range(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.asarray(pixels)).permute(0, 3, 1, 2).float().div(127.5).sub(1)


class EditPairs(ConditionedImages):
    """Item i -> (I (3, H, W), condition (1+k, d), I_manip (3, H, W)); ``images`` holds the originals in
    pair order, ``neighbours`` (N, >=k) the embedding-store positions of each region's neighbours."""

    def __init__(self, images: Sequence, sources: np.ndarray, region_embeddings: np.ndarray,
                 embeddings: EmbeddingSource, neighbours: np.ndarray, k: int):
        super().__init__(images, embeddings, np.arange(len(images)), neighbours, k)
        self.sources, self.region = sources, np.asarray(region_embeddings, dtype=np.float32)

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        indices = np.asarray(indices, dtype=np.int64)
        cond = self.region[indices, None]  # (B, 1, d)
        if self.k:
            positions = np.asarray(self.neighbours[indices, :self.k], dtype=np.int64).reshape(-1)
            found = np.asarray(self.embeddings.get(positions), dtype=np.float32).reshape(len(indices), self.k, -1)
            cond = np.concatenate([cond, found], axis=1)  # (B, 1+k, d)
        return self.targets(indices), torch.from_numpy(cond), unit_range(self.sources[indices])


class ManipulationBackbone:
    """The manipulation model for :func:`train_loop`, initialised from a text-to-image model."""

    name = BACKBONE

    def __init__(self, cfg: ManipulationTrainConfig, text_to_image: ContinuousDenoiser,
                 preview: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
        self.cfg, self.text_to_image, self.preview_batch = cfg, text_to_image, preview
        self.model_config = text_to_image.config
        noise = text_to_image.config.noise
        self.noise_scheduler = DDPMScheduler(num_train_timesteps=noise.num_train_timesteps,
                                             beta_schedule=BetaSchedule(noise.beta_schedule).value)

    def build(self) -> ManipulationDenoiser:
        return ManipulationDenoiser(self.model_config, self.text_to_image)

    def loss(self, model, train_model, batch, generator, amp_dtype):
        images, cond, source = batch
        return diffusion_loss(WithSource(train_model, source), self.noise_scheduler, images, cond, generator,
                              self.cfg.cond_dropout, False, amp_dtype), {}

    def preview(self, ema_model, amp_dtype):
        if self.preview_batch is None:
            return None
        targets, cond, source = self.preview_batch
        device = next(ema_model.parameters()).device
        s = self.cfg.sampling
        edited = sample(WithSource(ema_model, source.to(device)), cond, guidance=s.guidance, scheduler=s.scheduler,
                        steps=s.steps, seed=s.seed, autocast_dtype=amp_dtype)  # (E, H, W, 3)
        rows = np.stack([to_uint8(source), edited, to_uint8(targets)], axis=1)  # (E, 3, H, W, 3)
        return rows.reshape(-1, *rows.shape[2:])


def train_manipulation(cfg: ManipulationTrainConfig, text_to_image: ContinuousDenoiser, pairs: EditPairs,
                       out_dir: str | os.PathLike, on_log: LogFn | None = None, on_images: ImagesFn | None = None,
                       metadata: dict | None = None) -> Path:
    """Fine-tune (or resume) and return the final checkpoint directory ``out_dir/final``."""
    preview = pairs.__getitems__(np.arange(min(PREVIEW_PAIRS, len(pairs))))
    backbone = ManipulationBackbone(cfg, text_to_image, preview)
    return train_loop(backbone, cfg, pairs, out_dir, on_log=on_log, on_images=on_images,
                      metadata={**(metadata or {}), "resolution": text_to_image.config.unet.resolution,
                                "embed_dim": text_to_image.config.conditioning.embed_dim})
