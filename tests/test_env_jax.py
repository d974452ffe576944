"""The auto-reset wrapper of reppo_jax.py: true final observations, terminated vs truncated."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reppo_jax as rj


@pytest.fixture(scope="module")
def cartpole():
    return rj.make_env("CartpoleBalance", "jax", episode_length=1000)


def test_time_limit_step_returns_the_true_final_observation(cartpole):
    episode_length, num_envs = 5, 3
    wrapped = rj.AutoResetEnv(cartpole, num_envs, episode_length)
    state = wrapped.reset(jax.random.PRNGKey(0), randomize_steps=False)
    action = jnp.full((num_envs, wrapped.action_size), 0.5)
    raw = state.physics  # the same start state, stepped without the wrapper
    step = jax.jit(wrapped.step)
    for t in range(episode_length):
        state, result = step(state, action, jax.random.PRNGKey(100 + t))
        raw = jax.vmap(cartpole.step)(raw, action)
        np.testing.assert_allclose(result.final_obs, raw.obs, atol=1e-6)
        assert not result.terminated.any()
        assert bool(result.truncated.all()) == (t == episode_length - 1)
    # After the time limit: the policy continues from a fresh episode's first observation,
    # which differs from the final observation that was handed back for bootstrapping.
    assert not np.allclose(result.next_obs, result.final_obs)
    np.testing.assert_array_equal(state.step_count, 0)
    assert result.episode_done.all()  # complete episodes that started from a reset
    np.testing.assert_array_equal(result.episode_length, episode_length)


class CountdownEnv:
    """A tiny pure-JAX env: obs = a counter that starts at 3 and falls by one per step;
    the episode terminates (a real terminal state) when it reaches 0."""

    observation_size = 1
    action_size = 1

    def reset(self, key):
        return countdown_state(3.0)

    def step(self, state, action):
        counter = state.obs[0] - 1.0
        return countdown_state(counter, reward=1.0, done=(counter <= 0).astype(jnp.float32))


def countdown_state(counter, reward=0.0, done=0.0):
    from mujoco_playground._src.mjx_env import State

    obs = jnp.array([counter], jnp.float32)
    return State(data=jnp.zeros(()), obs=obs, reward=jnp.float32(reward), done=jnp.float32(done), metrics={}, info={})


@pytest.mark.parametrize(
    "episode_length, expected",
    [
        # (final_obs, next_obs, terminated, truncated) for steps 1, 2, 3
        (5, [(2, 2, False, False), (1, 1, False, False), (0, 3, True, False)]),  # terminal
        (2, [(2, 2, False, False), (1, 3, False, True), (2, 2, False, False)]),  # time limit
        (3, [(2, 2, False, False), (1, 1, False, False), (0, 3, True, False)]),  # both: terminal wins
    ],
)
def test_terminated_and_truncated_are_separate(episode_length, expected):
    wrapped = rj.AutoResetEnv(CountdownEnv(), num_envs=2, episode_length=episode_length)
    state = wrapped.reset(jax.random.PRNGKey(1), randomize_steps=False)
    step = jax.jit(wrapped.step)
    for t, (final_obs, next_obs, terminated, truncated) in enumerate(expected):
        state, result = step(state, jnp.zeros((2, 1)), jax.random.PRNGKey(t))
        np.testing.assert_array_equal(result.final_obs[:, 0], final_obs)
        np.testing.assert_array_equal(result.next_obs[:, 0], next_obs)
        np.testing.assert_array_equal(state.obs[:, 0], next_obs)
        np.testing.assert_array_equal(result.terminated, terminated)
        np.testing.assert_array_equal(result.truncated, truncated)
        np.testing.assert_array_equal(result.episode_done, terminated or truncated)
        if terminated or truncated:
            np.testing.assert_array_equal(result.episode_length, t + 1)
            np.testing.assert_array_equal(result.episode_return, t + 1)


def test_random_initial_step_counters_spread_resets(cartpole):
    wrapped = rj.AutoResetEnv(cartpole, 256, 1000)
    state = wrapped.reset(jax.random.PRNGKey(3), randomize_steps=True)
    counters = np.asarray(state.step_count)
    assert counters.min() >= 0 and counters.max() < 1000
    assert len(np.unique(counters)) > 200
    assert not np.asarray(state.from_reset).any()  # the first, shortened episodes are not logged


def test_only_finished_envs_are_reset_even_more_than_one_chunk(cartpole):
    # 8 envs, episode length 4 -> the wrapper resets up to ceil(2 * 8 / 4) = 4 envs per
    # loop pass; 6 envs finish on this step, so the loop must run twice.
    num_envs, episode_length = 8, 4
    wrapped = rj.AutoResetEnv(cartpole, num_envs, episode_length)
    state = wrapped.reset(jax.random.PRNGKey(5), randomize_steps=False)
    finishing = np.array([1, 1, 0, 1, 1, 0, 1, 1], bool)
    state = state._replace(step_count=jnp.where(finishing, episode_length - 1, 0))
    action = jnp.full((num_envs, wrapped.action_size), -0.3)
    key = jax.random.PRNGKey(42)
    new_state, result = jax.jit(wrapped.step)(state, action, key)

    np.testing.assert_array_equal(result.truncated, finishing)
    stepped = jax.vmap(cartpole.step)(state.physics, action)
    fresh = jax.vmap(cartpole.reset)(jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(num_envs)))
    expected = np.where(finishing[:, None], fresh.obs, stepped.obs)
    np.testing.assert_allclose(result.next_obs, expected, atol=1e-6)
    np.testing.assert_allclose(result.final_obs, stepped.obs, atol=1e-6)
    for new, old_stepped, old_fresh in zip(
        jax.tree.leaves(new_state.physics), jax.tree.leaves(stepped), jax.tree.leaves(fresh), strict=True
    ):
        mask = finishing.reshape((-1,) + (1,) * (np.ndim(new) - 1))
        np.testing.assert_allclose(new, np.where(mask, old_fresh, old_stepped), atol=1e-6)
    np.testing.assert_array_equal(new_state.step_count, np.where(finishing, 0, 1))


def test_evaluation_steps_do_not_reset(cartpole):
    wrapped = rj.AutoResetEnv(cartpole, 2, 1)
    state = wrapped.reset(jax.random.PRNGKey(0), randomize_steps=False)
    action = jnp.zeros((2, wrapped.action_size))
    step = jax.jit(wrapped.step, static_argnames="auto_reset")
    _, result = step(state, action, jax.random.PRNGKey(1), auto_reset=False)
    assert result.truncated.all()
    np.testing.assert_array_equal(result.next_obs, result.final_obs)
