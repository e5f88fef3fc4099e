"""Classifier-free guided sampling of the continuous model from (1+K, d) kNN conditions.

At inference the query is the text embedding f_txt(t) and its neighbours come from whatever index
is given (a different one than in training swaps the output distribution: the paper's
out-of-distribution generation). Guidance follows the paper: eps = eps_null + lambda * (eps_cond -
eps_null) with the all-zero null condition, both halves in one batched forward.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from knn_diffusion.models.conditioning import null_condition
from knn_diffusion.models.continuous.config import BetaSchedule, NoiseConfig, SchedulerName
from knn_diffusion.models.continuous.unet import ContinuousDenoiser


def make_scheduler(name: SchedulerName | str, noise: NoiseConfig):
    """A diffusers sampler over the training noise schedule.

    Pixel space: every sampler keeps its x0 estimate in [-1, 1] (clipping; dynamic thresholding for
    DPM-Solver++, without which the cosine schedule's near-zero alpha at t=T blows the first step up).
    """
    common = dict(num_train_timesteps=noise.num_train_timesteps, beta_schedule=BetaSchedule(noise.beta_schedule).value)
    name = SchedulerName(name)
    if name == SchedulerName.ddpm:
        return DDPMScheduler(**common, clip_sample=True)
    if name == SchedulerName.ddim:
        return DDIMScheduler(**common, clip_sample=True)
    algorithm = "dpmsolver++" if name == SchedulerName.dpm_solver_pp else "sde-dpmsolver++"
    return DPMSolverMultistepScheduler(**common, algorithm_type=algorithm, solver_order=2, thresholding=True,
                                       sample_max_value=1.0)


def guided_epsilon(model: ContinuousDenoiser, noisy: torch.Tensor, timestep: torch.Tensor,
                   cond: torch.Tensor, guidance: float) -> torch.Tensor:
    """eps_null + guidance * (eps_cond - eps_null), conditional and null halves in one forward."""
    batch = noisy.shape[0]
    timesteps = timestep.reshape(-1).expand(2 * batch) if timestep.numel() == 1 else timestep.repeat(2)
    both = model(torch.cat([noisy, noisy]), timesteps, torch.cat([cond, null_condition(cond)]))  # (2B, 3, H, W)
    eps_cond, eps_null = both.chunk(2)
    return eps_null + guidance * (eps_cond - eps_null)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def sample(model: ContinuousDenoiser, cond_embeddings: torch.Tensor | np.ndarray, *, guidance: float = 3.0,
           scheduler: SchedulerName | str = SchedulerName.dpm_solver_pp_sde, steps: int = 25,
           seed: int | Sequence[int] = 0, autocast_dtype: torch.dtype | None = None) -> np.ndarray:
    """cond_embeddings (B, 1+K, d) -> uint8 images (B, H, W, 3).

    Image i starts from noise seeded ``seed + i`` (or ``seed[i]``), so it reproduces alone or in any batch.
    """
    device = next(model.parameters()).device
    cond = torch.as_tensor(np.asarray(cond_embeddings) if not torch.is_tensor(cond_embeddings) else cond_embeddings,
                           dtype=torch.float32).to(device)
    batch = cond.shape[0]
    seeds = [seed + i for i in range(batch)] if isinstance(seed, int) else list(seed)
    if len(seeds) != batch:
        raise ValueError(f"{len(seeds)} seeds for {batch} conditions")
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    side = model.config.unet.resolution
    noise_scheduler = make_scheduler(scheduler, model.config.noise)
    noise_scheduler.set_timesteps(steps, device=device)
    x = torch.cat([torch.randn((1, 3, side, side), generator=g) for g in generators]).to(device)  # (B, 3, H, W)
    x = x * noise_scheduler.init_noise_sigma
    was_training = model.training
    model.eval()
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        for t in noise_scheduler.timesteps:
            eps = guided_epsilon(model, noise_scheduler.scale_model_input(x, t), t, cond, guidance).float()
            x = noise_scheduler.step(eps, t, x, generator=generators).prev_sample
    model.train(was_training)
    return to_uint8(x)
