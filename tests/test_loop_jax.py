"""The learning phase of reppo_jax.py's iteration (SPEC sections 3 and 8): every actor loss
of one iteration sees pi_old as the policy that collected the batch (not the actor being
trained), and every critic loss the same targets in every epoch (computed once per iteration).

The iteration is one jitted function, so the losses' inputs are sent back to Python with
ordered host callbacks; the twin of tests/test_loop_torch.py."""

import dataclasses

import jax
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
