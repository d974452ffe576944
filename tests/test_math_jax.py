"""The math of reppo_jax.py against independent references (loops, closed forms, quadrature)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import integrate, stats

import reppo_jax as rj

# ------------------------------------------------------------------------------ hl_gauss


@pytest.mark.parametrize("vmin, vmax, num_bins", [(0.0, 150.0, 151), (-15.0, 15.0, 101), (-10.0, 10.0, 51)])
def test_hl_gauss_sums_to_one_and_recovers_value(vmin, vmax, num_bins):
    width = (vmax - vmin) / (num_bins - 1)
    values = np.random.default_rng(0).uniform(vmin + 3 * width, vmax - 3 * width, size=200)
    probs = np.asarray(rj.hl_gauss(jnp.asarray(values, jnp.float32), num_bins, vmin, vmax))
    assert probs.shape == (200, num_bins)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert (probs >= 0).all()
    support = np.linspace(vmin, vmax, num_bins)
    # Inside the support (away from the clipped edges) the mean recovers x closely.
    np.testing.assert_allclose(probs @ support, values, atol=0.02 * width)


def test_hl_gauss_clips_outside_support():
    probs = np.asarray(rj.hl_gauss(jnp.array([-50.0, 0.0, 150.0, 400.0]), 151, 0.0, 150.0))
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
            [integrate.quad(stats.norm.pdf, lo, hi, args=(x, sigma))[0] for lo, hi in zip(edges[:-1], edges[1:])]
        )
        reference /= reference.sum()
        probs = np.asarray(rj.hl_gauss(jnp.float32(x), num_bins, vmin, vmax))
        np.testing.assert_allclose(probs, reference, atol=2e-6)


# --------------------------------------------------------------- tanh-Gaussian log-prob


def naive_tanh_normal_log_prob(action, mean, std):
    """Change of variables in float64, written the obvious way."""
    action, mean, std = (np.asarray(v, np.float64) for v in (action, mean, std))
    pre_tanh = np.arctanh(action)
    log_normal = stats.norm.logpdf(pre_tanh, mean, std)
    return (log_normal - np.log(1.0 - action**2)).sum(-1)


def test_tanh_normal_log_prob_matches_naive_float64():
    rng = np.random.default_rng(1)
    mean = rng.normal(size=(64, 6)).astype(np.float32)
    std = rng.uniform(0.1, 2.0, size=(64, 6)).astype(np.float32)
    action = np.tanh(mean + std * rng.normal(size=(64, 6))).clip(-0.995, 0.995).astype(np.float32)
    ours = np.asarray(rj.tanh_normal_log_prob(action, mean, std))
    # float32 against float64: measured max error 1.5e-6 (log-prob) and 5.8e-6 (sampled)
    np.testing.assert_allclose(ours, naive_tanh_normal_log_prob(action, mean, std), rtol=1e-5, atol=2e-5)


def test_sampled_log_prob_equals_log_prob_of_the_sample():
    rng = np.random.default_rng(2)
    mean, std = rng.normal(size=(32, 3)), rng.uniform(0.2, 1.0, size=(32, 3))
    noise = rng.normal(size=(32, 3))
    action, log_prob = rj.sample_tanh_normal(jnp.asarray(mean), jnp.asarray(std), jnp.asarray(noise))
    np.testing.assert_allclose(np.tanh(mean + std * noise), action, atol=1e-6)
    # float32 against float64: measured max error 1.5e-6 (log-prob) and 5.8e-6 (sampled)
    np.testing.assert_allclose(log_prob, naive_tanh_normal_log_prob(action, mean, std), rtol=1e-5, atol=2e-5)


def test_log_prob_is_finite_at_the_boundary():
    """IMPLEMENTATION DETAIL 7: |a| = 1 is clipped to 1 - 1e-6 (SPEC section 5) before atanh."""
    assert rj.LOG_PROB_CLIP == 1 - 1e-6
    log_prob = rj.tanh_normal_log_prob(jnp.array([[1.0, -1.0]]), jnp.zeros((1, 2)), jnp.ones((1, 2)))
    clipped = rj.tanh_normal_log_prob(jnp.array([[1 - 1e-6, -(1 - 1e-6)]]), jnp.zeros((1, 2)), jnp.ones((1, 2)))
    assert np.isfinite(np.asarray(log_prob)).all() and np.array_equal(log_prob, clipped)
    inside = np.float32(1 - 1e-5)  # not clipped: the naive value, not the one at the clip
    ours = rj.tanh_normal_log_prob(jnp.array([[inside]]), jnp.zeros((1, 1)), jnp.ones((1, 1)))
    np.testing.assert_allclose(ours, naive_tanh_normal_log_prob([[inside]], [[0.0]], [[1.0]]), rtol=1e-4)


@pytest.mark.parametrize("mean, std", [(0.0, 0.5), (0.7, 0.3), (-1.2, 1.0)])
def test_tanh_normal_density_integrates_to_one_in_1d(mean, std):
    grid = np.linspace(-1 + 1e-6, 1 - 1e-6, 400_001, dtype=np.float64)
    log_prob = rj.tanh_normal_log_prob(jnp.asarray(grid[:, None], jnp.float32), jnp.float32(mean), jnp.float32(std))
    assert abs(np.trapezoid(np.exp(np.asarray(log_prob, np.float64)), grid) - 1.0) < 2e-3


# ------------------------------------------------------------------------ soft TD(lambda)


def recursive_loop(reward, value, term, trunc, gamma, lmbda):
    """SPEC section 7 as a plain Python loop."""
    T, N = reward.shape
    out = np.zeros((T, N))
    for n in range(N):
        following = value[T - 1, n]
        for t in reversed(range(T)):
            if term[t, n]:
                g = reward[t, n]
            elif trunc[t, n] or t == T - 1:
                g = reward[t, n] + gamma * value[t, n]
            else:
                g = reward[t, n] + gamma * (lmbda * following + (1 - lmbda) * value[t, n])
            out[t, n] = following = g
    return out


def lambda_mixture(reward, value, term, trunc, gamma, lmbda):
    """The same targets as an explicit lambda-weighted mixture of n-step soft returns that
    stop at the episode's end (or the rollout's end) -- a different computation."""
    T, N = reward.shape
    out = np.zeros((T, N))
    for n_env in range(N):
        for t in range(T):
            horizon = T - t
            for k in range(t, T):
                if term[k, n_env] or trunc[k, n_env]:
                    horizon = k - t + 1
                    break

            def n_step(n, t=t, n_env=n_env):
                ret = sum(gamma**k * reward[t + k, n_env] for k in range(n))
                last = t + n - 1
                if not term[last, n_env]:
                    ret += gamma**n * value[last, n_env]
                return ret

            weights = [(1 - lmbda) * lmbda ** (n - 1) for n in range(1, horizon)] + [lmbda ** (horizon - 1)]
            out[t, n_env] = sum(w * n_step(n) for n, w in zip(range(1, horizon + 1), weights))
    return out


def random_rollout(seed, T=12, N=5):
    rng = np.random.default_rng(seed)
    reward = rng.normal(size=(T, N))
    value = rng.normal(size=(T, N)) * 3
    term = rng.random((T, N)) < 0.1
    trunc = (rng.random((T, N)) < 0.1) & ~term
    term[-1, 0], trunc[-1, 1], term[3, 2], trunc[3, 3] = True, True, True, True  # edge cases
    trunc[-1, 0], term[-1, 1], trunc[3, 2], term[3, 3] = False, False, False, False
    return reward, value, term, trunc


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("lmbda", [0.0, 0.5, 0.95, 1.0])
def test_soft_lambda_returns_matches_loop_and_mixture(seed, lmbda):
    reward, value, term, trunc = random_rollout(seed)
    ours = np.asarray(
        rj.soft_lambda_returns(
            jnp.asarray(reward, jnp.float32),
            jnp.asarray(value, jnp.float32),
            jnp.asarray(term, jnp.float32),
            jnp.asarray(trunc, jnp.float32),
            0.99,
            lmbda,
        )
    )
    np.testing.assert_allclose(ours, recursive_loop(reward, value, term, trunc, 0.99, lmbda), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(ours, lambda_mixture(reward, value, term, trunc, 0.99, lmbda), rtol=1e-5, atol=1e-4)


def test_soft_lambda_returns_special_cases():
    reward, value, term, trunc = random_rollout(7)
    args = [jnp.asarray(x, jnp.float32) for x in (reward, value, term, trunc)]
    one_step = np.where(term, reward, reward + 0.9 * value)
    np.testing.assert_allclose(rj.soft_lambda_returns(*args, 0.9, 0.0), one_step, rtol=1e-5, atol=1e-5)
    # lambda = 1: discounted Monte-Carlo returns to the episode's end, bootstrapped by v'
    # only where the episode was cut (time limit or end of rollout).
    T, N = reward.shape
    mc = np.zeros((T, N))
    for n in range(N):
        for t in range(T):
            ret, k = 0.0, t
            while True:
                ret += 0.9 ** (k - t) * reward[k, n]
                if term[k, n]:
                    break
                if trunc[k, n] or k == T - 1:
                    ret += 0.9 ** (k - t + 1) * value[k, n]
                    break
                k += 1
            mc[t, n] = ret
    np.testing.assert_allclose(rj.soft_lambda_returns(*args, 0.9, 1.0), mc, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------- policy KL


@pytest.mark.parametrize("mean_scale", [1.0, 4.0])
def test_policy_kl_is_zero_for_identical_policies(mean_scale):
    """Both log-probabilities at the same clipped sample (SPEC section 8): zero also where
    samples are clipped (means near +-4 put ~8 % of the u past atanh(1 - 1e-4) ~= 4.95)."""
    rng = np.random.default_rng(3)
    mean = jnp.asarray(mean_scale * np.sign(rng.normal(size=(10, 4))) + rng.normal(size=(10, 4)) / mean_scale)
    std = jnp.asarray(rng.uniform(0.2, 1, size=(10, 4)))
    noise = jax.random.normal(jax.random.PRNGKey(0), (16, 10, 4))
    np.testing.assert_allclose(rj.policy_kl(mean, std, mean, std, noise), 0.0, atol=1e-6)


def test_policy_kl_converges_to_closed_form_gaussian_kl():
    """KL is invariant under the (bijective) tanh, so KL(tanh-N0 || tanh-N1) = KL(N0 || N1).
    pi has twice pi_old's std, so the forward KL (1.31) is far from the reverse one (3.86): the
    test also tells the KL's direction."""
    m0, s0 = jnp.array([[0.2, -0.3, 0.1]]), jnp.array([[0.3, 0.25, 0.2]])
    m1, s1 = jnp.array([[0.4, 0.0, -0.1]]), jnp.array([[0.6, 0.5, 0.4]])

    def gaussian_kl(mean_p, std_p, mean_q, std_q):
        return float(np.sum(np.log(std_q / std_p) + (std_p**2 + (mean_p - mean_q) ** 2) / (2 * std_q**2) - 0.5))

    closed = gaussian_kl(m0, s0, m1, s1)
    assert abs(gaussian_kl(m1, s1, m0, s0) - closed) > 0.5 * closed  # the reverse KL would fail below
    estimates = [
        float(rj.policy_kl(m0, s0, m1, s1, jax.random.normal(jax.random.PRNGKey(1), (m, 1, 3)))[0])
        for m in (16, 200_000)
    ]
    assert abs(estimates[1] - closed) < 0.02 * closed + 1e-3
    assert abs(estimates[1] - closed) < abs(estimates[0] - closed) + 1e-3


def naive_policy_kl(old_mean, old_std, mean, std, noise, sample_clip=1.0 - 1e-4):
    """SPEC section 8 in float64: samples from pi_old clipped to +-(1 - 1e-4), both
    log-probabilities at the clipped sample, averaged over the samples (axis 0)."""
    old_mean, old_std, noise = (np.asarray(v, np.float64) for v in (old_mean, old_std, noise))
    samples = np.clip(np.tanh(old_mean + old_std * noise), -sample_clip, sample_clip)
    log_ratio = naive_tanh_normal_log_prob(samples, old_mean, old_std) - naive_tanh_normal_log_prob(samples, mean, std)
    return log_ratio.mean(0)


def saturated_policies(rng):
    """pi_old and pi with means near +-5: about half of pi_old's u lie past atanh(1 - 1e-4) ~= 4.95."""
    sign = np.sign(rng.normal(size=(8, 3)))
    old_mean, mean = sign * rng.uniform(4.5, 5.5, size=(8, 3)), sign * rng.uniform(3.5, 4.5, size=(8, 3))
    old_std, std = rng.uniform(0.5, 1.0, size=(8, 3)), rng.uniform(0.5, 1.0, size=(8, 3))
    return [x.astype(np.float32) for x in (old_mean, old_std, mean, std, rng.normal(size=(16, 8, 3)))]


def test_policy_kl_matches_a_float64_reference_where_samples_are_clipped():
    """The sample clip is SPEC's +-(1 - 1e-4), where it matters: with the clip at 1 - 1e-6
    instead the reference moves by far more than the tolerance."""
    old_mean, old_std, mean, std, noise = saturated_policies(np.random.default_rng(7))
    want = naive_policy_kl(old_mean, old_std, mean, std, noise)
    assert (np.abs(np.tanh(old_mean + old_std * noise)) > 1 - 1e-4).mean() > 0.3
    assert np.abs(naive_policy_kl(old_mean, old_std, mean, std, noise, 1 - 1e-6) - want).max() > 0.1
    got = rj.policy_kl(*(jnp.asarray(x) for x in (old_mean, old_std, mean, std, noise)))
    # float32's 1 - 1e-4 moves a clipped u by ~1e-4: measured max error 4e-4 (the other clip: 4.4)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------- normaliser


def test_normalizer_equals_numpy_over_concatenated_batches():
    rng = np.random.default_rng(4)
    batches = [rng.normal(loc=3.0, scale=2.0, size=(n, 7)) for n in (5, 100, 33, 1)]
    state = rj.normalizer_init(7)
    for batch in batches:
        state = rj.normalizer_update(state, jnp.asarray(batch, jnp.float32))
    everything = np.concatenate(batches)
    np.testing.assert_allclose(state.mean, everything.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state.var, everything.var(0), rtol=1e-4)
    assert float(state.count) == len(everything)
    x = rng.normal(size=(3, 7))
    expected = (x - everything.mean(0)) / np.sqrt(everything.var(0) + 1e-2)
    np.testing.assert_allclose(rj.normalize(state, jnp.asarray(x, jnp.float32)), expected, rtol=1e-4, atol=1e-4)


def test_normalizer_accepts_time_major_batches():
    batch = np.random.default_rng(5).normal(size=(4, 6, 2))
    state = rj.normalizer_update(rj.normalizer_init(2), jnp.asarray(batch, jnp.float32))
    np.testing.assert_allclose(state.mean, batch.reshape(-1, 2).mean(0), atol=1e-5)
    assert math.isclose(float(state.count), 24)


# ------------------------------------------------------------------------------ networks


def test_actor_std_has_a_floor():
    """IMPLEMENTATION DETAIL 2: std = exp(log_std) + min_std, however small log_std gets."""
    actor = rj.Actor(5, 3, 32, 0.1, nnx.Rngs(0))
    log_std = np.array([-100.0, 0.0, 0.5])  # the head's log_std output, made constant
    actor.head.kernel[...] = actor.head.kernel[...].at[:, 3:].set(0.0)
    actor.head.bias[...] = actor.head.bias[...].at[3:].set(log_std)
    _, std = actor(jax.random.normal(jax.random.PRNGKey(0), (8, 5)))
    np.testing.assert_allclose(std, np.broadcast_to(np.exp(log_std) + 0.1, (8, 3)), rtol=1e-6)
