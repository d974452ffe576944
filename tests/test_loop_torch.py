"""The learning phase of reppo_torch.py's iteration (SPEC sections 3 and 8): every actor loss
of one iteration sees pi_old as the policy that collected the batch (not the actor being
trained), and every critic loss the same targets in every epoch (computed once per iteration)."""

import copy

import torch
from test_compile_torch import make_trainer

import reppo_torch as rt


def test_pi_old_and_the_targets_stay_fixed_for_the_whole_learning_phase(monkeypatch):
    trainer = make_trainer()
    trainer.train_iteration()  # a trained actor and a non-trivial normaliser to start from
    collecting_actor = copy.deepcopy(trainer.actor)
    actor_inputs, targets = [], []
    real_actor_loss, real_critic_loss = rt.actor_loss, rt.critic_loss

    def recording_actor_loss(actor, log_alpha, log_beta, critic, obs, old_mean, old_std, *rest):
        actor_inputs.append((obs.clone(), old_mean.clone(), old_std.clone()))
        return real_actor_loss(actor, log_alpha, log_beta, critic, obs, old_mean, old_std, *rest)

    def recording_critic_loss(critic, obs, action, target_return, *rest):
        targets.append(target_return.clone())
        return real_critic_loss(critic, obs, action, target_return, *rest)

    monkeypatch.setattr(rt, "actor_loss", recording_actor_loss)
    monkeypatch.setattr(rt, "critic_loss", recording_critic_loss)
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

    def recording_bootstrap(actor, critic, alpha, normalizer, final_obs, reward, terminated, *rest):
        bootstraps.append((final_obs.clone(), reward.clone(), terminated.clone()))
        return real_bootstrap(actor, critic, alpha, normalizer, final_obs, reward, terminated, *rest)

    def recording_returns(soft_reward, next_value, terminated, truncated, *rest):
        returns_inputs.append((terminated.clone(), truncated.clone()))
        return real_returns(soft_reward, next_value, terminated, truncated, *rest)

    def recording_critic_loss(critic, obs, *rest):
        critic_obs.append(obs.clone())
        return real_critic_loss(critic, obs, *rest)

    monkeypatch.setattr(trainer.env, "step", recording_step)
    monkeypatch.setattr(trainer, "bootstrap_fn", recording_bootstrap)
    monkeypatch.setattr(rt, "soft_lambda_returns", recording_returns)
    monkeypatch.setattr(rt, "critic_loss", recording_critic_loss)
    first_raw_obs, normalizer = trainer.obs.clone(), trainer.normalizer
    trainer.train_iteration()

    T = trainer.args.num_steps
    assert len(steps) == len(bootstraps) == T and len(returns_inputs) == 1
    assert any(not torch.equal(s.final_obs, s.next_obs) for s in steps)  # the stub tells them apart
    for step, (final_obs, reward, terminated) in zip(steps, bootstraps):
        torch.testing.assert_close(final_obs, step.final_obs, rtol=0, atol=0)
        torch.testing.assert_close(reward, step.reward, rtol=0, atol=0)
        torch.testing.assert_close(terminated, step.terminated, rtol=0, atol=0)
    terminated, truncated = returns_inputs[0]
    assert terminated.sum() > 0 and truncated.sum() > 0  # both kinds of episode end occur
    torch.testing.assert_close(terminated, torch.stack([s.terminated for s in steps]), rtol=0, atol=0)
    torch.testing.assert_close(truncated, torch.stack([s.truncated for s in steps]), rtol=0, atol=0)
    # s_t: the first observation, then each step's next_obs; normalised as during collection.
    raw_obs = torch.cat([first_raw_obs] + [s.next_obs for s in steps[:-1]])  # (T N, O), t-major
    assert not torch.equal(rt.normalize(normalizer, raw_obs), rt.normalize(trainer.normalizer, raw_obs))
    first_epoch = torch.cat(critic_obs[: trainer.args.num_mini_batches])
    torch.testing.assert_close(sorted_rows(first_epoch), sorted_rows(rt.normalize(normalizer, raw_obs)))
