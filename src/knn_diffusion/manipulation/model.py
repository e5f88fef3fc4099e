"""The manipulation model: the text-to-image denoiser that also sees the image to edit.

The image enters as three more input channels of the U-Net's first convolution, concatenated to the
noisy image (as in diffusion inpainting/super-resolution models). Their weights start at zero, so
before fine-tuning the model is exactly the text-to-image model it came from, whatever the image.
The condition (1+k, d) is unchanged: f_img(I * M) and its neighbours in training, f_txt(text) and its
neighbours at inference.
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn

from knn_diffusion.models.config import ConditioningVariant
from knn_diffusion.models.continuous.config import DenoiserConfig
from knn_diffusion.models.continuous.unet import ContinuousDenoiser
from knn_diffusion.training.checkpoint import load_weights, read_checkpoint_config

BACKBONE = "manipulation"  # recorded in its checkpoints
SOURCE_CHANNELS = 3


def widen_input(unet: nn.Module, extra: int) -> None:
    """Give ``unet.conv_in`` ``extra`` more input channels with zero weights (its output is unchanged)."""
    old = unet.conv_in
    new = nn.Conv2d(old.in_channels + extra, old.out_channels, old.kernel_size, old.stride, old.padding,
                    device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :old.in_channels] = old.weight
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=new.in_channels)


class ManipulationDenoiser(nn.Module):
    """epsilon_theta(x_t, t, y, source): the denoiser of ``config`` with ``source`` (B, 3, H, W) as input too."""

    def __init__(self, config: DenoiserConfig, text_to_image: ContinuousDenoiser | None = None):
        super().__init__()
        self.config = config
        self.denoiser = copy.deepcopy(text_to_image) if text_to_image is not None else ContinuousDenoiser(config)
        widen_input(self.denoiser.unet, SOURCE_CHANNELS)

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor,
                source: torch.Tensor) -> torch.Tensor:
        """noisy, source (B, 3, H, W) in [-1, 1], timesteps (B,), cond (B, 1+K, d) -> noise (B, 3, H, W)."""
        return self.denoiser(torch.cat([noisy, source], dim=1), timesteps, cond)


class WithSource(nn.Module):
    """A manipulation model with its source images bound, called like a text-to-image denoiser, so the
    continuous backbone's loss and guided sampler run it unchanged (a guided batch of 2B repeats the B
    sources: the image is kept in the conditional and the null half alike)."""

    def __init__(self, model: nn.Module, source: torch.Tensor):
        super().__init__()
        self.model, self.source = model, source
        self.config = getattr(model, "config", None)

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        repeats = noisy.shape[0] // self.source.shape[0]
        return self.model(noisy, timesteps, cond, self.source.repeat(repeats, 1, 1, 1))


def trained_k(model: nn.Module) -> int:
    """How many neighbours the (text-to-image or manipulation) model is conditioned on; 0 for no_knn."""
    conditioning = model.config.conditioning
    return 0 if ConditioningVariant(conditioning.variant) == ConditioningVariant.no_knn else conditioning.k


def load_manipulation_model(path: str | os.PathLike, *, ema: bool = True,
                            device: str | torch.device = "cpu") -> tuple[ManipulationDenoiser, dict]:
    """(model in eval mode, its checkpoint config) from a ``train_manipulation`` checkpoint directory."""
    config = read_checkpoint_config(path)
    if config.get("backbone") != BACKBONE:
        raise ValueError(f"{path}: a {config.get('backbone', 'continuous')} checkpoint, not a manipulation model "
                         "(train it with the train_manipulation stage)")
    model = ManipulationDenoiser(DenoiserConfig.from_dict(config["model"]))
    load_weights(path, model, ema=ema)
    return model.to(device).eval(), config
