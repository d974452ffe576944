"""The auto-reset wrapper of reppo_jax.py: true final observations, terminated vs truncated."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reppo_jax as rj

# Compiling a wrapped MJX step costs seconds on a CPU, and running MJX un-jitted (one op at a
# time) costs tens of seconds per call, so the tests below share one wrapper shape (8 envs,
# episode length 4) and jitted functions (the wrapper's reset and step, and the un-wrapped env's
# vmapped reset and step that serve as references), compiled once per module.
NUM_ENVS, EPISODE_LENGTH = 8, 4


@pytest.fixture(scope="module")
def cartpole():
    return rj.make_env("CartpoleBalance", "jax", episode_length=1000)


@pytest.fixture(scope="module")
def wrapped(cartpole):
    return rj.AutoResetEnv(cartpole, NUM_ENVS, EPISODE_LENGTH)


@pytest.fixture(scope="module")
def step(wrapped):
    return jax.jit(wrapped.step)


@pytest.fixture(scope="module")
def reset(wrapped):
    return jax.jit(wrapped.reset, static_argnames="randomize_steps")


@pytest.fixture(scope="module")
def raw_step(cartpole):
    """N un-wrapped envs stepped side by side: the reference for the wrapper's outputs."""
    return jax.jit(jax.vmap(cartpole.step))


@pytest.fixture(scope="module")
def raw_reset(cartpole):
    return jax.jit(jax.vmap(cartpole.reset))


def test_time_limit_step_returns_the_true_final_observation(wrapped, reset, step, raw_step):
    state = reset(jax.random.PRNGKey(0), randomize_steps=False)
    action = jnp.full((NUM_ENVS, wrapped.action_size), 0.5)
    raw = state.physics  # the same start state, stepped without the wrapper
    episode_length = EPISODE_LENGTH
    for t in range(episode_length):
        state, result = step(state, action, jax.random.PRNGKey(100 + t))
        raw = raw_step(raw, action)
        np.testing.assert_allclose(result.final_obs, raw.obs, atol=1e-6)
        assert not result.terminated.any()
        np.testing.assert_array_equal(result.truncated, t == episode_length - 1)  # every env at once
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
    state = jax.jit(wrapped.reset, static_argnames="randomize_steps")(jax.random.PRNGKey(3), randomize_steps=True)
    counters = np.asarray(state.step_count)
    assert counters.min() >= 0 and counters.max() < 1000
    assert len(np.unique(counters)) > 200
    assert not np.asarray(state.from_reset).any()  # the first, shortened episodes are not logged


def assert_envs_equal(physics, where_true, where_false, mask):
    """Every leaf of ``physics`` equals ``where_true``'s where ``mask`` (N,), else ``where_false``'s."""
    leaves = zip(*(jax.tree.leaves(x) for x in (physics, where_true, where_false)), strict=True)
    for leaf, true_leaf, false_leaf in leaves:
        shaped = np.reshape(mask, (-1,) + (1,) * (np.ndim(leaf) - 1))
        np.testing.assert_allclose(leaf, np.where(shaped, true_leaf, false_leaf), atol=1e-6)


def test_finished_envs_restart_from_a_fresh_pool_and_the_others_carry_on(wrapped, reset, step, raw_step, raw_reset):
    """The pool starts empty, so the first step where envs finish makes N fresh episodes in
    one batched reset (keys split from the step key); the finished envs take their own
    slots, the others keep their state and their (still fresh) slots."""
    state = reset(jax.random.PRNGKey(5), randomize_steps=False)
    assert not np.asarray(state.pool_fresh).any()
    finishing = np.array([1, 1, 0, 1, 1, 0, 1, 1], bool)
    state = state._replace(step_count=jnp.where(finishing, EPISODE_LENGTH - 1, 0))
    action = jnp.full((NUM_ENVS, wrapped.action_size), -0.3)
    key = jax.random.PRNGKey(42)
    new_state, result = step(state, action, key)

    np.testing.assert_array_equal(result.truncated, finishing)
    stepped = raw_step(state.physics, action)
    fresh = raw_reset(jax.random.split(key, NUM_ENVS))
    np.testing.assert_allclose(result.next_obs, np.where(finishing[:, None], fresh.obs, stepped.obs), atol=1e-6)
    np.testing.assert_allclose(result.final_obs, stepped.obs, atol=1e-6)
    assert_envs_equal(new_state.physics, fresh, stepped, finishing)
    assert_envs_equal(new_state.reset_pool, fresh, fresh, finishing)
    np.testing.assert_array_equal(new_state.pool_fresh, ~finishing)
    np.testing.assert_array_equal(new_state.step_count, np.where(finishing, 0, 1))


def test_a_used_slot_remakes_the_pool_an_unused_one_does_not(wrapped, reset, step, raw_step, raw_reset):
    """An env that finishes with its slot unused takes it and leaves the pool alone; an env
    that finishes again (its slot used) has the whole pool remade first."""
    state = reset(jax.random.PRNGKey(6), randomize_steps=False)
    action = jnp.full((NUM_ENVS, wrapped.action_size), 0.2)
    first = np.array([1, 0, 0, 0, 0, 0, 0, 0], bool)
    state = state._replace(step_count=jnp.where(first, EPISODE_LENGTH - 1, 0))
    state, _ = step(state, action, jax.random.PRNGKey(7))  # fills the pool; env 0 takes slot 0
    pool = state.reset_pool

    second = np.array([0, 0, 1, 0, 0, 0, 0, 0], bool)  # env 2: its slot is unused
    state = state._replace(step_count=jnp.where(second, EPISODE_LENGTH - 1, 1))
    stepped = raw_step(state.physics, action)
    state, result = step(state, action, jax.random.PRNGKey(8))
    np.testing.assert_allclose(result.next_obs, np.where(second[:, None], pool.obs, stepped.obs), atol=1e-6)
    assert_envs_equal(state.reset_pool, pool, pool, second)  # the pool is unchanged
    np.testing.assert_array_equal(state.pool_fresh, ~(first | second))

    third = first  # env 0 again: its slot is used, so the pool is remade with this step's key
    state = state._replace(step_count=jnp.where(third, EPISODE_LENGTH - 1, 1))
    key = jax.random.PRNGKey(9)
    stepped = raw_step(state.physics, action)
    state, result = step(state, action, key)
    fresh = raw_reset(jax.random.split(key, NUM_ENVS))
    np.testing.assert_allclose(result.next_obs, np.where(third[:, None], fresh.obs, stepped.obs), atol=1e-6)
    assert not np.allclose(result.next_obs[0], pool.obs[0])
    np.testing.assert_array_equal(state.pool_fresh, ~third)


def test_pool_refill_under_vmap_only_for_the_seeds_that_need_it(wrapped):
    """refill_pool vmapped over seeds (as --num-seeds runs the wrapper): a seed with no
    finished env on a used slot keeps its pool exactly."""
    reset_seeds = jax.jit(jax.vmap(lambda k: wrapped.reset(k, randomize_steps=False)))
    states = reset_seeds(jax.random.split(jax.random.PRNGKey(10), 2))
    done = jnp.array([[True] + [False] * (NUM_ENVS - 1), [False] * NUM_ENVS])
    keys = jax.random.split(jax.random.PRNGKey(11), 2)
    pool, fresh = jax.jit(jax.vmap(wrapped.refill_pool))(states.reset_pool, states.pool_fresh, done, keys)
    np.testing.assert_array_equal(fresh, [[True] * NUM_ENVS, [False] * NUM_ENVS])
    for new, old in zip(jax.tree.leaves(pool), jax.tree.leaves(states.reset_pool), strict=True):
        np.testing.assert_array_equal(new[1], old[1])
    assert not np.allclose(pool.obs[0], states.reset_pool.obs[0])


def test_evaluation_steps_do_not_reset(wrapped, reset):
    state = reset(jax.random.PRNGKey(0), randomize_steps=False)
    state = state._replace(step_count=jnp.full(NUM_ENVS, EPISODE_LENGTH - 1))  # all at the time limit
    action = jnp.zeros((NUM_ENVS, wrapped.action_size))
    step = jax.jit(wrapped.step, static_argnames="auto_reset")
    _, result = step(state, action, jax.random.PRNGKey(1), auto_reset=False)
    assert result.truncated.all()
    np.testing.assert_array_equal(result.next_obs, result.final_obs)


def test_mujoco_warp_steps_through_the_wrapper_as_mjx_does(reset, step):
    """--impl warp: MuJoCo Warp's state holds batch-wide contact buffers (leaves without the
    env axis), which the wrapper keeps from the step. Over three episodes with resets from the
    pool, the wrapper gives the same outputs as with MJX (CartpoleBalance; measured: equal, and
    within 7e-5 on CheetahRun, whose contacts are not empty)."""
    warp = rj.AutoResetEnv(rj.make_env("CartpoleBalance", "warp", episode_length=1000), NUM_ENVS, EPISODE_LENGTH)
    warp_reset, warp_step = jax.jit(warp.reset, static_argnames="randomize_steps"), jax.jit(warp.step)
    mjx_state = reset(jax.random.PRNGKey(3), randomize_steps=True)
    warp_state = warp_reset(jax.random.PRNGKey(3), randomize_steps=True)
    ended = 0
    for t in range(3 * EPISODE_LENGTH):
        action = jnp.sin(jnp.arange(NUM_ENVS, dtype=jnp.float32)[:, None] + t)
        mjx_state, mjx_result = step(mjx_state, action, jax.random.PRNGKey(100 + t))
        warp_state, warp_result = warp_step(warp_state, action, jax.random.PRNGKey(100 + t))
        for name, value in mjx_result._asdict().items():
            np.testing.assert_allclose(getattr(warp_result, name), value, rtol=1e-5, atol=1e-5, err_msg=name)
        ended += int(np.asarray(warp_result.truncated).sum())
    assert ended == 3 * NUM_ENVS  # every env ended (and restarted) three times
    # MuJoCo Warp did step: its state has leaves without the env axis, MJX's has none.
    assert without_env_axis(warp_state.physics, NUM_ENVS) and not without_env_axis(mjx_state.physics, NUM_ENVS)


def without_env_axis(physics, num_envs: int) -> list:
    """The shapes of a batched physics state's leaves that lack the leading env axis."""
    return [leaf.shape for leaf in jax.tree.leaves(physics) if leaf.ndim == 0 or leaf.shape[0] != num_envs]


def test_a_leaf_without_the_env_axis_is_taken_from_the_stepped_state():
    """_where_env(done, pool, stepped): per-env leaves (N, ...) mix the two by ``done``; a leaf
    without the env axis (MuJoCo Warp's contact buffers, refilled at every step) is the
    stepped one, as in MJX's own Data.where."""
    done = jnp.array([True, False, True, False])
    pool, stepped = jnp.ones((4, 2)), jnp.zeros((4, 2))
    np.testing.assert_array_equal(rj._where_env(done, pool, stepped), [[1, 1], [0, 0], [1, 1], [0, 0]])
    contacts_pool, contacts_stepped = jnp.ones((7, 3)), jnp.zeros((7, 3))
    np.testing.assert_array_equal(rj._where_env(done, contacts_pool, contacts_stepped), contacts_stepped)
