"""The speed switches change nothing but speed: with --compile (torch.compile of the two losses)
one update, and with --fused-adam (Adam's fused kernel) three updates, give the same losses,
metrics and new parameters as plain eager PyTorch."""

import dataclasses

import pytest
import torch

import reppo_torch as rt

OBS, ACT = 6, 2


class StubEnv:
    """Just enough of an env for a Trainer that only updates (no collection)."""

    suite = "dm_control"
    num_envs = 4
    obs_size = OBS
    action_size = ACT

    def reset(self, randomize_steps, key=None):
        return torch.zeros(self.num_envs, OBS)

    def get_state(self):
        return {}


def make_trainer(**switches) -> rt.Trainer:
    args = rt.Args(env_id="CartpoleBalance", num_envs=4, num_steps=8, actor_hidden=32, critic_hidden=32)
    args = dataclasses.replace(args, vmin=0.0, vmax=150.0, gamma=0.99, episode_length=1000, **switches)
    return rt.Trainer(args, 0, torch.device("cpu"), env=StubEnv(), build_eval_env=False)


def make_minibatch(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    B = 32
    return {
        "obs": torch.randn(B, OBS, generator=generator),
        "action": torch.tanh(torch.randn(B, ACT, generator=generator)),
        "target_return": torch.rand(B, generator=generator) * 100,
        "next_features": torch.randn(B, 32, generator=generator),
        "reward": torch.rand(B, generator=generator),
        "terminated": (torch.rand(B, generator=generator) < 0.2).float(),
        "old_mean": torch.randn(B, ACT, generator=generator) * 0.1,
        "old_std": torch.full((B, ACT), 0.8),
    }


def assert_same(fast: rt.Trainer, fast_info: dict, eager: rt.Trainer, eager_info: dict) -> None:
    assert set(fast_info) == set(eager_info)
    for name, value in eager_info.items():
        torch.testing.assert_close(fast_info[name], value, rtol=1e-5, atol=1e-5, msg=name)
    for module in ("actor", "critic"):
        for (name, a), b in zip(getattr(eager, module).named_parameters(), getattr(fast, module).parameters()):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=f"{module}.{name}")
    for name in ("log_alpha", "log_beta"):
        torch.testing.assert_close(getattr(fast, name), getattr(eager, name), rtol=1e-5, atol=1e-6, msg=name)


def test_compiled_update_equals_eager_update():
    eager = make_trainer()
    compiled = make_trainer(compile=True)
    compiled.load_state_dict(eager.state_dict(), with_env=False)
    minibatch = make_minibatch(1)
    eager_info = eager.update_minibatch(minibatch)
    try:
        compiled_info = compiled.update_minibatch(minibatch)
    except Exception as error:  # no C++ compiler, unsupported platform, ...
        pytest.skip(f"torch.compile is unavailable here: {type(error).__name__}: {error}")
    assert_same(compiled, compiled_info, eager, eager_info)


def test_fused_adam_updates_equal_default_adam():
    eager = make_trainer()
    fused = make_trainer(fused_adam=True)
    assert all(group["fused"] for opt in (fused.actor_opt, fused.critic_opt) for group in opt.param_groups)
    fused.load_state_dict(eager.state_dict(), with_env=False)
    initial = [param.detach().clone() for param in fused.actor.parameters()]
    for seed in (1, 2, 3):  # several steps: Adam's moments and bias correction come into play
        minibatch = make_minibatch(seed)
        eager_info, fused_info = eager.update_minibatch(minibatch), fused.update_minibatch(minibatch)
        assert_same(fused, fused_info, eager, eager_info)
    moved = [(param - start).abs().max() for param, start in zip(fused.actor.parameters(), initial)]
    assert max(moved) > 1e-4  # the parameters did change: the comparison is not between two untouched nets
