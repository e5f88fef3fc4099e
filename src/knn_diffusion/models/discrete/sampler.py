"""Sampling the discrete backbone: all-[MASK] token maps -> reverse mask+uniform chain -> token maps.

Classifier-free guidance acts on the predicted log p(x_0 | x_n) (the paper's proposal for discrete
models, supplement 6.7): log p = log p_null + lambda * (log p_cond - log p_null), renormalised, with
the all-zero null condition and no fine-tuning. Truncation keeps, per token, the codes within the
top cumulative probability r of the conditional prediction. ``steps`` < N takes strided reverse
steps n -> m with the exact multi-step posterior q(x_m | x_n, x_0).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from knn_diffusion.models.conditioning import null_condition
from knn_diffusion.models.discrete.diffusion import DiscreteDiffusion
from knn_diffusion.models.discrete.transition import LOG_ZERO


def guided_log_x0(model: DiscreteDiffusion, x_n: torch.Tensor, n: torch.Tensor, cond: torch.Tensor,
                  guidance: float, truncation: float = 1.0) -> torch.Tensor:
    """log p_null + guidance * (log p_cond - log p_null), renormalised over codes: (B, V, L).

    Both halves in one batched forward; guidance 1 is the conditional prediction itself. With
    ``truncation`` r < 1 only the codes in the top-r mass of the *conditional* prediction stay
    possible: in log space a large lambda otherwise lifts codes that the condition merely rules out
    less firmly than the null condition does.
    """
    both = model(torch.cat([x_n, x_n]), torch.cat([n, n]), torch.cat([cond, null_condition(cond)]))  # (2B, V, L)
    log_cond, log_null = both.float().chunk(2)
    guided = log_null + guidance * (log_cond - log_null)  # (B, V, L)
    if truncation < 1.0:
        guided = guided.masked_fill(~top_mass(log_cond, truncation), LOG_ZERO)
    return torch.log_softmax(guided, dim=1)


def top_mass(log_probs: torch.Tensor, keep: float) -> torch.Tensor:
    """Per token, the most probable codes whose cumulative probability first reaches ``keep``: bool (B, V, L)."""
    sorted_lp, order = log_probs.sort(dim=1, descending=True)  # (B, V, L)
    before = sorted_lp.exp().cumsum(dim=1) - sorted_lp.exp()  # mass of the more probable codes
    return torch.zeros_like(before, dtype=torch.bool).scatter(1, order, before < keep)  # the top code always stays


def sample_rows(log_probs: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Draw tokens (B, L) from log probabilities (B, C, L) by inverting the CDF; row i uses one uniform
    per token from ``generators[i]`` (CPU), so a row is the same in any batch and on any device."""
    uniform = torch.stack([torch.rand(log_probs.shape[2], generator=g, dtype=torch.float64) for g in generators])
    cdf = torch.softmax(log_probs.double(), dim=1).cumsum(dim=1)  # (B, C, L)
    threshold = uniform.to(log_probs.device)[:, None] * cdf[:, -1:]  # (B, 1, L)
    return (cdf < threshold).sum(dim=1).clamp_max(log_probs.shape[1] - 1)  # (B, L)


def reverse_schedule(total: int, steps: int) -> list[tuple[int, int]]:
    """(n, m) pairs from N down to 0 in ``steps`` strides (all N single steps when steps >= N)."""
    points = sorted({int(round(x)) for x in np.linspace(total, 0, min(steps, total) + 1)}, reverse=True)
    return list(zip(points[:-1], points[1:]))


@torch.no_grad()
def sample_tokens(model: DiscreteDiffusion, cond: torch.Tensor | np.ndarray, *, guidance: float = 8.0,
                  steps: int = 100, truncation: float = 1.0, seeds: Sequence[int] = (0,),
                  autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """cond (B, 1+K, d) -> token maps (B, L) of codes; token map i is a function of seeds[i] alone."""
    device = next(model.parameters()).device
    cond = torch.as_tensor(np.asarray(cond) if not torch.is_tensor(cond) else cond, dtype=torch.float32).to(device)
    batch = cond.shape[0]
    if len(seeds) != batch:
        raise ValueError(f"{len(seeds)} seeds for {batch} conditions")
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    t = model.config.transformer
    x = torch.full((batch, t.height * t.width), model.transition.mask_id, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        for n, m in reverse_schedule(model.steps, steps):
            n_batch = torch.full((batch,), n, dtype=torch.long, device=device)
            log_x0 = guided_log_x0(model, x, n_batch, cond, guidance, truncation)  # (B, V, L)
            if m == 0:
                x = sample_rows(log_x0, generators)
            else:
                log_prev = model.transition.posterior(log_x0, x, n_batch, torch.full_like(n_batch, m))
                x = sample_rows(log_prev, generators)
    model.train(was_training)
    return x
