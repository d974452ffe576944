"""The speed switches change nothing but speed: with --compile (torch.compile of the collection
step, and of the whole minibatch update as one graph) one rollout and three updates, with
--fused-adam (Adam's fused kernel) three updates, and on a CUDA device with --cuda-graphs
(recorded, replayed updates and collection steps) five updates and two rollouts give the same
losses, metrics, new parameters and rollouts as plain eager PyTorch."""

import copy
import dataclasses
import os

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

    def __init__(self, device: str = "cpu"):
        self.device = device

    def reset(self, randomize_steps, key=None):
        self.t = 0
        self.state = torch.linspace(-1, 1, self.num_envs * OBS, device=self.device).reshape(self.num_envs, OBS)
        return self.state

    def get_state(self):
        return {}

    def step(self, action):
        """A made-up deterministic system (the rollout's numbers only need to be the same in
        both trainers): the state drifts with the action; env 0 ends its episode at every
        other step, alternately terminated and truncated."""
        self.t += 1
        final_obs = 0.9 * self.state + 0.5 * action.sum(dim=-1, keepdim=True) + 0.1
        reward = -(final_obs**2).mean(dim=-1)
        ended = torch.zeros(self.num_envs, device=self.device)
        ended[0] = float(self.t % 2 == 0)
        terminated = ended * float(self.t % 4 == 0)
        truncated = ended - terminated
        self.state = torch.where(ended[:, None] > 0, torch.zeros_like(final_obs), final_obs)
        zeros = torch.zeros(self.num_envs, device=self.device)
        return rt.StepResult(
            self.state, final_obs, reward, terminated, truncated, ended > 0, zeros, zeros, zeros, zeros
        )


def require_compiler() -> None:
    """Skip when torch.compile cannot work here at all (no C++ compiler, an unsupported
    platform): a two-op function must compile and run. Only this probe may turn an error into
    a skip, and not in CI (CI=true, which .ci/run sets and where a compiler is installed); an
    error in compiling REPPO's own update or collection fails the test."""
    try:
        torch.compile(lambda x: torch.sin(x) * 2.0 + 1.0)(torch.ones(3))
    except Exception as error:
        problem = (
            f"torch.compile is unavailable here: {type(error).__name__}: {error}; it needs a C++ compiler "
            "(install g++, as .ci/run does) and Python's development headers"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(problem)
        pytest.skip(problem)


def make_trainer(device: str = "cpu", **switches) -> rt.Trainer:
    args = rt.Args(env_id="CartpoleBalance", num_envs=4, num_steps=8, actor_hidden=32, critic_hidden=32)
    args = dataclasses.replace(args, vmin=0.0, vmax=150.0, gamma=0.99, episode_length=1000, **switches)
    return rt.Trainer(args, 0, torch.device(device), env=StubEnv(device), build_eval_env=False)


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
    from torch._dynamo.utils import counters

    require_compiler()
    torch._dynamo.reset()  # no compiled code of earlier tests in this process counts against the recompile limit
    eager = make_trainer()
    compiled = make_trainer(compile=True)
    compiled.load_state_dict(eager.state_dict(), with_env=False)
    initial = [param.detach().clone() for param in compiled.actor.parameters()]
    graphs = counters["stats"]["unique_graphs"]
    # The first update is eager (it creates Adam's state); the next ones run the compiled graph.
    for seed in (1, 2, 3):
        minibatch = make_minibatch(seed)
        eager_info = eager.update_minibatch(minibatch)
        compiled_info = compiled.update_minibatch(minibatch)
        assert_same(compiled, compiled_info, eager, eager_info)
    # One graph was compiled (and not recompiled for the third update): the compiled updates
    # were compared, not the eager update with itself.
    assert counters["stats"]["unique_graphs"] - graphs == 1
    moved = [(param - start).abs().max() for param, start in zip(compiled.actor.parameters(), initial)]
    assert max(moved) > 1e-4  # the parameters did change


def test_compiled_update_is_one_graph():
    """--compile's update (both losses, gradients, clipping, both Adam steps) is traced
    whole: one graph, no graph break (a break would put Python back between the pieces)."""
    trainer = make_trainer(compile=True)
    trainer.update_minibatch(make_minibatch(1))  # eager: creates Adam's state
    minibatch = make_minibatch(2)
    shape = minibatch["old_mean"].shape  # (B, A)
    noise = {"action_noise": torch.randn(shape), "kl_noise": torch.randn(trainer.args.num_kl_samples, *shape)}
    inputs = {**minibatch, **noise}
    explanation = torch._dynamo.explain(trainer._update)(inputs)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons


def test_compiled_collection_equals_eager_collection():
    require_compiler()
    eager = make_trainer()
    compiled = make_trainer(compile=True)
    compiled.load_state_dict(eager.state_dict(), with_env=False)  # same weights and random generator
    assert compiled.act_fn is not rt.act and compiled.bootstrap_fn is not rt.bootstrap
    eager_rollout = eager.collect_rollout()
    compiled_rollout = compiled.collect_rollout()
    assert eager_rollout.terminated.sum() > 0 and eager_rollout.truncated.sum() > 0  # both ends are covered
    for name in rt.Rollout._fields:
        torch.testing.assert_close(getattr(compiled_rollout, name), getattr(eager_rollout, name), msg=name)
    # The entropy term is in the numbers, except after a terminal state (IMPLEMENTATION DETAIL 6).
    assert torch.equal(eager_rollout.soft_reward != eager_rollout.reward, eager_rollout.terminated == 0)


def switched_on(trainer, switch):
    """Whether every param group of both Adam optimisers has ``switch`` ("fused", ...) on."""
    return all(group[switch] for opt in (trainer.actor_opt, trainer.critic_opt) for group in opt.param_groups)


def test_fused_adam_updates_equal_default_adam():
    eager = make_trainer()
    fused = make_trainer(fused_adam=True)
    assert switched_on(fused, "fused")
    fused.load_state_dict(eager.state_dict(), with_env=False)
    assert switched_on(fused, "fused")
    initial = [param.detach().clone() for param in fused.actor.parameters()]
    for seed in (1, 2, 3):  # several steps: Adam's moments and bias correction come into play
        minibatch = make_minibatch(seed)
        eager_info, fused_info = eager.update_minibatch(minibatch), fused.update_minibatch(minibatch)
        assert_same(fused, fused_info, eager, eager_info)
    moved = [(param - start).abs().max() for param, start in zip(fused.actor.parameters(), initial)]
    assert max(moved) > 1e-4  # the parameters did change: the comparison is not between two untouched nets


@pytest.mark.skipif(not torch.cuda.is_available(), reason="--cuda-graphs needs a CUDA device")
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_cuda_graph_updates_equal_eager_updates(compile):
    # The reference runs the same kernels launched one by one: plain eager PyTorch, or with
    # --compile the same compiled update (the compiler's GPU kernels sum in another order
    # than eager ones, and Adam's first steps turn a near-zero gradient's rounding into a
    # whole step of either sign, so compiled and eager parameters part after a few steps).
    eager = make_trainer("cuda", compile=compile)
    graphed = make_trainer("cuda", cuda_graphs=True, compile=compile)
    graphed.load_state_dict(eager.state_dict(), with_env=False)  # same weights and random generator
    assert switched_on(graphed, "capturable")
    # The first update is eager (it creates Adam's state), the second updates on a side
    # stream and records, the others replay.
    infos = []
    for seed in (1, 2, 3, 4, 5):
        minibatch = {name: value.cuda() for name, value in make_minibatch(seed).items()}
        eager_info, graphed_info = eager.update_minibatch(minibatch), graphed.update_minibatch(minibatch)
        assert (graphed.update_fn.graph is not None) == (seed > 1)
        assert_same(graphed, graphed_info, eager, eager_info)
        infos.append((eager_info, graphed_info))
    # Each replay's metrics are its own (train_iteration averages them after all the updates),
    # not views of the graph's output that the next replay overwrote.
    for eager_info, graphed_info in infos:
        for name, value in eager_info.items():
            torch.testing.assert_close(graphed_info[name], value, rtol=1e-5, atol=1e-5, msg=name)


def test_cuda_graphed_arguments_are_copied_in_and_found_again():
    """What CUDAGraphed records and copies in at each call (checked without a GPU): every
    tensor among the arguments (NamedTuples, dicts by sorted name), in the same order in
    the fixed copies as in a later call's arguments; networks and floats stay constants."""
    normalizer = rt.normalizer_init(3)
    args = (
        rt.Actor(3, 1, 8, 0.1),
        normalizer,
        torch.ones(2),
        {"b": torch.zeros(1), "a": torch.ones(4)},
        0.99,
        (torch.ones(5),),
    )
    fixed = [rt.CUDAGraphed._fixed(arg) for arg in args]
    assert fixed[0] is args[0] and fixed[4] == 0.99
    assert isinstance(fixed[1], rt.NormalizerState) and isinstance(fixed[5], tuple)
    found, found_fixed = rt.CUDAGraphed._tensors(args), rt.CUDAGraphed._tensors(fixed)
    expected = [*normalizer, args[2], args[3]["a"], args[3]["b"], args[5][0]]
    assert len(found) == len(found_fixed) == len(expected) == 7
    for tensor, copy_, original in zip(found, found_fixed, expected):
        assert tensor is original  # the call's own tensors, in order...
        assert torch.equal(copy_, original) and copy_.data_ptr() != original.data_ptr()  # ...and fixed copies


@pytest.mark.skipif(not torch.cuda.is_available(), reason="--cuda-graphs needs a CUDA device")
def test_cuda_graph_collection_equals_eager_collection():
    eager = make_trainer("cuda")
    graphed = make_trainer("cuda", cuda_graphs=True)
    graphed.load_state_dict(eager.state_dict(), with_env=False)  # same weights and random generator
    assert isinstance(graphed.act_fn, rt.CUDAGraphed) and isinstance(graphed.bootstrap_fn, rt.CUDAGraphed)
    # The first rollout's first step runs act and bootstrap on a side stream and records them;
    # its other steps and the whole second rollout replay. Between the two rollouts the
    # normaliser changes (new tensors, copied in at each call) and so do the actor's weights.
    for rollout_index in range(2):
        eager_rollout = eager.collect_rollout()
        graphed_rollout = graphed.collect_rollout()
        assert graphed.act_fn.graph is not None and graphed.bootstrap_fn.graph is not None
        for name in rt.Rollout._fields:
            torch.testing.assert_close(
                getattr(graphed_rollout, name), getattr(eager_rollout, name), msg=f"rollout {rollout_index}: {name}"
            )
        for trainer in (eager, graphed):
            trainer.normalizer = rt.normalizer_update(trainer.normalizer, trainer.rollout.raw_obs)
            with torch.no_grad():
                for param in trainer.actor.parameters():
                    param.mul_(1.1)  # in place, as Adam updates them: the graph must read the new values
    assert eager_rollout.terminated.sum() > 0 and eager_rollout.truncated.sum() > 0


def test_resuming_with_a_speed_switch_keeps_it_and_the_saved_moments():
    """A checkpoint saved with the default Adam, loaded by a --fused-adam run: the run keeps
    its fused kernel (the saved param groups would otherwise switch it off) and Adam's
    moments and step counts come from the checkpoint."""
    eager = make_trainer()
    eager.update_minibatch(make_minibatch(1))
    fused = make_trainer(fused_adam=True)
    # A copy, as a checkpoint read from disk is: Adam adopts the loaded moment tensors as they are.
    fused.load_state_dict(copy.deepcopy(eager.state_dict()), with_env=False)
    assert switched_on(fused, "fused")
    for opt, saved in ((fused.actor_opt, eager.actor_opt), (fused.critic_opt, eager.critic_opt)):
        for param, saved_param in zip(opt.param_groups[0]["params"], saved.param_groups[0]["params"]):
            mine, theirs = opt.state[param], saved.state[saved_param]
            torch.testing.assert_close(mine["exp_avg_sq"], theirs["exp_avg_sq"])
            assert float(mine["step"]) == float(theirs["step"]) == 1.0
    minibatch = make_minibatch(2)
    assert_same(fused, fused.update_minibatch(minibatch), eager, eager.update_minibatch(minibatch))
