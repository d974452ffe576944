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
