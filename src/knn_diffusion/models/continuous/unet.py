"""The continuous backbone: a pixel-space diffusers U-Net that cross-attends to the kNN condition.

The paper re-implements the DALL-E 2 decoder without its text transformer (supplement 6.8): 512
channels, 3 residual blocks per level, 64 channels per head, attention at 32, 16 and 8 px of a 64 px
image. Here the same shape comes from diffusers' ``UNet2DConditionModel``; the ``35M``/``100M``/``400M``
presets follow it at the paper's sizes and ``tiny`` is the CPU demo.

Going to 64 or 256 px on a GPU: set the ingest resolution (``data.resolution``) to 64 and use the
``100M``/``400M`` preset (4 levels: 64 -> 32 -> 16 -> 8, attention at the last three, as in the paper).
For 256 px add levels to the preset file (e.g. channels [256, 256, 512, 768, 1024, 1024] with attention
only at 32 px and below, since self-attention cost grows with the square of the pixel count), or train
at 64 px and upsample with a separate super-resolution model as the paper does.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from knn_diffusion.models.conditioning import build_conditioner
from knn_diffusion.models.continuous.config import DenoiserConfig, UNetConfig, validate_unet


def build_unet(config: UNetConfig) -> UNet2DConditionModel:
    validate_unet(config)
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in config.attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.attention))
    # diffusers' ``attention_head_dim`` argument is, for this model, the number of heads per level.
    heads = tuple(max(1, c // config.head_channels) for c in config.block_out_channels)
    return UNet2DConditionModel(
        sample_size=config.resolution,
        in_channels=3,
        out_channels=3,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        cross_attention_dim=config.cross_attention_dim,
        attention_head_dim=heads,
        norm_num_groups=config.norm_num_groups,
    )


class ContinuousDenoiser(nn.Module):
    """epsilon_theta(x_t, t, y): the conditioner and the U-Net as one module (one DDP/EMA unit)."""

    def __init__(self, config: DenoiserConfig):
        super().__init__()
        self.config = config
        self.conditioner = build_conditioner(config.conditioning, width=config.unet.cross_attention_dim)
        self.unet = build_unet(config.unet)

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """noisy (B, 3, H, W), timesteps (B,), cond (B, 1+K, d) -> predicted noise (B, 3, H, W)."""
        tokens = self.conditioner(cond)  # (B, T, cross_attention_dim)
        return self.unet(noisy, timesteps, encoder_hidden_states=tokens).sample


def count_parameters(config: DenoiserConfig) -> int:
    """Parameter count without allocating weights (built on the meta device)."""
    with torch.device("meta"):
        model = ContinuousDenoiser(config)
    return sum(p.numel() for p in model.parameters())
