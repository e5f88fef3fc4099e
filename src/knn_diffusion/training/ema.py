"""Exponential moving average of a model's weights, kept as a frozen copy of the model.

A frozen copy (rather than a list of shadow tensors) can sample directly and saves with the same
parameter names as the model, so an EMA checkpoint loads into a fresh model like any other.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        """Warm-up as in diffusers' EMAModel: early weights are forgotten quickly on short runs."""
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Blend ``model``'s current weights in after optimizer step ``step`` (1-based)."""
        weight = 1 - self.decay_at(step)
        ema_params = list(self.model.parameters())
        params = [p.detach().to(e.dtype) for p, e in zip(model.parameters(), ema_params)]
        torch._foreach_lerp_(ema_params, params, weight)
        for ema_buffer, buffer in zip(self.model.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)
