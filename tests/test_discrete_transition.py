"""The mask + uniform transition checked against dense matrices and brute-force Bayes on a small V.

The dense (V+1) x (V+1) matrices exist only here: column j of Q_n is q(x_n | x_{n-1} = j), built by
applying one step to each one-hot state.
"""

from __future__ import annotations

import pytest
import torch

from knn_diffusion.models.discrete.config import TransitionConfig
from knn_diffusion.models.discrete.transition import MaskUniformTransition, one_hot_log

V, N = 5, 12


@pytest.fixture(scope="module")
def transition():
    # Stronger uniform noise than the default, so the beta terms matter in the checks.
    return MaskUniformTransition(V, TransitionConfig(steps=N, alpha_bar_start=0.95, alpha_bar_end=0.01,
                                                     gamma_bar_start=0.02, gamma_bar_end=0.9))


def dense_step(transition, n: int) -> torch.Tensor:
    states = torch.arange(V + 1)[None]  # (1, V+1): every state as one token
    out = transition.step(one_hot_log(states, V + 1), torch.tensor([n]))  # (1, V+1 to, V+1 from)
    return out[0].double().exp()


def dense_cumulative(transition, n: int) -> torch.Tensor:
    """Product Q_n ... Q_1 restricted to code columns: (V+1, V)."""
    matrix = torch.eye(V + 1, dtype=torch.float64)
    for m in range(1, n + 1):
        matrix = dense_step(transition, m) @ matrix
    return matrix[:, :V]


def test_each_step_is_a_stochastic_matrix_of_eq7(transition):
    for n in range(1, N + 1):
        q = dense_step(transition, n)
        assert torch.all(q >= 0)
        torch.testing.assert_close(q.sum(0), torch.ones(V + 1, dtype=torch.float64), atol=1e-6, rtol=0)
        assert q[V, V] == pytest.approx(1.0, abs=1e-6)  # [MASK] is absorbing
        # codes: alpha + beta on the diagonal, beta off it, gamma to [MASK]
        alpha, beta, gamma = (c.double().exp().view(()) for c in transition.coefficients(torch.tensor([n - 1]),
                                                                                      torch.tensor([n])))
        torch.testing.assert_close(q[:V, :V], beta * torch.ones(V, V, dtype=torch.float64)
                                   + alpha * torch.eye(V, dtype=torch.float64), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(q[V, :V], gamma.expand(V), atol=1e-6, rtol=1e-5)


def test_closed_form_cumulative_equals_product_of_steps(transition):
    codes = torch.arange(V)[None]  # every code as one token
    for n in range(0, N + 1):
        closed = transition.cumulative(one_hot_log(codes, V), torch.tensor([n]))[0].double().exp()  # (V+1, V)
        torch.testing.assert_close(closed, dense_cumulative(transition, n), atol=2e-6, rtol=1e-4)


def brute_force_posterior(transition, n: int) -> torch.Tensor:
    """post[j, i, c] = q(x_{n-1} = j | x_n = i, x_0 = c) by Bayes' rule over the dense matrices."""
    step, prev, now = dense_step(transition, n), dense_cumulative(transition, n - 1), dense_cumulative(transition, n)
    return step.T[:, :, None] * prev[:, None, :] / now[None, :, :]  # (V+1, V+1, V)


def test_posterior_equals_bayes_rule(transition):
    for n in (1, 2, N // 2, N):
        expected = brute_force_posterior(transition, n)
        x_n = torch.arange(V + 1).repeat_interleave(V)[None]  # every (x_n, x_0) pair as one token
        x_0 = torch.arange(V).repeat(V + 1)[None]
        got = transition.posterior(one_hot_log(x_0, V), x_n, torch.tensor([n]))[0].double().exp()  # (V+1, T)
        want = expected[:, x_n[0], x_0[0]]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_strided_posterior_equals_bayes_rule_over_several_steps(transition):
    m, n = 3, 8
    through = torch.eye(V + 1, dtype=torch.float64)
    for step in range(m + 1, n + 1):
        through = dense_step(transition, step) @ through  # q(x_n | x_m): (V+1, V+1)
    prev, now = dense_cumulative(transition, m), dense_cumulative(transition, n)
    expected = through.T[:, :, None] * prev[:, None, :] / now[None, :, :]
    x_n = torch.arange(V + 1).repeat_interleave(V)[None]
    x_0 = torch.arange(V).repeat(V + 1)[None]
    got = transition.posterior(one_hot_log(x_0, V), x_n, torch.tensor([n]), torch.tensor([m]))[0].double().exp()
    torch.testing.assert_close(got, expected[:, x_n[0], x_0[0]], atol=1e-5, rtol=1e-4)


def test_posterior_of_a_predicted_distribution_is_the_mixture(transition):
    torch.manual_seed(0)
    n = N // 2
    p_x0 = torch.softmax(torch.randn(1, V, V + 1), dim=1)  # (1, V, L): a distribution per token
    x_n = torch.arange(V + 1)[None]
    got = transition.posterior(p_x0.log(), x_n, torch.tensor([n]))[0].double().exp()  # (V+1, L)
    post = brute_force_posterior(transition, n)  # (V+1 prev, V+1 now, V x0)
    want = torch.einsum("jic,ci->ji", post[:, :, :], p_x0[0].double())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_last_step_is_all_mask_up_to_the_schedule_epsilon():
    default = TransitionConfig()
    transition = MaskUniformTransition(64, default)
    x0 = torch.randint(0, 64, (4, 16))
    q = transition.cumulative(one_hot_log(x0, 64), torch.full((4,), default.steps)).exp()
    assert torch.all(q[:, 64] >= default.gamma_bar_end - 1e-6)
    assert torch.all(q[:, 64] > 0.9999)
    sampled = transition.q_sample(x0, torch.full((4,), default.steps), torch.Generator().manual_seed(0))
    assert torch.all(sampled == 64)
    kept = transition.q_sample(x0, torch.zeros(4, dtype=torch.long), torch.Generator().manual_seed(0))
    assert torch.equal(kept, x0)


def test_q_sample_draws_from_the_closed_form_cumulative(transition):
    n = 6
    x0 = torch.arange(V).repeat(4000)[None]  # every code 4000 times
    drawn = transition.q_sample(x0, torch.tensor([n]), torch.Generator().manual_seed(0))[0]
    counts = torch.zeros(V + 1, V, dtype=torch.float64)
    counts.index_put_((drawn, x0[0]), torch.ones(drawn.shape[0], dtype=torch.float64), accumulate=True)
    torch.testing.assert_close(counts / 4000, dense_cumulative(transition, n), atol=0.025, rtol=0)
