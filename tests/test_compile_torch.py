"""--compile (torch.compile of the two losses) changes nothing but speed: one update gives the
same losses, metrics and new parameters as plain eager PyTorch."""

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


def make_trainer(compile_losses: bool) -> rt.Trainer:
    args = rt.Args(env_id="CartpoleBalance", num_envs=4, num_steps=8, actor_hidden=32, critic_hidden=32)
    args = dataclasses.replace(args, vmin=0.0, vmax=150.0, gamma=0.99, episode_length=1000, compile=compile_losses)
    return rt.Trainer(args, 0, torch.device("cpu"), env=StubEnv(), build_eval_env=False)


def test_compiled_update_equals_eager_update():
    eager = make_trainer(False)
    compiled = make_trainer(True)
    compiled.load_state_dict(eager.state_dict(), with_env=False)
    generator = torch.Generator().manual_seed(1)
    B = 32
    minibatch = {
        "obs": torch.randn(B, OBS, generator=generator),
        "action": torch.tanh(torch.randn(B, ACT, generator=generator)),
        "target_return": torch.rand(B, generator=generator) * 100,
        "next_features": torch.randn(B, 32, generator=generator),
        "reward": torch.rand(B, generator=generator),
        "terminated": (torch.rand(B, generator=generator) < 0.2).float(),
        "old_mean": torch.randn(B, ACT, generator=generator) * 0.1,
        "old_std": torch.full((B, ACT), 0.8),
    }
    eager_info = eager.update_minibatch(minibatch)
    try:
        compiled_info = compiled.update_minibatch(minibatch)
    except Exception as error:  # no C++ compiler, unsupported platform, ...
        pytest.skip(f"torch.compile is unavailable here: {type(error).__name__}: {error}")
    assert set(compiled_info) == set(eager_info)
    for name, value in eager_info.items():
        torch.testing.assert_close(compiled_info[name], value, rtol=1e-5, atol=1e-5, msg=name)
    for module in ("actor", "critic"):
        for (name, a), b in zip(getattr(eager, module).named_parameters(), getattr(compiled, module).parameters()):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=f"{module}.{name}")
