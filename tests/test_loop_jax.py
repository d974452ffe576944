"""The iteration of reppo_jax.py around the math (SPEC sections 3, 6, 8 and 9): every actor
loss of one iteration sees pi_old as the policy that collected the batch (not the actor being
trained), and every critic loss the same targets in every epoch (computed once per iteration);
collection's bootstraps (against a float64 reference) feed the targets; the optimisers, the
clipping and the entropy target are SPEC section 9's.

The iteration is one jitted function, so the losses' inputs are sent back to Python with
ordered host callbacks; the twin of tests/test_loop_torch.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import reppo_jax as rj


def test_pi_old_and_the_targets_stay_fixed_for_the_whole_learning_phase(monkeypatch):
    """Also the losses' other inputs (SPEC section 8): each actor loss gets kl_bound, M =
    num_kl_samples KL samples, an actor with the std floor min_std and the critic just updated
    on the same minibatch, each critic loss aux_coef, vmin and vmax both; collection draws K =
    num_value_samples value samples and executes actions clipped to +-0.999 (SPEC section 6;
    min_std 2.5 makes |u| > atanh(0.999) ~= 3.8 frequent)."""
    args = rj.resolve_args(rj.parse_args(["--env-id", "CartpoleBalance", "--preset", "cpu"]))
    args = dataclasses.replace(args, num_envs=4, num_steps=8, num_mini_batches=2, num_epochs=3)
    args = dataclasses.replace(args, kl_bound=0.07, aux_coef=0.3, vmin=-2.0, vmax=140.0)  # none equal to another
    args = dataclasses.replace(args, num_value_samples=3, num_kl_samples=5, min_std=2.5)
    args = dataclasses.replace(args, actor_hidden=32, critic_hidden=32, episode_length=50)
    env = rj.make_env(args.env_id, args.impl, args.episode_length)
    agent = rj.make_agent(args, env)
    state = jax.jit(agent.init)(jax.random.PRNGKey(0))
    state, _ = jax.jit(agent.train_chunk, static_argnums=1)(state, 1)  # a trained actor, a moved normaliser

    actor_inputs, targets, critics, constants, actions = [], [], [], set(), []
    real_actor_loss, real_critic_loss = rj.actor_loss, rj.critic_loss
    real_bootstrap, real_step = rj.bootstrap, rj.AutoResetEnv.step

    def record_critic(caller, critic):  # every critic parameter, flattened, and who got it
        flat = jnp.concatenate([leaf.ravel() for leaf in jax.tree.leaves(nnx.state(critic, nnx.Param))])
        jax.debug.callback(lambda x: critics.append((caller, np.asarray(x))), flat, ordered=True)

    def recording_actor_loss(actor, log_alpha, log_beta, critic, obs, old_mean, old_std, *rest):
        record = lambda *xs: actor_inputs.append([np.asarray(x) for x in xs])  # noqa: E731
        jax.debug.callback(record, obs, old_mean, old_std, ordered=True)
        record_critic("actor", critic)
        # kl_bound, vmin, vmax (Python floats at trace time), M, the std floor
        constants.add(("actor", rest[2], *rest[4:], rest[1].shape[0], actor.min_std))
        return real_actor_loss(actor, log_alpha, log_beta, critic, obs, old_mean, old_std, *rest)

    def recording_bootstrap(actor, critic, alpha, normalizer, final_obs, reward, terminated, noise, *rest):
        constants.add(("bootstrap", noise.shape[0]))  # K
        return real_bootstrap(actor, critic, alpha, normalizer, final_obs, reward, terminated, noise, *rest)

    def recording_step(self, env_state, action, key, auto_reset=True):
        jax.debug.callback(lambda a: actions.append(np.asarray(a)), action, ordered=True)
        return real_step(self, env_state, action, key, auto_reset)

    def recording_critic_loss(critic, obs, action, target_return, *rest):
        jax.debug.callback(lambda x: targets.append(np.asarray(x)), target_return, ordered=True)
        record_critic("critic", critic)
        constants.add(("critic", *rest[3:]))  # vmin, vmax, aux_coef
        return real_critic_loss(critic, obs, action, target_return, *rest)

    # The agent's functions look the losses up when they are traced; JAX keeps the traces of
    # the agent above, so a second agent of the same configuration is traced with the patch.
    monkeypatch.setattr(rj, "actor_loss", recording_actor_loss)
    monkeypatch.setattr(rj, "critic_loss", recording_critic_loss)
    monkeypatch.setattr(rj, "bootstrap", recording_bootstrap)
    monkeypatch.setattr(rj.AutoResetEnv, "step", recording_step)
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
    # The iteration hands the next one a fresh key: its actions, value samples, minibatch
    # permutations and loss noise are not this iteration's again.
    assert not np.array_equal(np.asarray(new_state.key), np.asarray(state.key))
    assert constants == {("actor", 0.07, -2.0, 140.0, 5, 2.5), ("critic", -2.0, 140.0, 0.3), ("bootstrap", 3)}
    actions = np.abs(np.stack(actions))
    assert len(actions) == args.num_steps and actions.max() == np.float32(0.999)  # some were clipped
    # Update k: the critic loss gets critic k, the actor loss critic k + 1 (just updated),
    # which the next update's critic loss gets too.
    assert [caller for caller, _ in critics] == ["critic", "actor"] * len(targets)
    for k in range(len(targets)):
        assert not np.array_equal(critics[2 * k][1], critics[2 * k + 1][1])
        if k + 1 < len(targets):
            np.testing.assert_array_equal(critics[2 * k + 1][1], critics[2 * k + 2][1])
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

    def recording_bootstrap(actor, critic, alpha, normalizer, final_obs, reward, terminated, noise, gamma, *rest):
        out = real_bootstrap(actor, critic, alpha, normalizer, final_obs, reward, terminated, noise, gamma, *rest)
        jax.debug.callback(record(bootstraps), final_obs, reward, terminated, alpha, gamma, *out[:2], ordered=True)
        return out

    def recording_returns(soft_reward, next_value, terminated, truncated, gamma, lmbda):
        jax.debug.callback(record(returns_inputs), terminated, truncated, soft_reward, next_value, ordered=True)
        returns_inputs.append((gamma, lmbda))  # Python floats, seen at trace time
        return real_returns(soft_reward, next_value, terminated, truncated, gamma, lmbda)

    def recording_critic_loss(critic, obs, *rest):  # rest[3:5]: the aux head's reward and terminated
        row = lambda *xs: np.concatenate([np.asarray(x).reshape(len(obs), -1) for x in xs], 1)  # noqa: E731
        jax.debug.callback(lambda *xs: critic_obs.append(row(*xs)), obs, rest[3], rest[4], ordered=True)
        return real_critic_loss(critic, obs, *rest)

    monkeypatch.setattr(rj.AutoResetEnv, "step", recording_step)
    monkeypatch.setattr(rj, "bootstrap", recording_bootstrap)
    monkeypatch.setattr(rj, "soft_lambda_returns", recording_returns)
    monkeypatch.setattr(rj, "critic_loss", recording_critic_loss)
    new_state, _ = jax.jit(rj.make_agent(args, env).train_chunk, static_argnums=1)(state, 1)
    jax.effects_barrier()

    assert len(steps) == len(bootstraps) == args.num_steps and len(returns_inputs) == 2
    assert any(not np.array_equal(final_obs, next_obs) for final_obs, next_obs, *_ in steps)
    alpha_at_collection = np.exp(np.asarray(state.log_alpha))  # the learning phase then changes it
    for (final_obs, _, reward, terminated, _), bootstrapped in zip(steps, bootstraps):
        for expected, got in zip((final_obs, reward, terminated), bootstrapped):
            np.testing.assert_array_equal(got, expected)
        np.testing.assert_allclose(bootstrapped[3], alpha_at_collection, rtol=1e-6)
        assert float(bootstrapped[4]) == np.float32(args.gamma)
    (gamma, lmbda), (terminated, truncated, soft_reward, next_value) = returns_inputs  # trace, then run
    assert terminated.sum() > 0 and truncated.sum() > 0  # both kinds of episode end occur
    np.testing.assert_array_equal(terminated, np.stack([s[3] for s in steps]))
    np.testing.assert_array_equal(truncated, np.stack([s[4] for s in steps]))
    # The targets are built from the bootstraps' soft rewards and values, with gamma and lambda.
    np.testing.assert_array_equal(soft_reward, np.stack([b[5] for b in bootstraps]))
    np.testing.assert_array_equal(next_value, np.stack([b[6] for b in bootstraps]))
    assert not np.array_equal(soft_reward, np.stack([s[2] for s in steps]))  # the entropy term is there
    assert (gamma, lmbda) == (args.gamma, args.lmbda) and gamma != lmbda
    # s_t: the first observation, then each step's next_obs; normalised as during collection.
    raw_obs = np.concatenate([np.asarray(state.env.obs)] + [s[1] for s in steps[:-1]])  # (T N, O), t-major
    collected = np.asarray(rj.normalize(state.normalizer, raw_obs))
    assert not np.allclose(collected, rj.normalize(new_state.normalizer, raw_obs))
    # With each s_t the critic loss gets the env's reward r_t (not the soft reward) and
    # terminated_t (not truncated_t), t-major as raw_obs.
    env_reward = np.concatenate([s[2] for s in steps])[:, None]
    env_terminated = np.concatenate([s[3] for s in steps])[:, None]
    first_epoch = np.concatenate(critic_obs[: args.num_mini_batches])
    collected = np.concatenate([collected, env_reward, env_terminated], 1)
    np.testing.assert_allclose(sorted_rows(first_epoch), sorted_rows(collected), rtol=1e-6, atol=1e-6)


def test_the_training_episodes_that_ended_are_counted_and_summed(monkeypatch):
    """charts/episodes, charts/episode_return_sum and charts/episode_length_sum of each
    iteration: the number of complete episodes (begun from a reset) that ended in it and the
    sums of their returns and lengths, computed here from every step's reward and ends; a log
    row then divides the sums by the number over its iterations. On CountdownEnv the episodes'
    returns differ (the reward follows the action) and so do their lengths (2 when terminated,
    3 when truncated), so a max, a mean or the last episode's return would not give these."""
    args = rj.resolve_args(rj.parse_args(["--env-id", "CartpoleBalance", "--preset", "cpu"]))
    args = dataclasses.replace(args, num_envs=4, num_steps=8, num_mini_batches=2, num_epochs=1)
    args = dataclasses.replace(args, actor_hidden=32, critic_hidden=32, episode_length=3)
    steps, real_step = [], rj.AutoResetEnv.step

    def recording_step(self, env_state, action, key, auto_reset=True):
        env_state, result = real_step(self, env_state, action, key, auto_reset)
        record = lambda *xs: steps.append([np.asarray(x, np.float64) for x in xs])  # noqa: E731
        jax.debug.callback(record, result.reward, result.terminated, result.truncated, ordered=True)
        return env_state, result

    monkeypatch.setattr(rj.AutoResetEnv, "step", recording_step)
    agent = rj.make_agent(args, CountdownEnv())
    iterations = 3
    _, metrics = jax.jit(agent.train_chunk, static_argnums=1)(jax.jit(agent.init)(jax.random.PRNGKey(0)), iterations)
    jax.effects_barrier()
    reward, terminated, truncated = (np.stack(x) for x in zip(*steps))  # (iterations * T, N)
    # Each env's first episode began part-way (random step counters): not complete, not counted.
    counted = np.zeros((3, iterations))  # episodes, return sum, length sum per iteration
    returns = []
    for env in range(args.num_envs):
        begun, total, length = False, 0.0, 0
        for t in range(len(reward)):
            total, length = total + reward[t, env], length + 1
            if terminated[t, env] or truncated[t, env]:
                if begun:
                    counted[:, t // args.num_steps] += (1, total, length)
                    returns.append(total)
                begun, total, length = True, 0.0, 0
    assert len(set(np.round(returns, 4))) > 2 and terminated.sum() > 0 and truncated.sum() > 0
    names = ("charts/episodes", "charts/episode_return_sum", "charts/episode_length_sum")
    for name, expected in zip(names, counted):
        np.testing.assert_allclose(np.asarray(metrics[name], np.float64), expected, rtol=1e-5, err_msg=name)
    row = rj._train_row({name: np.asarray(value)[None] for name, value in metrics.items()}, 0, 0.0)
    np.testing.assert_allclose(row["charts/episodic_return"], counted[1].sum() / counted[0].sum(), rtol=1e-5)
    np.testing.assert_allclose(row["charts/episodic_length"], counted[2].sum() / counted[0].sum(), rtol=1e-5)


def test_bootstrap_matches_a_float64_reference():
    """SPEC section 6, against a naive float64 computation: the TRUE next state is normalised
    with the collection's statistics, v' = mean_k Q(s', a'_k) with Q the categorical mean, and
    r~ = r - (1 - terminated) gamma alpha mean_k log pi(a'_k|s'), with log pi written as
    log N(u; mean, std) - log(1 - tanh(u)^2); z' = features(s', a'_1). The twin of the test of
    the same name in tests/test_loop_torch.py."""
    rngs = nnx.Rngs(0)
    actor, critic = rj.Actor(5, 3, 32, 0.1, rngs), rj.Critic(5, 3, 32, 51, 0.0, 150.0, rngs)
    rng = np.random.default_rng(1)
    normalizer = rj.normalizer_update(rj.normalizer_init(5), jnp.asarray(rng.normal(size=(64, 5)) * 3 + 1, jnp.float32))
    final_obs = jnp.asarray(rng.normal(size=(6, 5)) * 3 + 1, jnp.float32)
    reward = jnp.asarray(rng.uniform(size=6), jnp.float32)
    terminated = jnp.array([0.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    noise = jnp.asarray(rng.normal(size=(4, 6, 3)), jnp.float32)  # K = 4 value samples
    soft_reward, next_value, next_features = rj.bootstrap(
        actor, critic, jnp.float32(0.3), normalizer, final_obs, reward, terminated, noise, 0.9, 0.0, 150.0
    )
    obs = (np.asarray(final_obs, np.float64) - np.asarray(normalizer.mean)) / np.sqrt(np.asarray(normalizer.var) + 1e-2)
    mean, std = (np.asarray(x, np.float64) for x in actor(jnp.asarray(obs, jnp.float32)))
    u = mean + std * np.asarray(noise, np.float64)  # (K, N, A)
    log_normal = -0.5 * ((u - mean) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi)
    log_pi = (log_normal - np.log(1 - np.tanh(u) ** 2)).sum(-1)  # (K, N)
    next_obs = jnp.broadcast_to(jnp.asarray(obs, jnp.float32), (4, 6, 5))
    logits, features = critic(next_obs, jnp.asarray(np.tanh(u), jnp.float32))
    logits = np.asarray(logits, np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    q = (probs / probs.sum(-1, keepdims=True) * np.linspace(0.0, 150.0, 51)).sum(-1)  # (K, N)
    np.testing.assert_allclose(next_value, q.mean(0), rtol=1e-5, atol=1e-4)
    expected = np.asarray(reward, np.float64) - (1 - np.asarray(terminated)) * 0.9 * 0.3 * log_pi.mean(0)
    np.testing.assert_allclose(soft_reward, expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(soft_reward, reward)  # the entropy term is not negligible here
    np.testing.assert_allclose(next_features, features[0], rtol=1e-6, atol=1e-6)


def test_the_optimisers_and_the_entropy_target_are_spec_9s(monkeypatch):
    """SPEC section 9: Adam (lr, optax's default betas and eps) after global-norm clipping to
    max_grad_norm, one chain per network; the actor's also holds log_alpha and log_beta (one
    clipping over all three); the entropy target is -ent_target_mult * action_size; alpha and
    beta start at ent_start and kl_start. The twin of the test of the same name in
    tests/test_loop_torch.py."""
    args = rj.resolve_args(rj.parse_args(["--env-id", "CartpoleBalance", "--preset", "cpu"]))
    args = dataclasses.replace(args, num_envs=4, num_steps=8, num_mini_batches=2, num_epochs=1, episode_length=3)
    args = dataclasses.replace(args, actor_hidden=32, critic_hidden=32, learning_rate=2e-4, max_grad_norm=0.7)
    args = dataclasses.replace(args, ent_target_mult=0.25, ent_start=0.02, kl_start=0.05)  # kl_bound stays 0.1
    calls, targets = [], []
    real_clip, real_adam, real_actor_loss = rj.optax.clip_by_global_norm, rj.optax.adam, rj.actor_loss

    def recording_clip(*inputs, **options):
        calls.append(("clip", inputs, options))
        return real_clip(*inputs, **options)

    def recording_adam(*inputs, **options):
        calls.append(("adam", inputs, options))
        return real_adam(*inputs, **options)

    def recording_actor_loss(*inputs):
        targets.append(inputs[10])  # entropy_target, a Python float at trace time
        return real_actor_loss(*inputs)

    monkeypatch.setattr(rj.optax, "clip_by_global_norm", recording_clip)
    monkeypatch.setattr(rj.optax, "adam", recording_adam)
    monkeypatch.setattr(rj, "actor_loss", recording_actor_loss)
    agent = rj.make_agent(args, CountdownEnv())
    assert calls == [("clip", (0.7,), {}), ("adam", (2e-4,), {})] * 2  # adam's defaults: b1 0.9, b2 0.999, eps 1e-8
    state = jax.eval_shape(agent.init, jax.random.PRNGKey(0))  # tracing is enough: no compilation
    clip_state, adam_state = state.actor_opt
    assert jax.tree.structure(adam_state[0].mu) == jax.tree.structure((state.actor, state.log_alpha, state.log_beta))
    assert jax.tree.structure(state.critic_opt[1][0].mu) == jax.tree.structure(state.critic)
    jax.eval_shape(lambda initial: agent.train_chunk(initial, 1), state)
    assert targets == [-0.25 * 1]  # CountdownEnv has one action dimension
    initial = agent.init(jax.random.PRNGKey(0))
    np.testing.assert_allclose(np.exp([initial.log_alpha, initial.log_beta]), [0.02, 0.05], rtol=1e-6)


class ActionRewardEnv:
    """A pure-JAX env whose observation stays at its reset value (normal, from the reset key)
    and whose reward is the action's first entry; episodes never end before the time limit."""

    observation_size = 3
    action_size = 2

    def reset(self, key):
        return self._state(jax.random.normal(key, (3,)) * 2.0 + 1.0, 0.0)

    def step(self, state, action):
        return self._state(state.obs, action[0])

    @staticmethod
    def _state(obs, reward):
        from mujoco_playground._src.mjx_env import State

        return State(
            data=jnp.zeros(()), obs=obs, reward=jnp.float32(reward), done=jnp.float32(0.0), metrics={}, info={}
        )


def test_evaluation_plays_the_deterministic_policy_with_the_frozen_normaliser():
    """SPEC section 10: the evaluation action is tanh(mean) (clipped as every executed action),
    the observation normalised with the evaluated state's statistics. Here each step's reward
    is that action's first entry at a constant observation, so an episode's return is
    episode_length times it; a sampled action, or another normaliser, would not give it."""
    args = rj.resolve_args(rj.parse_args(["--env-id", "CartpoleBalance", "--preset", "cpu"]))
    args = dataclasses.replace(args, num_envs=4, num_steps=8, num_mini_batches=2, num_epochs=1, num_eval_envs=5)
    args = dataclasses.replace(args, actor_hidden=32, critic_hidden=32, episode_length=10)
    env = ActionRewardEnv()
    agent = rj.make_agent(args, env)
    state = agent.init(jax.random.PRNGKey(0))
    moved = rj.normalizer_update(state.normalizer, jax.random.normal(jax.random.PRNGKey(1), (64, 3)) * 3.0 - 2.0)
    state = state._replace(normalizer=moved)
    key = jax.random.PRNGKey(3)
    returns = np.asarray(jax.jit(agent.evaluate)(state, key))
    obs = rj.AutoResetEnv(env, args.num_eval_envs, args.episode_length).reset(key, randomize_steps=False).obs
    graph = nnx.graphdef(rj._build_networks(args, env.observation_size, env.action_size, nnx.Rngs(0))[0])
    mean, _ = nnx.merge(graph, state.actor)(rj.normalize(state.normalizer, obs))
    action = np.clip(np.tanh(np.asarray(mean, np.float64)), -0.999, 0.999)
    np.testing.assert_allclose(returns, args.episode_length * action[:, 0], rtol=1e-5, atol=1e-5)
    assert np.ptp(action[:, 0]) > 0.01  # the five envs' observations and actions differ
    fresh, _ = nnx.merge(graph, state.actor)(rj.normalize(rj.normalizer_init(3), obs))
    assert np.abs(np.tanh(fresh[:, 0]) - action[:, 0]).max() > 0.01  # the normaliser matters here
