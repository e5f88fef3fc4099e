"""A real learning test: a micro U-Net memorises 8 images conditioned on their embeddings."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDPMScheduler

from continuous_helpers import ArrayEmbeddings, ring_neighbours, square_images, unit_embeddings, write_micro_preset
from knn_diffusion.training.checkpoint import load_denoiser
from knn_diffusion.training.config import ContinuousTrainConfig
from knn_diffusion.training.continuous import train_continuous

N, SIDE, D, K = 8, 8, 16, 2


def test_micro_model_overfits_eight_images_and_uses_their_condition(tmp_path):
    images, embeddings = square_images(N, SIDE), unit_embeddings(N, D)
    neighbours = ring_neighbours(N, K)
    cfg = ContinuousTrainConfig(preset=write_micro_preset(tmp_path), k=K, batch_size=N, max_steps=300, lr=3e-3,
                                warmup_steps=10, cond_dropout=0.0, log_every=25, checkpoint_every=300,
                                sample_every=0)
    losses = {}
    final = train_continuous(cfg, images, ArrayEmbeddings(embeddings), np.arange(N), neighbours, tmp_path / "run",
                             on_log=lambda step, m: losses.__setitem__(step, m["loss"]))
    first, last = losses[25], losses[300]
    assert last < 0.1 and last < 0.15 * first, losses  # unit-variance noise starts near 1

    # The condition carries the image: the model predicts the noise better under each image's own
    # embeddings than under another image's (mid-range timesteps, where the image is not yet visible).
    model = load_denoiser(final, ema=False)
    x0 = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 3, H, W)
    cond = torch.from_numpy(np.concatenate([embeddings[:, None], embeddings[neighbours]], axis=1))  # (N, 1+K, d)
    scheduler = DDPMScheduler(beta_schedule=cfg.beta_schedule.value)
    generator = torch.Generator().manual_seed(0)
    errors = {"own": 0.0, "shuffled": 0.0}
    with torch.no_grad():
        for _ in range(16):
            noise = torch.randn(x0.shape, generator=generator)
            t = torch.randint(200, 800, (N,), generator=generator)
            noisy = scheduler.add_noise(x0, noise, t)
            for name, c in (("own", cond), ("shuffled", cond.roll(1, dims=0))):
                errors[name] += (model(noisy, t, c) - noise).square().mean().item()
    assert errors["own"] < 0.9 * errors["shuffled"], errors
