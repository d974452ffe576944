"""Gradients of the REPPO losses in reppo_jax.py behave as SPEC section 8 says."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import reppo_jax as rj

OBS, ACT, B, M = 5, 3, 32, 16
VMIN, VMAX = 0.0, 150.0


@pytest.fixture()
def setup():
    rngs = nnx.Rngs(0)
    actor = rj.Actor(OBS, ACT, 32, 0.1, rngs)
    critic = rj.Critic(OBS, ACT, 32, 51, VMIN, VMAX, rngs)
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    obs = jax.random.normal(keys[0], (B, OBS))
    action_noise = jax.random.normal(keys[1], (B, ACT))
    kl_noise = jax.random.normal(keys[2], (M, B, ACT))
    return actor, critic, obs, action_noise, kl_noise


def loss_and_grads(actor, critic, obs, old_mean, old_std, action_noise, kl_noise, log_alpha, log_beta, kl_bound=0.1):
    graph, params = nnx.split(actor)

    def objective(variables):
        p, la, lb = variables
        return rj.actor_loss(
            nnx.merge(graph, p),
            la,
            lb,
            critic,
            obs,
            old_mean,
            old_std,
            action_noise,
            kl_noise,
            kl_bound,
            -1.5,
            VMIN,
            VMAX,
        )

    (loss, info), grads = jax.value_and_grad(objective, has_aux=True)((params, log_alpha, log_beta))
    return loss, info, grads, graph, params


def test_outside_the_trust_region_the_actor_gradient_is_the_kl_gradient(setup):
    actor, critic, obs, action_noise, kl_noise = setup
    mean, std = actor(obs)
    old_mean, old_std = mean + 2.0, std * 0.5  # far away: every state's KL > bound
    log_beta = jnp.log(3.0)
    _, info, grads, graph, params = loss_and_grads(
        actor, critic, obs, old_mean, old_std, action_noise, kl_noise, jnp.log(0.05), log_beta
    )
    assert float(info["policy/kl_outside_frac"]) == 1.0

    def beta_kl(p):
        new_mean, new_std = nnx.merge(graph, p)(obs)
        return 3.0 * rj.policy_kl(old_mean, old_std, new_mean, new_std, kl_noise).mean()

    expected = jax.grad(beta_kl)(params)
    for got, want in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_inside_the_trust_region_the_actor_gradient_is_pathwise(setup):
    actor, critic, obs, action_noise, kl_noise = setup
    old_mean, old_std = actor(obs)  # pi_old = pi: KL = 0 < bound
    _, info, grads, graph, params = loss_and_grads(
        actor, critic, obs, old_mean, old_std, action_noise, kl_noise, jnp.log(0.05), jnp.log(3.0)
    )
    assert float(info["policy/kl_outside_frac"]) == 0.0

    def pathwise(p):
        mean, std = nnx.merge(graph, p)(obs)
        action, log_prob = rj.sample_tanh_normal(mean, std, action_noise)
        logits, _ = critic(obs, action)
        return (0.05 * log_prob - rj.q_value(logits, VMIN, VMAX)).mean()

    expected = jax.grad(pathwise)(params)
    for got, want in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    # the critic is only used: the loss takes no gradient with respect to it by construction


def test_the_trust_region_is_decided_per_state(setup):
    """IMPLEMENTATION DETAIL 8 on a batch with states on both sides of the bound: the loss is
    a mean over states, so its actor gradient is the size-weighted mix of the gradients of the
    inside states alone (pathwise) and of the outside ones alone (KL). A switch on the batch's
    mean KL would give all of them one kind."""
    actor, critic, obs, action_noise, kl_noise = setup
    mean, std = actor(obs)
    outside = jnp.arange(B) % 3 == 0  # 11 of 32 states
    old_mean = jnp.where(outside[:, None], mean + 2.0, mean)
    args = (jnp.log(0.05), jnp.log(3.0))
    _, info, grads, _, _ = loss_and_grads(actor, critic, obs, old_mean, std, action_noise, kl_noise, *args)
    assert float(info["policy/kl_outside_frac"]) == float(outside.mean())

    def subset_grads(rows):
        select = (obs[rows], old_mean[rows], std[rows], action_noise[rows], kl_noise[:, rows])
        return loss_and_grads(actor, critic, select[0], select[1], select[2], select[3], select[4], *args)[2][0]

    n_out = int(outside.sum())
    inside_grads, outside_grads = subset_grads(~outside), subset_grads(outside)
    for got, g_in, g_out in zip(*(jax.tree.leaves(g) for g in (grads[0], inside_grads, outside_grads))):
        np.testing.assert_allclose(got, ((B - n_out) * g_in + n_out * g_out) / B, rtol=1e-4, atol=1e-6)


def states_near_the_bound(mean, std, bound, key, num_samples):
    """pi_old (old_mean; old_std = std) and KL samples that put every even state's KL estimate
    at exactly 0.8 * bound and every odd one's at 1.2 * bound. Returns (old_mean, kl_noise, kl).

    With equal stds, log pi_old(a) - log pi(a) = d^2 / (2 std^2) + d eps / std per dimension at
    the sample u = old_mean + std eps, d the shift of the mean (the tanh Jacobians cancel at the
    same sample). Antithetic samples (each eps with its negation) average the eps term to zero,
    so a shift of std * sqrt(2 kl / A) in every dimension gives KL = kl. The samples are +-0.5
    std, so that none reaches the sample clip (|u| > 4.95), which would break the exactness."""
    kl = jnp.where(jnp.arange(mean.shape[0]) % 2 == 0, 0.8 * bound, 1.2 * bound)
    half = 0.5 * jax.random.rademacher(key, (num_samples // 2, *mean.shape), jnp.float32)
    old_mean = mean + std * jnp.sqrt(2.0 * kl[:, None] / mean.shape[-1])
    return old_mean, jnp.concatenate([half, -half]), kl


def test_the_trust_region_bound_is_on_each_states_kl_as_it_is(setup):
    """SPEC section 8 near the bound: states at 0.8 and 1.2 times kl_bound are inside and
    outside. A bound scaled by the action size, or applied per dimension, would put every state
    on one side; the far-away states of the tests above cannot tell."""
    actor, critic, obs, action_noise, _ = setup
    mean, std = actor(obs)  # here |mean| < 1.8 and std < 2.4, so no sample reaches the clip
    bound = 0.1
    old_mean, kl_noise, kl = states_near_the_bound(mean, std, bound, jax.random.PRNGKey(2), M)
    np.testing.assert_allclose(rj.policy_kl(old_mean, std, mean, std, kl_noise), kl, rtol=1e-3)
    args = (jnp.log(0.05), jnp.log(3.0))
    _, info, _, _, _ = loss_and_grads(actor, critic, obs, old_mean, std, action_noise, kl_noise, *args, kl_bound=bound)
    assert float(info["policy/kl_outside_frac"]) == 0.5


def test_temperature_falls_when_entropy_is_above_target_and_rises_below(setup):
    actor, critic, obs, action_noise, kl_noise = setup
    mean, std = actor(obs)
    for target, direction in [(-50.0, -1), (50.0, +1)]:
        graph, params = nnx.split(actor)

        def objective(la, graph=graph, params=params, target=target):
            loss, info = rj.actor_loss(
                nnx.merge(graph, params),
                la,
                jnp.log(1.0),
                critic,
                obs,
                mean,
                std,
                action_noise,
                kl_noise,
                0.1,
                target,
                VMIN,
                VMAX,
            )
            return loss

        log_alpha = jnp.log(0.1)
        grad = jax.grad(objective)(log_alpha)
        new_log_alpha = log_alpha - 0.1 * grad  # one SGD step
        assert direction * (float(new_log_alpha) - float(log_alpha)) > 0
        # Exactly the alpha loss's gradient, alpha * mean(-log pi - target): with sg(alpha)
        # missing from the policy term (all states are inside the region here, KL = 0), the
        # policy's own alpha * mean(log pi) would add to it.
        _, log_prob = rj.sample_tanh_normal(mean, std, action_noise)
        np.testing.assert_allclose(grad, 0.1 * jnp.mean(-log_prob - target), rtol=1e-5)


def test_kl_multiplier_rises_when_kl_exceeds_the_bound_and_falls_below(setup):
    actor, critic, obs, action_noise, kl_noise = setup
    mean, std = actor(obs)
    for old_mean, direction in [(mean + 2.0, +1), (mean, -1)]:
        _, info, grads, _, _ = loss_and_grads(
            actor, critic, obs, old_mean, std, action_noise, kl_noise, jnp.log(0.05), jnp.log(2.0)
        )
        step = -0.1 * grads[2]  # one SGD step on log_beta
        assert direction * float(step) > 0
        # Exactly the beta loss's gradient with respect to log_beta, -beta * (mean KL - bound).
        np.testing.assert_allclose(grads[2], -2.0 * (float(info["policy/kl"]) - 0.1), rtol=1e-5, atol=1e-7)


def test_critic_loss_is_cross_entropy_plus_masked_aux(setup):
    _, critic, obs, action_noise, _ = setup
    action = jnp.tanh(action_noise)
    target = jnp.linspace(1.0, 100.0, B)
    next_features = jax.random.normal(jax.random.PRNGKey(5), (B, 32))
    reward = jnp.linspace(0.0, 1.0, B)
    terminated = (jnp.arange(B) % 4 == 0).astype(jnp.float32)
    loss, info = rj.critic_loss(critic, obs, action, target, next_features, reward, terminated, VMIN, VMAX, 0.5)
    logits, features = critic(obs, action)
    probs = np.asarray(rj.hl_gauss(target, 51, VMIN, VMAX))
    ce = -(probs * np.asarray(jax.nn.log_softmax(logits))).sum(-1)
    r_hat, z_hat = critic.aux(features)
    aux = ((np.asarray(z_hat) - np.asarray(next_features)) ** 2).mean(-1) + (np.asarray(r_hat) - reward) ** 2
    aux = aux * (1 - np.asarray(terminated))
    np.testing.assert_allclose(loss, (ce + 0.5 * aux).mean(), rtol=1e-5)


@pytest.mark.parametrize("vmin, vmax", [(VMIN, VMAX), (-15.0, 15.0)])
def test_untrained_critic_predicts_about_zero(setup, vmin, vmax):
    """IMPLEMENTATION DETAIL 1: the 40 * hl_gauss(0) logit offset; 0, not vmin (-15, ManiSkill's)."""
    _, _, obs, action_noise, _ = setup
    critic = rj.Critic(OBS, ACT, 32, 51, vmin, vmax, nnx.Rngs(0))
    logits, _ = critic(obs, jnp.tanh(action_noise))
    q = np.asarray(rj.q_value(logits, vmin, vmax))
    # Measured: 4.8e-6 at [0, 150]; a 20 * hl_gauss(0) offset would leave ~0.03, no offset the middle, 75.
    assert np.abs(q).max() < 1e-3
