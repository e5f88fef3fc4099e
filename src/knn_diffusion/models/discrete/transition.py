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
        v = float(num_codes)
        ramp = torch.linspace(0, 1, n, dtype=torch.float64)
        alpha_bar = torch.cat([torch.ones(1, dtype=torch.float64),
                               config.alpha_bar_start + ramp * (config.alpha_bar_end - config.alpha_bar_start)])
        gamma_bar = torch.cat([torch.zeros(1, dtype=torch.float64),
                               config.gamma_bar_start + ramp * (config.gamma_bar_end - config.gamma_bar_start)])
        beta_bar = (1 - alpha_bar - gamma_bar) / v
        alpha = torch.ones_like(alpha_bar)
        alpha[1:] = alpha_bar[1:] / alpha_bar[:-1]
        gamma = torch.zeros_like(gamma_bar)
        gamma[1:] = 1 - (1 - gamma_bar[1:]) / (1 - gamma_bar[:-1])
        beta = (1 - alpha - gamma) / v
        if (beta < -1e-12).any() or (beta_bar < -1e-12).any():
            raise ConfigError("transition schedule gives negative uniform-noise probabilities; check the ends")
        for name, value in dict(alpha=alpha, beta=beta.clamp_min(0), gamma=gamma, alpha_bar=alpha_bar,
                                beta_bar=beta_bar.clamp_min(0), gamma_bar=gamma_bar).items():
            self.register_buffer(f"log_{name}", _log(value).float(), persistent=False)
        # A kept code's own probability: unchanged, or resampled onto itself.
        self.register_buffer("log_alpha_plus_beta", _log(alpha + beta.clamp_min(0)).float(), persistent=False)
        self.register_buffer("log_alpha_bar_plus_beta_bar", _log(alpha_bar + beta_bar.clamp_min(0)).float(),
                             persistent=False)

    @property
    def mask_id(self) -> int:
        return self.num_codes

    def _apply(self, log_p: torch.Tensor, log_alpha: torch.Tensor, log_beta: torch.Tensor,
               log_gamma: torch.Tensor) -> torch.Tensor:
        """One mask+uniform map applied to (unnormalised) log masses over codes (+ optional [MASK] row).

        log_p (B, V, L) or (B, V+1, L); the coefficients are (B, 1, 1). Returns (B, V+1, L).
        """
        codes = log_p[:, :self.num_codes]                            # (B, V, L)
        code_mass = torch.logsumexp(codes, dim=1, keepdim=True)      # (B, 1, L)
        out_codes = torch.logaddexp(codes + log_alpha, code_mass + log_beta)  # (B, V, L)
        out_mask = code_mass + log_gamma                             # (B, 1, L)
        if log_p.shape[1] > self.num_codes:
            out_mask = torch.logaddexp(out_mask, log_p[:, self.num_codes:])
        return torch.cat([out_codes, out_mask], dim=1)

    @staticmethod
    def _at(table: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        return table[n].view(-1, 1, 1)  # (B, 1, 1)

    def step(self, log_prev: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """log q(x_n) from log q(x_{n-1}) (B, V+1, L) for one step n (B,) in 1..N."""
        return self._apply(log_prev, self._at(self.log_alpha, n), self._at(self.log_beta, n),
                           self._at(self.log_gamma, n))

    def cumulative(self, log_x0: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """log q(x_n | x_0) (B, V+1, L) from a distribution over x_0 (B, V, L), n (B,) in 0..N."""
        return self._apply(log_x0, self._at(self.log_alpha_bar, n), self._at(self.log_beta_bar, n),
                           self._at(self.log_gamma_bar, n))

    def step_likelihood(self, x_n: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """log q(x_n | x_{n-1} = j) for every j (B, V+1, L), given observed tokens x_n (B, L)."""
        v = self.num_codes
        masked = (x_n == v).unsqueeze(1)                                           # (B, 1, L)
        same = nn.functional.one_hot(x_n, v + 1).permute(0, 2, 1).bool()           # (B, V+1, L)
        log_beta, log_kept = self._at(self.log_beta, n), self._at(self.log_alpha_plus_beta, n)
        log_gamma = self._at(self.log_gamma, n)
        # x_n a code i: alpha+beta from j=i, beta from other codes, 0 from [MASK].
        from_code = torch.where(same, log_kept, log_beta)                          # (B, V+1, L)
        from_code[:, v] = LOG_ZERO
        # x_n = [MASK]: gamma from any code, 1 from [MASK].
        from_mask = torch.cat([log_gamma.expand(x_n.shape[0], v, x_n.shape[1]),
                               torch.zeros_like(log_gamma).expand(x_n.shape[0], 1, x_n.shape[1])], dim=1)
        return torch.where(masked, from_mask, from_code)

    def cumulative_likelihood(self, x_n: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """log q(x_n | x_0 = c) for every code c (B, V, L), given observed tokens x_n (B, L)."""
        v = self.num_codes
        same = nn.functional.one_hot(x_n, v + 1).permute(0, 2, 1)[:, :v].bool()   # (B, V, L)
        log_kept = self._at(self.log_alpha_bar_plus_beta_bar, n)
        from_code = torch.where(same, log_kept, self._at(self.log_beta_bar, n))
        masked = (x_n == v).unsqueeze(1)
        return torch.where(masked, self._at(self.log_gamma_bar, n).expand_as(from_code), from_code)

    def posterior(self, log_x0: torch.Tensor, x_n: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """log sum_{x_0} q(x_{n-1} | x_n, x_0) p(x_0) (B, V+1, L), for n (B,) in 1..N.

        q(x_{n-1} | x_n, x_0) = q(x_n | x_{n-1}) q(x_{n-1} | x_0) / q(x_n | x_0). Because q(x_{n-1} | x_0)
        is linear in x_0, the mixture over a predicted p(x_0) is the cumulative map applied to the
        weights p(x_0) / q(x_n | x_0), times q(x_n | x_{n-1}), normalised over x_{n-1}. With a one-hot
        x_0 this is exactly Bayes' rule; with the network's p(x_0 | x_n) it is p_theta(x_{n-1} | x_n).
        """
        weights = log_x0 - self.cumulative_likelihood(x_n, n)                   # (B, V, L)
        prior = self.cumulative(weights, n - 1)                                  # (B, V+1, L) unnormalised
        joint = prior + self.step_likelihood(x_n, n)                             # (B, V+1, L)
        return (joint - torch.logsumexp(joint, dim=1, keepdim=True)).clamp_min(LOG_ZERO)

    def sample(self, log_probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw tokens (B, L) from log probabilities (B, C, L) with Gumbel-max (CPU generator, any device)."""
        uniform = torch.rand(log_probs.shape, generator=generator).to(log_probs.device)
        gumbel = -torch.log((-torch.log(uniform.clamp(1e-30, 1.0))).clamp_min(1e-30))
        return (log_probs + gumbel).argmax(dim=1)

    def q_sample(self, x0: torch.Tensor, n: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x_n ~ q(x_n | x_0) for tokens x0 (B, L) of codes in [0, V)."""
        return self.sample(self.cumulative(one_hot_log(x0, self.num_codes), n), generator)


def one_hot_log(tokens: torch.Tensor, classes: int) -> torch.Tensor:
    """tokens (B, L) -> log one-hot (B, classes, L) with LOG_ZERO off the token."""
    onehot = nn.functional.one_hot(tokens, classes).permute(0, 2, 1).float()
    return _log(onehot)
