"""The continuous backbone as a generator: the U-Net denoiser with a diffusers sampler."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from knn_diffusion.models.config import ConditioningConfig
from knn_diffusion.models.continuous.config import BACKBONE, DenoiserConfig, SchedulerName
from knn_diffusion.models.continuous.sampler import sample
from knn_diffusion.models.continuous.unet import ContinuousDenoiser
from knn_diffusion.training.checkpoint import load_weights, read_checkpoint_config


def load_denoiser(path: str | os.PathLike, *, ema: bool = True,
                  device: str | torch.device = "cpu") -> ContinuousDenoiser:
    """Rebuild a continuous model from its checkpoint directory, in eval mode."""
    config = DenoiserConfig.from_dict(read_checkpoint_config(path)["model"])
    model = ContinuousDenoiser(config)
    load_weights(path, model, ema=ema)
    return model.to(device).eval()


@dataclass
class ContinuousGenerator:
    """The pixel-space U-Net DDPM with a diffusers sampler (``scheduler``)."""

    model: ContinuousDenoiser
    scheduler: SchedulerName = SchedulerName.dpm_solver_pp_sde
    run_id: str = ""
    backbone: str = BACKBONE
    settings: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.scheduler = SchedulerName(self.scheduler)
        self.settings = {"scheduler": self.scheduler.value}

    @property
    def conditioning(self) -> ConditioningConfig:
        return self.model.config.conditioning

    def sample(self, cond: np.ndarray, *, guidance: float, steps: int, seeds: Sequence[int]) -> np.ndarray:
        return sample(self.model, cond, guidance=guidance, scheduler=self.scheduler, steps=steps, seed=list(seeds))


def load_continuous_generator(checkpoint_dir: Path, config: dict, *,
                              scheduler: SchedulerName | str | None = None) -> ContinuousGenerator:
    """A continuous checkpoint directory -> generator (EMA weights, eval mode)."""
    return ContinuousGenerator(load_denoiser(checkpoint_dir), scheduler or SchedulerName.dpm_solver_pp_sde,
                               run_id=str(config.get("mlflow_run_id", "")))
