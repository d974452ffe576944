"""The learning phase of reppo_jax.py's iteration (SPEC sections 3 and 8): every actor loss
of one iteration sees pi_old as the policy that collected the batch (not the actor being
trained), and every critic loss the same targets in every epoch (computed once per iteration).

The iteration is one jitted function, so the losses' inputs are sent back to Python with
ordered host callbacks; the twin of tests/test_loop_torch.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import reppo_jax as rj


def test_pi_old_and_the_targets_stay_fixed_for_the_whole_learning_phase(monkeypatch):
    args = rj.resolve_args(rj.parse_args(["--env-id", "CartpoleBalance", "--preset", "cpu"]))
    args = dataclasses.replace(args, num_envs=4, num_steps=8, num_mini_batches=2, num_epochs=3)
    args = dataclasses.replace(args, actor_hidden=32, critic_hidden=32, episode_length=50)
    env = rj.make_env(args.env_id, args.impl, args.episode_length)
    agent = rj.make_agent(args, env)
    state = jax.jit(agent.init)(jax.random.PRNGKey(0))
    state, _ = jax.jit(agent.train_chunk, static_argnums=1)(state, 1)  # a trained actor, a moved normaliser

    actor_inputs, targets = [], []
    real_actor_loss, real_critic_loss = rj.actor_loss, rj.critic_loss

    def recording_actor_loss(actor, log_alpha, log_beta, critic, obs, old_mean, old_std, *rest):
        record = lambda *xs: actor_inputs.append([np.asarray(x) for x in xs])  # noqa: E731
        jax.debug.callback(record, obs, old_mean, old_std, ordered=True)
        return real_actor_loss(actor, log_alpha, log_beta, critic, obs, old_mean, old_std, *rest)

    def recording_critic_loss(critic, obs, action, target_return, *rest):
        jax.debug.callback(lambda x: targets.append(np.asarray(x)), target_return, ordered=True)
        return real_critic_loss(critic, obs, action, target_return, *rest)

    # The agent's functions look the losses up when they are traced; JAX keeps the traces of
    # the agent above, so a second agent of the same configuration is traced with the patch.
    monkeypatch.setattr(rj, "actor_loss", recording_actor_loss)
    monkeypatch.setattr(rj, "critic_loss", recording_critic_loss)
    new_state, _ = jax.jit(rj.make_agent(args, env).train_chunk, static_argnums=1)(state, 1)
    jax.effects_barrier()

    # jax.grad traces each loss once per update, so every update records exactly once.
    assert len(actor_inputs) == len(targets) == args.num_epochs * args.num_mini_batches
    graph = nnx.graphdef(rj._build_networks(args, env.observation_size, env.action_size, nnx.Rngs(0))[0])
    collecting_actor, trained_actor = nnx.merge(graph, state.actor), nnx.merge(graph, new_state.actor)
    for obs, old_mean, old_std in actor_inputs:  # the first update's and the last one's alike
        mean, std = collecting_actor(obs)
        np.testing.assert_allclose(old_mean, mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(old_std, std, rtol=1e-5, atol=1e-6)
    obs, old_mean, _ = actor_inputs[-1]
    assert np.abs(trained_actor(obs)[0] - old_mean).max() > 1e-4  # the actor did move meanwhile
    # Each epoch is a permutation of the same batch with the same targets.
    n = args.num_mini_batches
    per_epoch = [np.concatenate(targets[e * n : (e + 1) * n]) for e in range(args.num_epochs)]
    for epoch in per_epoch[1:]:
        assert not np.array_equal(epoch, per_epoch[0])  # another order...
        np.testing.assert_array_equal(np.sort(epoch), np.sort(per_epoch[0]))  # ...same values


class CountdownEnv:
    """A tiny pure-JAX env: the observation is (counter, action); the counter starts at 2 or
    4 and falls by one per step; the episode terminates (a real terminal state) at 0. With
    episode_length 3, episodes from 2 terminate and episodes from 4 are truncated."""

    observation_size = 2
    action_size = 1

    def reset(self, key):
        counter = 2.0 + 2.0 * jax.random.bernoulli(key).astype(jnp.float32)
        return countdown_state(counter, 0.0)

    def step(self, state, action):
        counter = state.obs[0] - 1.0
        return countdown_state(counter, action[0], reward=1.0 + action[0], done=(counter <= 0).astype(jnp.float32))


def countdown_state(counter, action, reward=0.0, done=0.0):
    from mujoco_playground._src.mjx_env import State

    obs = jnp.stack([counter, action]).astype(jnp.float32)
    return State(data=jnp.zeros(()), obs=obs, reward=jnp.float32(reward), done=jnp.float32(done), metrics={}, info={})


def sorted_rows(x: np.ndarray) -> np.ndarray:
    """The rows of a (B, O) array in lexicographic order (a batch's content, whatever its order)."""
    return x[np.lexsort(x.T[::-1])]


def test_collection_bootstraps_from_the_true_final_observation_and_keeps_its_normalisation(monkeypatch):
    """The wiring around the math (SPEC sections 3 and 6), on a countdown env where the state
    an episode ends in (final_obs) differs from the next episode's first one (next_obs) and
    both kinds of episode end occur: each step's bootstrap gets final_obs, its reward and
    terminated flag; the lambda-returns get terminated and truncated each in its place; the
    learner sees the observations normalised with the statistics of the collection, not the
    ones updated after it. The twin of the test of the same name in tests/test_loop_torch.py."""
    args = rj.resolve_args(rj.parse_args(["--env-id", "CartpoleBalance", "--preset", "cpu"]))
    args = dataclasses.replace(args, num_envs=4, num_steps=8, num_mini_batches=2, num_epochs=1)
    args = dataclasses.replace(args, actor_hidden=32, critic_hidden=32, episode_length=3)
    env = CountdownEnv()
    state = jax.jit(rj.make_agent(args, env).init)(jax.random.PRNGKey(0))
    state, _ = jax.jit(rj.make_agent(args, env).train_chunk, static_argnums=1)(state, 1)  # a moved normaliser

    steps, bootstraps, returns_inputs, critic_obs = [], [], [], []
    real_step, real_bootstrap, real_returns = rj.AutoResetEnv.step, rj.bootstrap, rj.soft_lambda_returns
    real_critic_loss = rj.critic_loss

    def record(store):
        return lambda *xs: store.append([np.asarray(x) for x in xs])

    def recording_step(self, env_state, action, key, auto_reset=True):
        env_state, result = real_step(self, env_state, action, key, auto_reset)
        fields = (result.final_obs, result.next_obs, result.reward, result.terminated, result.truncated)
        jax.debug.callback(record(steps), *fields, ordered=True)
        return env_state, result

    def recording_bootstrap(actor, critic, alpha, normalizer, final_obs, reward, terminated, *rest):
        jax.debug.callback(record(bootstraps), final_obs, reward, terminated, ordered=True)
        return real_bootstrap(actor, critic, alpha, normalizer, final_obs, reward, terminated, *rest)

    def recording_returns(soft_reward, next_value, terminated, truncated, *rest):
        jax.debug.callback(record(returns_inputs), terminated, truncated, ordered=True)
        return real_returns(soft_reward, next_value, terminated, truncated, *rest)

    def recording_critic_loss(critic, obs, *rest):
        jax.debug.callback(lambda x: critic_obs.append(np.asarray(x)), obs, ordered=True)
        return real_critic_loss(critic, obs, *rest)

    monkeypatch.setattr(rj.AutoResetEnv, "step", recording_step)
    monkeypatch.setattr(rj, "bootstrap", recording_bootstrap)
    monkeypatch.setattr(rj, "soft_lambda_returns", recording_returns)
    monkeypatch.setattr(rj, "critic_loss", recording_critic_loss)
    new_state, _ = jax.jit(rj.make_agent(args, env).train_chunk, static_argnums=1)(state, 1)
    jax.effects_barrier()

    assert len(steps) == len(bootstraps) == args.num_steps and len(returns_inputs) == 1
    assert any(not np.array_equal(final_obs, next_obs) for final_obs, next_obs, *_ in steps)
    for (final_obs, _, reward, terminated, _), bootstrapped in zip(steps, bootstraps):
        for expected, got in zip((final_obs, reward, terminated), bootstrapped):
            np.testing.assert_array_equal(got, expected)
    terminated, truncated = returns_inputs[0]
    assert terminated.sum() > 0 and truncated.sum() > 0  # both kinds of episode end occur
    np.testing.assert_array_equal(terminated, np.stack([s[3] for s in steps]))
    np.testing.assert_array_equal(truncated, np.stack([s[4] for s in steps]))
    # s_t: the first observation, then each step's next_obs; normalised as during collection.
    raw_obs = np.concatenate([np.asarray(state.env.obs)] + [s[1] for s in steps[:-1]])  # (T N, O), t-major
    collected = np.asarray(rj.normalize(state.normalizer, raw_obs))
    assert not np.allclose(collected, rj.normalize(new_state.normalizer, raw_obs))
    first_epoch = np.concatenate(critic_obs[: args.num_mini_batches])
    np.testing.assert_allclose(sorted_rows(first_epoch), sorted_rows(collected), rtol=1e-6, atol=1e-6)
