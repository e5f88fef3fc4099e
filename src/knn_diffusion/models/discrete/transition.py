"""The VQ-Diffusion mask + uniform corruption of token maps (paper eq. 7), in log space.

States are the V codes plus one absorbing [MASK] (index V). One step n (1..N) keeps a code with
probability alpha_n, resamples it uniformly (each code beta_n = (1 - alpha_n - gamma_n) / V) or masks
it with probability gamma_n; [MASK] stays [MASK]. The cumulative alpha_bar_n and gamma_bar_n are linear
in n (Gu et al., 2021), so q(x_n | x_0) has the same form with the barred values.

Nothing here builds a (V+1) x (V+1) matrix: each transition is "a scaled copy of the distribution plus
a uniform share of its code mass, plus a mask share", which is O(V) per token. Distributions are log
probabilities of shape (B, V+1, L) over x_n (codes then [MASK]), or (B, V, L) over x_0 (codes only),
for L tokens. Index 0 of every schedule array is the identity (n = 0 is the data).
"""

from __future__ import annotations

import torch
from torch import nn

from knn_diffusion.config_fields import ConfigError
from knn_diffusion.models.discrete.config import TransitionConfig

LOG_ZERO = -70.0  # log of a probability treated as zero (exp underflows to 0 in float32)


def _log(x: torch.Tensor) -> torch.Tensor:
    return torch.log(x.clamp_min(1e-30)).clamp_min(LOG_ZERO)


class MaskUniformTransition(nn.Module):
    """q(x_n | x_{n-1}), q(x_n | x_0) and q(x_{n-1} | x_n, x_0) for V codes + [MASK]; schedules as buffers."""

    def __init__(self, num_codes: int, config: TransitionConfig):
        super().__init__()
        n = config.steps
        if num_codes < 2:
            raise ConfigError(f"the transition needs at least 2 codes, got {num_codes}")
        if not config.alpha_bar_start >= config.alpha_bar_end or not config.gamma_bar_start <= config.gamma_bar_end:
            raise ConfigError("transition schedule: alpha_bar must fall and gamma_bar rise from step 1 to step N")
        if config.alpha_bar_start + config.gamma_bar_start > 1 or config.alpha_bar_end + config.gamma_bar_end > 1:
            raise ConfigError("transition schedule: alpha_bar + gamma_bar must stay <= 1 (the rest is uniform noise)")
        self.num_codes, self.steps = num_codes, n
        ramp = torch.linspace(0, 1, n, dtype=torch.float64)
        alpha_bar = torch.cat([torch.ones(1, dtype=torch.float64),
                               config.alpha_bar_start + ramp * (config.alpha_bar_end - config.alpha_bar_start)])
        gamma_bar = torch.cat([torch.zeros(1, dtype=torch.float64),
                               config.gamma_bar_start + ramp * (config.gamma_bar_end - config.gamma_bar_start)])
        self.register_buffer("alpha_bar", alpha_bar, persistent=False)  # (N+1,), index 0 = identity
        self.register_buffer("gamma_bar", gamma_bar, persistent=False)
        step_alpha = alpha_bar[1:] / alpha_bar[:-1]
        step_gamma = 1 - (1 - gamma_bar[1:]) / (1 - gamma_bar[:-1])
        if (1 - step_alpha - step_gamma < -1e-12).any():
            raise ConfigError("transition schedule gives negative uniform-noise probabilities; check the ends")

    @property
    def mask_id(self) -> int:
        return self.num_codes

    def coefficients(self, m: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """log (alpha, beta, gamma) of q(x_n | x_m), m < n (B,): one map of the same mask+uniform form.

        Each (B, 1, 1). m = n - 1 is one step of eq. 7; m = 0 is the closed-form cumulative q(x_n | x_0).
        """
        alpha = self.alpha_bar[n] / self.alpha_bar[m]
        gamma = 1 - (1 - self.gamma_bar[n]) / (1 - self.gamma_bar[m])
        beta = ((1 - alpha - gamma) / self.num_codes).clamp_min(0)
        return tuple(_log(c).float().view(-1, 1, 1) for c in (alpha, beta, gamma))

    def _map(self, log_p: torch.Tensor, m: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """The map x_m -> x_n applied to (unnormalised) log masses over codes (+ optional [MASK] row).

        log_p (B, V, L) or (B, V+1, L) -> (B, V+1, L).
        """
        log_alpha, log_beta, log_gamma = self.coefficients(m, n)
        codes = log_p[:, :self.num_codes]                            # (B, V, L)
        code_mass = torch.logsumexp(codes, dim=1, keepdim=True)      # (B, 1, L)
        out_codes = torch.logaddexp(codes + log_alpha, code_mass + log_beta)  # (B, V, L)
        out_mask = code_mass + log_gamma                             # (B, 1, L)
        if log_p.shape[1] > self.num_codes:
            out_mask = torch.logaddexp(out_mask, log_p[:, self.num_codes:])
        return torch.cat([out_codes, out_mask], dim=1)

    def step(self, log_prev: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """log q(x_n) from log q(x_{n-1}) (B, V+1, L) for one step n (B,) in 1..N."""
        return self._map(log_prev, n - 1, n)

    def cumulative(self, log_x0: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """log q(x_n | x_0) (B, V+1, L) from a distribution over x_0 (B, V, L), n (B,) in 0..N."""
        return self._map(log_x0, torch.zeros_like(n), n)

    def likelihood(self, x_n: torch.Tensor, m: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """log q(x_n | x_m = j) for every state j (B, V+1, L), given observed tokens x_n (B, L)."""
        v = self.num_codes
        log_alpha, log_beta, log_gamma = self.coefficients(m, n)
        same = nn.functional.one_hot(x_n, v + 1).permute(0, 2, 1).bool()           # (B, V+1, L)
        # x_n a code i: alpha+beta from j=i, beta from other codes, 0 from [MASK].
        from_code = torch.where(same, torch.logaddexp(log_alpha, log_beta), log_beta)  # (B, V+1, L)
        from_code[:, v] = LOG_ZERO
        # x_n = [MASK]: gamma from any code, 1 from [MASK].
        from_mask = torch.cat([log_gamma.expand(x_n.shape[0], v, x_n.shape[1]),
                               torch.zeros_like(log_gamma).expand(x_n.shape[0], 1, x_n.shape[1])], dim=1)
        return torch.where((x_n == v).unsqueeze(1), from_mask, from_code)

    def posterior(self, log_x0: torch.Tensor, x_n: torch.Tensor, n: torch.Tensor,
                  m: torch.Tensor | None = None) -> torch.Tensor:
        """log sum_{x_0} q(x_m | x_n, x_0) p(x_0) (B, V+1, L) for m < n (B,); m defaults to n - 1.

        q(x_m | x_n, x_0) = q(x_n | x_m) q(x_m | x_0) / q(x_n | x_0). Because q(x_m | x_0) is linear in
        x_0, the mixture over a predicted p(x_0) is the cumulative map applied to the weights
        p(x_0) / q(x_n | x_0), times q(x_n | x_m), normalised over x_m. With a one-hot x_0 this is
        exactly Bayes' rule; with the network's p(x_0 | x_n) it is p_theta(x_m | x_n). m < n - 1 is
        the strided (fast) reverse step.
        """
        m = n - 1 if m is None else m
        zero = torch.zeros_like(n)
        weights = log_x0 - self.likelihood(x_n, zero, n)[:, :self.num_codes]    # (B, V, L)
        prior = self._map(weights, zero, m)                                   # (B, V+1, L) unnormalised
        joint = prior + self.likelihood(x_n, m, n)                              # (B, V+1, L)
        return (joint - torch.logsumexp(joint, dim=1, keepdim=True)).clamp_min(LOG_ZERO)

    def q_sample(self, x0: torch.Tensor, n: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x_n ~ q(x_n | x_0) for tokens x0 (B, L) of codes in [0, V): masked with probability gamma_bar,
        kept with alpha_bar, else a uniform code (which may be x0 itself: the alpha + beta diagonal).

        Two uniforms and one random code per token, drawn on the CPU ``generator`` (same on any device).
        """
        u = torch.rand(x0.shape, generator=generator, dtype=torch.float64).to(x0.device)
        uniform_code = torch.randint(0, self.num_codes, x0.shape, generator=generator).to(x0.device)
        gamma_bar, alpha_bar = self.gamma_bar[n][:, None], self.alpha_bar[n][:, None]  # (B, 1)
        kept = torch.where(u < gamma_bar + alpha_bar, x0, uniform_code)
        return torch.where(u < gamma_bar, torch.full_like(x0, self.mask_id), kept)


def one_hot_log(tokens: torch.Tensor, classes: int) -> torch.Tensor:
    """tokens (B, L) -> log one-hot (B, classes, L) with LOG_ZERO off the token."""
    onehot = nn.functional.one_hot(tokens, classes).permute(0, 2, 1).float()
    return _log(onehot)
