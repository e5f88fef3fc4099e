"""The discrete model as one module (one DDP/EMA/checkpoint unit): network + transition + timestep stats.

The transition's schedules are recomputed from the config (non-persistent buffers); the
importance-sampling statistics of the loss per step are persistent buffers, so a resumed run and its
EMA copy carry them like weights.
"""

from __future__ import annotations

import torch
from torch import nn

from knn_diffusion.models.discrete.config import DiscreteConfig
from knn_diffusion.models.discrete.transformer import TokenDenoiser
from knn_diffusion.models.discrete.transition import MaskUniformTransition

HISTORY_DECAY = 0.9   # moving average of L_n^2 per step (VQ-Diffusion's importance sampling)
MIN_VISITS = 10       # uniform sampling until every step has been seen this often
UNIFORM_SHARE = 1e-4  # mixed into the importance distribution so no step starves


class DiscreteDiffusion(nn.Module):
    def __init__(self, config: DiscreteConfig):
        super().__init__()
        self.config = config
        self.denoiser = TokenDenoiser(config)
        self.transition = MaskUniformTransition(config.transformer.num_codes, config.transition)
        steps = config.transition.steps
        self.register_buffer("loss_sq_history", torch.zeros(steps + 1))  # index n = 1..N
        self.register_buffer("loss_visits", torch.zeros(steps + 1, dtype=torch.long))

    @property
    def num_codes(self) -> int:
        return self.transition.num_codes

    @property
    def steps(self) -> int:
        return self.transition.steps

    def forward(self, x_n: torch.Tensor, n: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """log p_theta(x_0 | x_n, y): x_n (B, L), n (B,), cond (B, 1+K, d) -> (B, V, L)."""
        return self.denoiser(x_n, n, cond)

    def step_probabilities(self, importance: bool) -> torch.Tensor:
        """p(n) for n = 1..N, shape (N,): uniform, or proportional to sqrt(E[L_n^2]) once warmed up."""
        uniform = torch.full((self.steps,), 1.0 / self.steps, device=self.loss_sq_history.device)
        if not importance or bool((self.loss_visits[1:] < MIN_VISITS).any()):
            return uniform
        weights = (self.loss_sq_history[1:] + 1e-10).sqrt()
        return (weights / weights.sum()) * (1 - UNIFORM_SHARE) + UNIFORM_SHARE * uniform

    @torch.no_grad()
    def record_step_losses(self, n: torch.Tensor, losses: torch.Tensor) -> None:
        """Fold per-sample L_n values (B,) into the per-step history."""
        for step, value in zip(n.tolist(), losses.detach().float().tolist()):
            old = self.loss_sq_history[step]
            self.loss_sq_history[step] = value ** 2 if self.loss_visits[step] == 0 else (
                HISTORY_DECAY * old + (1 - HISTORY_DECAY) * value ** 2)
            self.loss_visits[step] += 1
