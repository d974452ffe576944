"""The iteration of reppo_torch.py around the math (SPEC sections 3, 6, 8 and 9): every actor
loss of one iteration sees pi_old as the policy that collected the batch (not the actor being
trained), and every critic loss the same targets in every epoch (computed once per iteration);
collection's bootstraps (against a float64 reference) feed the targets; the optimisers, the
clipping and the entropy target are SPEC section 9's."""

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
from test_compile_torch import make_minibatch, make_trainer

import reppo_torch as rt


def test_pi_old_and_the_targets_stay_fixed_for_the_whole_learning_phase(monkeypatch):
    """Also the losses' other inputs (SPEC section 8): each actor loss gets kl_bound, M =
    num_kl_samples KL samples, an actor with the std floor min_std and the critic just updated
    on the same minibatch, each critic loss aux_coef, vmin and vmax both; collection draws K =
    num_value_samples value samples and executes actions clipped to +-0.999 (SPEC section 6;
    min_std 2.5 makes |u| > atanh(0.999) ~= 3.8 frequent)."""
    switches = {"kl_bound": 0.07, "aux_coef": 0.3, "num_value_samples": 3, "num_kl_samples": 5, "min_std": 2.5}
    trainer = make_trainer(**switches)  # vmin 0, vmax 150: none equal to another
    trainer.train_iteration()  # a trained actor and a non-trivial normaliser to start from
    collecting_actor = copy.deepcopy(trainer.actor)
    actor_inputs, targets, critics, constants, actions = [], [], [], set(), []
    real_actor_loss, real_critic_loss = rt.actor_loss, rt.critic_loss
    real_bootstrap, real_step = trainer.bootstrap_fn, trainer.env.step

    def record_critic(caller, critic):  # every critic parameter, flattened, and who got it
        critics.append((caller, torch.cat([p.detach().flatten() for p in critic.parameters()])))

    def recording_actor_loss(actor, log_alpha, log_beta, critic, obs, old_mean, old_std, *rest):
        actor_inputs.append((obs.clone(), old_mean.clone(), old_std.clone()))
        record_critic("actor", critic)
        constants.add(("actor", rest[2], *rest[4:], rest[1].shape[0], actor.min_std))  # kl_bound, vmin, vmax, M
        return real_actor_loss(actor, log_alpha, log_beta, critic, obs, old_mean, old_std, *rest)

    def recording_bootstrap(actor, critic, alpha, normalizer, final_obs, reward, terminated, noise, *rest):
        constants.add(("bootstrap", noise.shape[0]))  # K
        return real_bootstrap(actor, critic, alpha, normalizer, final_obs, reward, terminated, noise, *rest)

    def recording_step(action):
        actions.append(action.clone())
        return real_step(action)

    def recording_critic_loss(critic, obs, action, target_return, *rest):
        targets.append(target_return.clone())
        record_critic("critic", critic)
        constants.add(("critic", *rest[3:]))  # vmin, vmax, aux_coef
        return real_critic_loss(critic, obs, action, target_return, *rest)

    monkeypatch.setattr(rt, "actor_loss", recording_actor_loss)
    monkeypatch.setattr(rt, "critic_loss", recording_critic_loss)
    monkeypatch.setattr(trainer, "bootstrap_fn", recording_bootstrap)
    monkeypatch.setattr(trainer.env, "step", recording_step)
    trainer.train_iteration()
    args = trainer.args
    assert len(actor_inputs) == len(targets) == args.num_epochs * args.num_mini_batches
    with torch.no_grad():
        for obs, old_mean, old_std in actor_inputs:  # the first update's and the last one's alike
            mean, std = collecting_actor(obs)
            torch.testing.assert_close(old_mean, mean)
            torch.testing.assert_close(old_std, std)
        obs, old_mean, _ = actor_inputs[-1]
        assert (trainer.actor(obs)[0] - old_mean).abs().max() > 1e-4  # the actor did move meanwhile
    assert constants == {("actor", 0.07, 0.0, 150.0, 5, 2.5), ("critic", 0.0, 150.0, 0.3), ("bootstrap", 3)}
    actions = torch.stack(actions).abs()
    assert len(actions) == args.num_steps and actions.max() == torch.tensor(0.999)  # some were clipped
    # Update k: the critic loss gets critic k, the actor loss critic k + 1 (just updated),
    # which the next update's critic loss gets too.
    assert [caller for caller, _ in critics] == ["critic", "actor"] * len(targets)
    for k in range(len(targets)):
        assert not torch.equal(critics[2 * k][1], critics[2 * k + 1][1])
        if k + 1 < len(targets):
            assert torch.equal(critics[2 * k + 1][1], critics[2 * k + 2][1])
    # Each epoch is a permutation of the same batch with the same targets.
    n = args.num_mini_batches
    per_epoch = [torch.cat(targets[e * n : (e + 1) * n]) for e in range(args.num_epochs)]
    for epoch in per_epoch[1:]:
        assert not torch.equal(epoch, per_epoch[0])  # another order...
        torch.testing.assert_close(epoch.sort().values, per_epoch[0].sort().values, rtol=0, atol=0)  # ...same values


def sorted_rows(x: torch.Tensor) -> torch.Tensor:
    """The rows of a (B, O) tensor in lexicographic order (a batch's content, whatever its order)."""
    for column in reversed(range(x.shape[1])):
        x = x[torch.argsort(x[:, column], stable=True)]
    return x


def test_collection_bootstraps_from_the_true_final_observation_and_keeps_its_normalisation(monkeypatch):
    """The wiring around the math (SPEC sections 3 and 6), on a stub env whose env 0 ends an
    episode every other step, alternately terminated and truncated, where the state the
    action led to (final_obs) differs from the next episode's first one (next_obs): each
    step's bootstrap gets final_obs, its reward and terminated flag; the lambda-returns get
    terminated and truncated each in its place; the learner sees the observations normalised
    with the statistics of the collection, not the ones updated after it."""
    trainer = make_trainer()
    trainer.train_iteration()  # a non-trivial normaliser to start from
    steps, bootstraps, returns_inputs, critic_obs = [], [], [], []
    real_step, real_bootstrap, real_returns = trainer.env.step, trainer.bootstrap_fn, rt.soft_lambda_returns
    real_critic_loss = rt.critic_loss

    def recording_step(action):
        steps.append(real_step(action))
        return steps[-1]

    def recording_bootstrap(actor, critic, alpha, normalizer, final_obs, reward, terminated, noise, gamma, *rest):
        out = real_bootstrap(actor, critic, alpha, normalizer, final_obs, reward, terminated, noise, gamma, *rest)
        bootstraps.append((final_obs.clone(), reward.clone(), terminated.clone(), alpha.clone(), gamma, out))
        return out

    def recording_returns(soft_reward, next_value, terminated, truncated, gamma, lmbda):
        returns_inputs.append((terminated.clone(), truncated.clone(), soft_reward.clone(), next_value.clone()))
        returns_inputs.append((gamma, lmbda))
        return real_returns(soft_reward, next_value, terminated, truncated, gamma, lmbda)

    def recording_critic_loss(critic, obs, *rest):  # rest[3:5]: the aux head's reward and terminated
        critic_obs.append(torch.cat([obs, rest[3][:, None], rest[4][:, None]], 1))
        return real_critic_loss(critic, obs, *rest)

    monkeypatch.setattr(trainer.env, "step", recording_step)
    monkeypatch.setattr(trainer, "bootstrap_fn", recording_bootstrap)
    monkeypatch.setattr(rt, "soft_lambda_returns", recording_returns)
    monkeypatch.setattr(rt, "critic_loss", recording_critic_loss)
    first_raw_obs, normalizer = trainer.obs.clone(), trainer.normalizer
    alpha_at_collection = float(torch.exp(trainer.log_alpha))  # the learning phase then changes it
    trainer.train_iteration()

    T = trainer.args.num_steps
    args = trainer.args
    assert len(steps) == len(bootstraps) == T and len(returns_inputs) == 2
    assert any(not torch.equal(s.final_obs, s.next_obs) for s in steps)  # the stub tells them apart
    for step, (final_obs, reward, terminated, alpha, gamma, _) in zip(steps, bootstraps):
        torch.testing.assert_close(final_obs, step.final_obs, rtol=0, atol=0)
        torch.testing.assert_close(reward, step.reward, rtol=0, atol=0)
        torch.testing.assert_close(terminated, step.terminated, rtol=0, atol=0)
        assert gamma == args.gamma and float(alpha) == alpha_at_collection
    (terminated, truncated, soft_reward, next_value), (gamma, lmbda) = returns_inputs
    assert terminated.sum() > 0 and truncated.sum() > 0  # both kinds of episode end occur
    torch.testing.assert_close(terminated, torch.stack([s.terminated for s in steps]), rtol=0, atol=0)
    torch.testing.assert_close(truncated, torch.stack([s.truncated for s in steps]), rtol=0, atol=0)
    # The targets are built from the bootstraps' soft rewards and values, with gamma and lambda.
    torch.testing.assert_close(soft_reward, torch.stack([b[-1][0] for b in bootstraps]), rtol=0, atol=0)
    torch.testing.assert_close(next_value, torch.stack([b[-1][1] for b in bootstraps]), rtol=0, atol=0)
    assert not torch.equal(soft_reward, torch.stack([s.reward for s in steps]))  # the entropy term is there
    assert (gamma, lmbda) == (args.gamma, args.lmbda) and gamma != lmbda
    # s_t: the first observation, then each step's next_obs; normalised as during collection.
    raw_obs = torch.cat([first_raw_obs] + [s.next_obs for s in steps[:-1]])  # (T N, O), t-major
    assert not torch.equal(rt.normalize(normalizer, raw_obs), rt.normalize(trainer.normalizer, raw_obs))
    # With each s_t the critic loss gets the env's reward r_t (not the soft reward) and
    # terminated_t (not truncated_t), t-major as raw_obs.
    env_reward = torch.cat([s.reward for s in steps])[:, None]
    env_terminated = torch.cat([s.terminated for s in steps])[:, None]
    collected = torch.cat([rt.normalize(normalizer, raw_obs), env_reward, env_terminated], 1)
    first_epoch = torch.cat(critic_obs[: trainer.args.num_mini_batches])
    torch.testing.assert_close(sorted_rows(first_epoch), sorted_rows(collected))


def test_the_training_episodes_that_ended_are_counted_and_summed(monkeypatch):
    """charts/episodes, charts/episode_return_sum and charts/episode_length_sum of each
    iteration: the number of complete episodes that ended in it (the steps' episode_done) and
    the sums of their returns and lengths; train_row then divides the sums by the number over
    the iterations since the last log point. The returns handed back differ from env to env
    and step to step, so a max, a mean or the last episode's return would not give these;
    a step whose env did not end a complete episode adds nothing. The twin of the test in
    tests/test_loop_jax.py (where the env wrapper's own sums are checked too)."""
    trainer = make_trainer()
    real_step, t = trainer.env.step, [0]

    def step(action):
        result = real_step(action)
        t[0] += 1
        done = torch.tensor([t[0] % 3 == 0, t[0] % 5 == 0, False, t[0] % 2 == 0])
        episode_return = torch.arange(4.0) * 10.0 + t[0] ** 1.5  # differs per env and step
        episode_length = torch.arange(4.0) + t[0]
        return result._replace(episode_done=done, episode_return=episode_return, episode_length=episode_length)

    monkeypatch.setattr(trainer.env, "step", step)
    metrics = [trainer.train_iteration() for _ in range(2)]
    T = trainer.args.num_steps
    counted = np.zeros((2, 3))  # per iteration: episodes, return sum, length sum
    for k in range(1, 2 * T + 1):
        for env, ended in enumerate((k % 3 == 0, k % 5 == 0, False, k % 2 == 0)):
            if ended:
                counted[(k - 1) // T] += (1, env * 10.0 + k**1.5, env + k)
    names = ("charts/episodes", "charts/episode_return_sum", "charts/episode_length_sum")
    for iteration, expected in zip(metrics, counted):
        np.testing.assert_allclose([iteration[name] for name in names], expected, rtol=1e-5)
    row = rt.train_row(metrics, sps=0.0, maniskill=False)
    totals = counted.sum(axis=0)
    np.testing.assert_allclose(row["charts/episodic_return"], totals[1] / totals[0], rtol=1e-5)
    np.testing.assert_allclose(row["charts/episodic_length"], totals[2] / totals[0], rtol=1e-5)


def test_bootstrap_matches_a_float64_reference():
    """SPEC section 6, against a naive float64 computation: the TRUE next state is normalised
    with the collection's statistics, v' = mean_k Q(s', a'_k) with Q the categorical mean, and
    r~ = r - (1 - terminated) gamma alpha mean_k log pi(a'_k|s'), with log pi written as
    log N(u; mean, std) - log(1 - tanh(u)^2); z' = features(s', a'_1)."""
    torch.manual_seed(0)
    actor, critic = rt.Actor(5, 3, 32, 0.1), rt.Critic(5, 3, 32, 51, 0.0, 150.0)
    generator = torch.Generator().manual_seed(1)
    normalizer = rt.normalizer_update(rt.normalizer_init(5), torch.randn(64, 5, generator=generator) * 3 + 1)
    final_obs = torch.randn(6, 5, generator=generator) * 3 + 1
    reward = torch.rand(6, generator=generator)
    terminated = torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    noise = torch.randn(4, 6, 3, generator=generator)  # K = 4 value samples
    alpha, gamma = torch.tensor(0.3), 0.9
    with torch.no_grad():
        soft_reward, next_value, next_features = rt.bootstrap(
            actor, critic, alpha, normalizer, final_obs, reward, terminated, noise, gamma, 0.0, 150.0
        )
        d = torch.float64
        obs = (final_obs.to(d) - normalizer.mean.to(d)) / torch.sqrt(normalizer.var.to(d) + 1e-2)
        mean, std = (x.to(d) for x in actor(obs.float()))
        u = mean + std * noise.to(d)  # (K, N, A)
        log_normal = -0.5 * ((u - mean) / std) ** 2 - torch.log(std) - 0.5 * math.log(2 * math.pi)
        log_pi = (log_normal - torch.log(1 - torch.tanh(u) ** 2)).sum(-1)  # (K, N)
        logits, features = critic(obs.float().expand(4, 6, 5), torch.tanh(u).float())
        q = (torch.softmax(logits.to(d), -1) * torch.linspace(0.0, 150.0, 51, dtype=d)).sum(-1)  # (K, N)
    torch.testing.assert_close(next_value.to(d), q.mean(0), rtol=1e-5, atol=1e-4)
    expected = reward.to(d) - (1 - terminated.to(d)) * gamma * 0.3 * log_pi.mean(0)
    torch.testing.assert_close(soft_reward.to(d), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(soft_reward, reward)  # the entropy term is not negligible here
    torch.testing.assert_close(next_features, features[0])


def test_the_optimisers_and_the_entropy_target_are_spec_9s(monkeypatch):
    """SPEC section 9: Adam (lr --learning-rate, 3e-4 by default; optax's betas and eps, no
    weight decay) for each network; the actor's optimiser also holds log_alpha and log_beta;
    each step clips the gradient of everything it updates jointly, by global norm, to
    max_grad_norm, before the optimiser's step; the entropy target is
    -ent_target_mult * action_size; alpha and beta start at ent_start and kl_start."""
    trainer = make_trainer(learning_rate=2e-4, max_grad_norm=0.1, ent_target_mult=0.25, ent_start=0.02, kl_start=0.05)
    torch.testing.assert_close(
        torch.exp(torch.stack([trainer.log_alpha, trainer.log_beta])), torch.tensor([0.02, 0.05])
    )
    actor_params = list(trainer.actor.parameters()) + [trainer.log_alpha, trainer.log_beta]
    critic_params = list(trainer.critic.parameters())
    for optimizer, params in ((trainer.actor_opt, actor_params), (trainer.critic_opt, critic_params)):
        (group,) = optimizer.param_groups
        assert [id(p) for p in group["params"]] == [id(p) for p in params]
        assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (2e-4, (0.9, 0.999), 1e-8, 0)
        assert not group["amsgrad"] and not group["maximize"]
    clips, targets, stepped_norms = [], [], []
    real_clip, real_actor_loss = rt.clip_grad_norm, rt.actor_loss

    def global_norm(tensors):
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors])))

    def recording_clip(grads, max_norm):
        clips.append((len(grads), max_norm, global_norm(grads)))
        return real_clip(grads, max_norm)

    for optimizer in (trainer.critic_opt, trainer.actor_opt):  # the gradients each step applies
        real_step = optimizer.step

        def recording_step(real_step=real_step, optimizer=optimizer):
            stepped_norms.append(global_norm([p.grad for p in optimizer.param_groups[0]["params"]]))
            return real_step()

        monkeypatch.setattr(optimizer, "step", recording_step)

    def recording_actor_loss(*inputs):
        targets.append(inputs[10])  # entropy_target
        return real_actor_loss(*inputs)

    monkeypatch.setattr(rt, "clip_grad_norm", recording_clip)
    monkeypatch.setattr(rt, "actor_loss", recording_actor_loss)
    trainer.update_minibatch(make_minibatch(0))
    assert [clip[:2] for clip in clips] == [(len(critic_params), 0.1), (len(actor_params), 0.1)]
    assert all(raw > 0.1 for *_, raw in clips), clips  # both gradients did need clipping...
    assert stepped_norms == pytest.approx([0.1, 0.1], rel=1e-5)  # ...and each step applied the clipped one
    assert targets == [-0.25 * trainer.action_size]


class ActionRewardEnv:
    """Evaluation envs whose observation stays at its reset value and whose reward is the
    action's first entry; episodes never end before the time limit."""

    suite = "dm_control"
    num_envs = 5

    def reset(self, randomize_steps, key=None):
        self.obs = torch.linspace(-3.0, 4.0, self.num_envs * 3).reshape(self.num_envs, 3)
        return self.obs

    def step(self, action):
        zeros = torch.zeros(self.num_envs)
        return rt.StepResult(self.obs, self.obs, action[:, 0], zeros, zeros, zeros > 0, zeros, zeros, zeros, zeros)


def test_evaluation_plays_the_deterministic_policy_with_the_frozen_normaliser():
    """SPEC section 10: the evaluation action is tanh(mean) (clipped as every executed action),
    the observation normalised with the trainer's statistics; `stochastic=True` samples pi
    instead. Each step's reward is that action's first entry at a constant observation, so an
    episode's return is episode_length times it. The twin of the test in tests/test_loop_jax.py."""
    trainer = make_trainer(num_eval_envs=5)
    trainer.args = dataclasses.replace(trainer.args, episode_length=10)
    trainer.actor = rt.Actor(3, 2, 32, trainer.args.min_std)  # this env's sizes
    moved = rt.normalizer_update(
        rt.normalizer_init(3), torch.randn(64, 3, generator=torch.Generator().manual_seed(1)) * 3 - 2
    )
    trainer.normalizer, trainer.eval_env = moved, ActionRewardEnv()
    saved = [value.clone() for value in moved]
    returns = trainer.evaluate()["return"]
    assert trainer.normalizer is moved  # evaluation leaves the statistics as they were,
    assert all(torch.equal(value, before) for value, before in zip(moved, saved))  # in place too
    with torch.no_grad():
        obs = trainer.eval_env.reset(randomize_steps=False)
        mean, _ = trainer.actor(rt.normalize(moved, obs))
        fresh, _ = trainer.actor(rt.normalize(rt.normalizer_init(3), obs))
    action = torch.tanh(mean.double()).clamp(-0.999, 0.999)[:, 0].numpy()
    np.testing.assert_allclose(returns, 10 * action, rtol=1e-5, atol=1e-5)
    assert np.ptp(action) > 0.01  # the five envs' observations and actions differ
    assert np.abs(torch.tanh(fresh[:, 0]).numpy() - action).max() > 0.01  # the normaliser matters here
    assert np.abs(trainer.evaluate(stochastic=True)["return"] - returns).max() > 0.01
