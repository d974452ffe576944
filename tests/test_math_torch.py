"""The math of reppo_torch.py against independent references (loops, closed forms, quadrature).

The same checks as tests/test_math_jax.py; the reference implementations (plain loops in
float64) are imported from there so that both files are held to one reference."""

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats
from test_math_jax import (
    lambda_mixture,
    naive_policy_kl,
    naive_tanh_normal_log_prob,
    random_rollout,
    recursive_loop,
    saturated_policies,
)

import reppo_torch as rt


def t(x):
    return torch.as_tensor(np.asarray(x), dtype=torch.float32)


# ------------------------------------------------------------------------------ hl_gauss


@pytest.mark.parametrize("vmin, vmax, num_bins", [(0.0, 150.0, 151), (-15.0, 15.0, 101), (-10.0, 10.0, 51)])
def test_hl_gauss_sums_to_one_and_recovers_value(vmin, vmax, num_bins):
    width = (vmax - vmin) / (num_bins - 1)
    values = np.random.default_rng(0).uniform(vmin + 3 * width, vmax - 3 * width, size=200)
    probs = rt.hl_gauss(t(values), num_bins, vmin, vmax).numpy()
    assert probs.shape == (200, num_bins)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert (probs >= 0).all()
    support = np.linspace(vmin, vmax, num_bins)
    np.testing.assert_allclose(probs @ support, values, atol=0.02 * width)


def test_hl_gauss_clips_outside_support():
    probs = rt.hl_gauss(t([-50.0, 0.0, 150.0, 400.0]), 151, 0.0, 150.0).numpy()
    np.testing.assert_allclose(probs[0], probs[1], atol=1e-7)
    np.testing.assert_allclose(probs[3], probs[2], atol=1e-7)
    assert probs[0].argmax() == 0 and probs[3].argmax() == 150


def test_hl_gauss_matches_numerical_integration_of_the_density():
    vmin, vmax, num_bins = -5.0, 5.0, 21
    width = (vmax - vmin) / (num_bins - 1)
    sigma = 0.75 * width
    for x in [-4.3, -0.77, 0.0, 1.234, 4.9]:
        edges = vmin - width / 2 + width * np.arange(num_bins + 1)
        reference = np.array(
            [integrate.quad(stats.norm(x, sigma).pdf, lo, hi)[0] for lo, hi in itertools.pairwise(edges)]
        )
        reference /= reference.sum()
        np.testing.assert_allclose(rt.hl_gauss(t(x), num_bins, vmin, vmax).numpy(), reference, atol=2e-6)


# --------------------------------------------------------------- tanh-Gaussian log-prob


def test_tanh_normal_log_prob_matches_naive_float64():
    rng = np.random.default_rng(1)
    mean = rng.normal(size=(64, 6)).astype(np.float32)
    std = rng.uniform(0.1, 2.0, size=(64, 6)).astype(np.float32)
    action = np.tanh(mean + std * rng.normal(size=(64, 6))).clip(-0.995, 0.995).astype(np.float32)
    ours = rt.tanh_normal_log_prob(t(action), t(mean), t(std)).numpy()
    # float32 against float64: measured max error 1.5e-6 (log-prob) and 5.8e-6 (sampled)
    np.testing.assert_allclose(ours, naive_tanh_normal_log_prob(action, mean, std), rtol=1e-5, atol=2e-5)


def test_sampled_log_prob_equals_log_prob_of_the_sample():
    rng = np.random.default_rng(2)
    mean, std = rng.normal(size=(32, 3)), rng.uniform(0.2, 1.0, size=(32, 3))
    noise = rng.normal(size=(32, 3))
    action, log_prob = rt.sample_tanh_normal(t(mean), t(std), t(noise))
    np.testing.assert_allclose(np.tanh(mean + std * noise), action.numpy(), atol=1e-6)
    # float32 against float64: measured max error 1.5e-6 (log-prob) and 5.8e-6 (sampled)
    np.testing.assert_allclose(log_prob.numpy(), naive_tanh_normal_log_prob(action, mean, std), rtol=1e-5, atol=2e-5)


def test_log_prob_is_finite_at_the_boundary():
    """IMPLEMENTATION DETAIL 7: |a| = 1 is clipped to 1 - 1e-6 (SPEC section 5) before atanh."""
    assert rt.LOG_PROB_CLIP == 1 - 1e-6
    log_prob = rt.tanh_normal_log_prob(t([[1.0, -1.0]]), t([[0.0, 0.0]]), t([[1.0, 1.0]]))
    clipped = rt.tanh_normal_log_prob(t([[1 - 1e-6, -(1 - 1e-6)]]), t([[0.0, 0.0]]), t([[1.0, 1.0]]))
    assert torch.isfinite(log_prob).all() and torch.equal(log_prob, clipped)
    inside = np.float32(1 - 1e-5)  # not clipped: the naive value, not the one at the clip
    ours = rt.tanh_normal_log_prob(t([[inside]]), t([[0.0]]), t([[1.0]])).numpy()
    np.testing.assert_allclose(ours, naive_tanh_normal_log_prob([[inside]], [[0.0]], [[1.0]]), rtol=1e-4)


@pytest.mark.parametrize("mean, std", [(0.0, 0.5), (0.7, 0.3), (-1.2, 1.0)])
def test_tanh_normal_density_integrates_to_one_in_1d(mean, std):
    grid = np.linspace(-1 + 1e-6, 1 - 1e-6, 400_001, dtype=np.float64)
    log_prob = rt.tanh_normal_log_prob(t(grid[:, None]), t(mean), t(std)).numpy()
    assert abs(np.trapezoid(np.exp(log_prob.astype(np.float64)), grid) - 1.0) < 2e-3


# ------------------------------------------------------------------------ soft TD(lambda)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("lmbda", [0.0, 0.5, 0.95, 1.0])
def test_soft_lambda_returns_matches_loop_and_mixture(seed, lmbda):
    reward, value, term, trunc = random_rollout(seed)
    ours = rt.soft_lambda_returns(t(reward), t(value), t(term), t(trunc), 0.99, lmbda).numpy()
    np.testing.assert_allclose(ours, recursive_loop(reward, value, term, trunc, 0.99, lmbda), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(ours, lambda_mixture(reward, value, term, trunc, 0.99, lmbda), rtol=1e-5, atol=1e-4)


def test_soft_lambda_returns_one_step_when_lambda_is_zero():
    reward, value, term, trunc = random_rollout(7)
    one_step = np.where(term, reward, reward + 0.9 * value)
    ours = rt.soft_lambda_returns(t(reward), t(value), t(term), t(trunc), 0.9, 0.0).numpy()
    np.testing.assert_allclose(ours, one_step, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- policy KL


@pytest.mark.parametrize("mean_scale", [1.0, 4.0])
def test_policy_kl_is_zero_for_identical_policies(mean_scale):
    """Both log-probabilities at the same clipped sample (SPEC section 8): zero also where
    samples are clipped (means near +-4 put ~8 % of the u past atanh(1 - 1e-4) ~= 4.95)."""
    rng = np.random.default_rng(3)
    mean = t(mean_scale * np.sign(rng.normal(size=(10, 4))) + rng.normal(size=(10, 4)) / mean_scale)
    std = t(rng.uniform(0.2, 1, size=(10, 4)))
    noise = torch.randn(16, 10, 4, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(rt.policy_kl(mean, std, mean, std, noise).numpy(), 0.0, atol=1e-6)


def test_policy_kl_converges_to_closed_form_gaussian_kl():
    """KL is invariant under the (bijective) tanh, so KL(tanh-N0 || tanh-N1) = KL(N0 || N1).
    pi has twice pi_old's std, so the forward KL (1.31) is far from the reverse one (3.86): the
    test also tells the KL's direction."""
    m0, s0 = t([[0.2, -0.3, 0.1]]), t([[0.3, 0.25, 0.2]])
    m1, s1 = t([[0.4, 0.0, -0.1]]), t([[0.6, 0.5, 0.4]])

    def gaussian_kl(mean_p, std_p, mean_q, std_q):
        return float(torch.sum(torch.log(std_q / std_p) + (std_p**2 + (mean_p - mean_q) ** 2) / (2 * std_q**2) - 0.5))

    closed = gaussian_kl(m0, s0, m1, s1)
    assert abs(gaussian_kl(m1, s1, m0, s0) - closed) > 0.5 * closed  # the reverse KL would fail below
    generator = torch.Generator().manual_seed(1)
    estimates = [
        float(rt.policy_kl(m0, s0, m1, s1, torch.randn(m, 1, 3, generator=generator))[0]) for m in (16, 200_000)
    ]
    assert abs(estimates[1] - closed) < 0.02 * closed + 1e-3
    assert abs(estimates[1] - closed) < abs(estimates[0] - closed) + 1e-3


def test_policy_kl_matches_a_float64_reference_where_samples_are_clipped():
    """SPEC's sample clip +-(1 - 1e-4) where it matters (about half the samples are clipped)."""
    old_mean, old_std, mean, std, noise = saturated_policies(np.random.default_rng(7))
    want = naive_policy_kl(old_mean, old_std, mean, std, noise)
    got = rt.policy_kl(*(t(x) for x in (old_mean, old_std, mean, std, noise))).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)  # as in tests/test_math_jax.py


# ---------------------------------------------------------------------------- normaliser


def test_normalizer_equals_numpy_over_concatenated_batches():
    rng = np.random.default_rng(4)
    batches = [rng.normal(loc=3.0, scale=2.0, size=(n, 7)) for n in (5, 100, 33, 1)]
    state = rt.normalizer_init(7)
    for batch in batches:
        state = rt.normalizer_update(state, t(batch))
    everything = np.concatenate(batches)
    np.testing.assert_allclose(state.mean.numpy(), everything.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state.var.numpy(), everything.var(0), rtol=1e-4)
    assert float(state.count) == len(everything)
    x = rng.normal(size=(3, 7))
    expected = (x - everything.mean(0)) / np.sqrt(everything.var(0) + 1e-2)
    np.testing.assert_allclose(rt.normalize(state, t(x)).numpy(), expected, rtol=1e-4, atol=1e-4)


def test_normalizer_accepts_time_major_batches():
    batch = np.random.default_rng(5).normal(size=(4, 6, 2))
    state = rt.normalizer_update(rt.normalizer_init(2), t(batch))
    np.testing.assert_allclose(state.mean.numpy(), batch.reshape(-1, 2).mean(0), atol=1e-5)
    assert math.isclose(float(state.count), 24)


# ------------------------------------------------------------------------------ networks


@pytest.mark.parametrize("vmin, vmax", [(0.0, 150.0), (-15.0, 15.0)])
def test_untrained_critic_predicts_about_zero(vmin, vmax):
    """IMPLEMENTATION DETAIL 1: the 40 * hl_gauss(0) logit offset; 0, not vmin (-15, ManiSkill's)."""
    torch.manual_seed(0)
    critic = rt.Critic(5, 3, 32, 51, vmin, vmax)
    logits, _ = critic(torch.randn(32, 5), torch.tanh(torch.randn(32, 3)))
    # Measured: 1.0e-5 at [0, 150]; a 20 * hl_gauss(0) offset would leave 0.029, no offset the middle, 75.
    assert rt.q_value(logits, vmin, vmax).abs().max() < 1e-3


def test_actor_std_has_a_floor():
    """IMPLEMENTATION DETAIL 2: std = exp(log_std) + min_std, however small log_std gets."""
    actor = rt.Actor(5, 3, 32, 0.1)
    log_std = torch.tensor([-100.0, 0.0, 0.5])  # the head's log_std output, made constant
    with torch.no_grad():
        actor.head.weight[3:] = 0.0
        actor.head.bias[3:] = log_std
        _, std = actor(torch.randn(8, 5))
    torch.testing.assert_close(std, (torch.exp(log_std) + 0.1).expand(8, 3), rtol=1e-6, atol=0)
