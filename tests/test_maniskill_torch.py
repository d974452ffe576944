"""reppo_torch.py on ManiSkill3 with the CPU simulator (physx_cpu, one env): partial resets
with the true final observation, a short training run with finite losses and success
metrics, a checkpoint that reloads for evaluation and for training.

SAPIEN needs a Vulkan driver even for state observations. Without one these tests skip
(on a user's machine) with the command that installs it; in CI (CI=true) they fail instead.
"""

import ctypes
import dataclasses
import json
import os
import time

import numpy as np
import pytest
import torch
from conftest import only_run, read_metrics, require, run_script

import reppo_torch as rt


def vulkan_problem() -> str | None:
    """Why SAPIEN cannot start here (no Vulkan loader or no driver), else None."""
    try:
        ctypes.CDLL("libvulkan.so.1")
    except OSError:
        return "the Vulkan loader libvulkan.so.1 is missing"
    icd_dirs = ["/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d", "/usr/local/share/vulkan/icd.d"]
    icds = [f for d in icd_dirs if os.path.isdir(d) for f in os.listdir(d) if f.endswith(".json")]
    if not icds and not os.environ.get("VK_ICD_FILENAMES"):
        return "no Vulkan driver (ICD) is installed"
    return None


def require_maniskill(vulkan: bool = True):
    """Skip without ManiSkill3 or (unless ``vulkan=False``) Vulkan, saying how to enable the
    test; in CI (CI=true, which .ci/run sets) fail instead, since CI installs both."""
    problem = vulkan_problem() if vulkan else None
    if problem is not None:  # (a missing mani_skill is reported first, by require)
        problem = (
            f"ManiSkill3 tests need Vulkan: {problem}. Install the CPU driver (Mesa lavapipe >= 24.3) "
            f"with `sudo bash .ci/install_vulkan.sh` (Debian 12), then rerun."
        )
    require("mani_skill", "mani_skill==3.0.1", problem)


TINY = [
    "--preset", "cpu", "--num-steps", "16", "--num-mini-batches", "2", "--num-epochs", "1",
    "--actor-hidden", "32", "--critic-hidden", "32", "--num-eval-envs", "1", "--log-interval", "1",
    "--no-progress", "--device", "cpu",
]  # fmt: skip


def test_a_controller_with_its_own_action_bounds_gets_the_action_mapped_onto_them(monkeypatch):
    """pd_joint_pos takes joint angles within the joints' limits (ManiSkill neither scales nor
    clips them): the policy's -1, 0 and 1 reach the simulator as low, the midpoint and high.
    The default controller takes normalised actions, which pass unchanged."""
    require_maniskill()
    sent = []
    for control_mode in ("pd_joint_pos", "pd_joint_delta_pos"):
        args = rt.resolve_args(rt.Args(env_id="PushCube-v1", control_mode=control_mode, num_envs=1))
        env = rt.ManiSkillEnv(args, 1, seed=0, device=torch.device("cpu"))
        low = torch.as_tensor(env.env.single_action_space.low)
        high = torch.as_tensor(env.env.single_action_space.high)
        step = env.env.step
        monkeypatch.setattr(env.env, "step", lambda action, step=step: sent.append(action.clone()) or step(action))
        env.reset(randomize_steps=False)
        for value in (-1.0, 0.0, 1.0):
            env.step(torch.full((1, env.action_size), value))
        env.close()
        if control_mode == "pd_joint_pos":
            assert (high - low > 0.5).all() and not torch.allclose(low, -torch.ones_like(low))
            torch.testing.assert_close(torch.cat(sent[-3:]), torch.stack([low, (low + high) / 2, high]))
        else:
            assert (low == -1).all() and (high == 1).all()
            torch.testing.assert_close(torch.cat(sent[-3:]), torch.tensor([[-1.0], [0.0], [1.0]]).expand(3, len(low)))


def test_partial_reset_hands_back_the_true_final_observation():
    require_maniskill()
    defaults = rt.resolve_args(rt.Args(env_id="PushCube-v1", episode_length=40))
    assert (defaults.vmin, defaults.vmax) == (-15.0, 15.0) and abs(defaults.gamma - (1 - 10 / 40)) < 1e-9
    args = rt.resolve_args(rt.Args(env_id="PushCube-v1", episode_length=5, gamma=0.9, num_envs=1, num_steps=16))
    env = rt.ManiSkillEnv(args, 1, seed=0, device=torch.device("cpu"))
    obs = env.reset(randomize_steps=False)
    assert obs.shape == (1, env.obs_size) and env.action_size == 8
    action = torch.full((1, 8), 0.5)
    for t in range(5):
        step = env.step(action)
        assert bool(step.truncated[0]) == bool(step.episode_done[0]) == (t == 4)
    # At the time limit the env was reset already: next_obs is a new episode's first
    # observation, final_obs the one the action led to (moved by the arm, so different).
    assert not torch.allclose(step.final_obs, step.next_obs)
    assert step.episode_done[0] and step.episode_length[0] == 5
    assert float(step.success_once[0]) in (0.0, 1.0) and float(step.success_at_end[0]) in (0.0, 1.0)
    env.close()


def force_success_at(env, step: int) -> None:
    """Make the task report success (and nothing else) exactly at elapsed step ``step``."""
    evaluate = env.base.evaluate

    def evaluate_with_success():
        info = evaluate()
        info["success"] = env.base.elapsed_steps == step
        info.pop("fail", None)
        return info

    env.base.evaluate = evaluate_with_success


def test_success_ends_a_training_episode_as_a_bootstrapped_truncation_but_not_an_evaluation_one():
    """The authors' setting (SPEC section 11): in training, a task's termination (success) ends
    the episode and resets that env, and the step is bootstrapped from its true final
    observation (truncated, never terminated); evaluation episodes run the full length, and so
    do training episodes with --ignore-terminations."""
    require_maniskill()
    action = torch.full((1, 8), 0.5)
    for auto_reset, ignore_terminations in ((True, False), (True, True), (False, False), (False, True)):
        args = rt.resolve_args(
            rt.Args(
                env_id="PushCube-v1", episode_length=8, gamma=0.9, num_envs=1, num_steps=16,
                ignore_terminations=ignore_terminations,
            )
        )  # fmt: skip
        env = rt.ManiSkillEnv(args, 1, seed=0, device=torch.device("cpu"), auto_reset=auto_reset)
        env.reset(randomize_steps=False)
        force_success_at(env, 3)
        steps = [env.step(action) for _ in range(10)]
        env.close()
        ends = [t for t, step in enumerate(steps) if step.truncated[0]]
        assert all(float(step.terminated[0]) == 0.0 for step in steps)
        if auto_reset and not ignore_terminations:  # success at step 3 (t = 2) ends the episode
            assert ends[0] == 2 and steps[2].episode_done[0] and steps[2].episode_length[0] == 3
            assert steps[2].success_once[0] == 1.0
            assert not torch.allclose(steps[2].final_obs, steps[2].next_obs)  # reset after the true last obs
            assert torch.equal(steps[1].final_obs, steps[1].next_obs)
        else:  # the success is recorded and the episode runs on to the time limit
            assert ends[0] == 7 and steps[7].episode_length[0] == 8
            assert steps[7].success_once[0] == 1.0 and steps[7].success_at_end[0] == 0.0
            assert all(torch.equal(step.final_obs, step.next_obs) for step in steps[:7])
            if auto_reset:  # training: the env alone is reset at the time limit, and goes on
                assert steps[7].episode_done[0] and ends == [7]
                assert not torch.allclose(steps[7].final_obs, steps[7].next_obs)
            else:  # evaluation: no reset; the caller resets every round
                assert torch.equal(steps[7].final_obs, steps[7].next_obs)


def test_short_pickcube_run_logs_success_and_its_checkpoint_reloads(tmp_path, capsys, monkeypatch):
    require_maniskill()
    make_eval_env = rt.make_eval_env

    def eval_env_that_succeeds_at_step_3(*args, **kwargs):
        env = make_eval_env(*args, **kwargs)
        force_success_at(env, 3)  # every evaluation episode: success at its third step only
        return env

    monkeypatch.setattr(rt, "make_eval_env", eval_env_that_succeeds_at_step_3)
    argv = ["--env-id", "PickCube-v1", *TINY, "--total-timesteps", "48", "--runs-dir", str(tmp_path), "--save-model"]
    assert rt.main(argv) == 0
    run_dir = only_run(tmp_path)
    assert "physx_cpu with 1 env(s)" in capsys.readouterr().err  # the progress output says so
    rows = read_metrics(run_dir)
    assert [int(r["global_step"]) for r in rows] == [0, 16, 32, 48]
    for row in rows[1:]:
        for name in ["losses/critic_loss", "losses/actor_loss", "losses/aux_loss", "policy/kl", "policy/entropy"]:
            assert np.isfinite(float(row[name])), name
        assert np.isfinite(float(row["eval/episodic_return"]))
    for row in rows:  # success at step 3 of each evaluation episode, which runs on to its end
        assert float(row["eval/success_once"]) == float(row["eval_stochastic/success_once"]) == 1.0
        assert float(row["eval/success_at_end"]) == float(row["eval_stochastic/success_at_end"]) == 0.0
    checkpoint = os.path.join(run_dir, "checkpoint.pt")
    payload = rt.read_checkpoint(checkpoint)
    assert payload["global_step"] == 48 and payload["args"]["vmax"] == 15.0 and payload["args"]["gamma"] == 0.8

    assert rt.main(["--eval-only", "--checkpoint", checkpoint, "--num-eval-envs", "2"]) == 0
    out = capsys.readouterr().out
    assert "over 2 episodes" in out and "success_once=" in out and "success_at_end=" in out

    assert rt.main(["--resume", checkpoint, "--total-timesteps", "64", "--no-progress"]) == 0
    assert rt.read_checkpoint(checkpoint)["global_step"] == 64

    # A run saved with many envs on the GPU simulator cannot go on with the CPU simulator's one,
    # but it can be evaluated there (also where its sizes would not divide with one env).
    payload = torch.load(checkpoint, weights_only=True)
    payload["args"].update(num_envs=8, num_mini_batches=32, device="auto")
    torch.save(payload, checkpoint)
    capsys.readouterr()
    assert rt.main(["--resume", checkpoint, "--total-timesteps", "1024", "--device", "cpu"]) == 2
    assert "the checkpoint ran 8 envs on ManiSkill's GPU simulator" in capsys.readouterr().err
    assert rt.main(["--eval-only", "--checkpoint", checkpoint, "--device", "cpu"]) == 0
    assert "over 1 episodes" in capsys.readouterr().out


def test_the_gpu_simulator_without_its_physx_library_says_what_to_do(tmp_path, monkeypatch):
    """physx_cuda needs PhysX's GPU library, which SAPIEN downloads at first use; offline, the
    download fails. The env asks for it before gym.make and turns that into one message (the
    download is made to fail here, on a CPU machine; the env never gets to gym.make)."""
    require_maniskill(vulkan=False)
    import requests
    import sapien.physx

    def offline():
        raise requests.ConnectionError("Failed to resolve the host")

    monkeypatch.setenv("HOME", str(tmp_path))  # no library downloaded earlier
    monkeypatch.setattr(sapien.physx, "enable_gpu", offline)
    args = rt.resolve_args(rt.Args(env_id="PickCube-v1", preset="cpu", device="cpu"))
    with pytest.raises(rt.UserError) as error:
        rt.ManiSkillEnv(args, 8, 0, torch.device("cuda"))  # a CUDA device: the GPU simulator
    message = str(error.value)
    assert "ManiSkill's GPU simulator needs PhysX's GPU library" in message and "--device cpu" in message
    assert f"{tmp_path}/.sapien/physx/{sapien.physx.version()}" in message and "ConnectionError" in message


def test_without_a_vulkan_driver_the_run_says_what_to_install(tmp_path, monkeypatch):
    """SAPIEN builds a renderer also for state observations; with no working Vulkan driver the
    run stops with one message naming what to install, before any run folder is made. (The
    driver is hidden: the Vulkan loader is pointed at a driver file that does not exist.)"""
    require_maniskill(vulkan=False)
    for name in ("VK_ICD_FILENAMES", "VK_DRIVER_FILES"):  # older and newer loaders' names
        monkeypatch.setenv(name, str(tmp_path / "no_driver.json"))
    runs = tmp_path / "runs"
    argv = ["--env-id", "PickCube-v1", *TINY, "--total-timesteps", "48", "--runs-dir", str(runs)]
    result = run_script("reppo_torch.py", *argv, check=False)
    assert result.returncode == 2, result.stderr
    assert "ManiSkill3 needs a Vulkan driver" in result.stderr and "lavapipe" in result.stderr
    assert "Traceback" not in result.stderr and not runs.exists()


def test_an_unknown_control_mode_is_named_with_the_valid_ones(tmp_path, capsys):
    require_maniskill()
    argv = ["--env-id", "PickCube-v1", *TINY, "--control-mode", "pd_nonsense", "--runs-dir", str(tmp_path)]
    assert rt.main(argv) == 2
    err = capsys.readouterr().err
    assert "--control-mode pd_nonsense not in supported modes: [" in err and "'pd_joint_delta_pos'" in err
    assert os.listdir(tmp_path) == []  # no run folder


def test_evaluation_leaves_the_training_randomness_alone():
    """ManiSkill draws a task's random initial state from the global torch generator when it
    resets without a seed, as the training env's partial resets do; evaluation resets with
    seeds of its own and must not reset its envs at their last step."""
    require_maniskill()
    args = rt.resolve_args(rt.Args(env_id="PushCube-v1", preset="cpu", num_steps=8, num_mini_batches=1))
    args = dataclasses.replace(args, actor_hidden=32, critic_hidden=32, num_eval_envs=2, device="cpu")
    trainer = rt.Trainer(args, 1, torch.device("cpu"))
    before = torch.get_rng_state()
    result = trainer.evaluate()
    assert len(result["return"]) == 2
    assert torch.equal(torch.get_rng_state(), before)
    trainer.close()


def test_speed_benchmark_measures_pickcube_on_the_cpu_simulator(tmp_path):
    """benchmarks/speed.py's 'maniskill' setting (the README's ManiSkill speed figure): one
    warm-up and one timed iteration of --preset cpu on PickCube-v1, one env on physx_cpu."""
    require_maniskill()
    if torch.cuda.is_available():
        pytest.skip("speed.py measures the GPU simulator where CUDA is available; this figure is the CPU one's")
    out = tmp_path / "speed.json"
    start = time.perf_counter()
    run_script(
        "benchmarks/speed.py", "--settings", "maniskill", "--implementations", "torch", "--iterations", "1",
        "--json-out", str(out),
    )  # fmt: skip
    wall = time.perf_counter() - start
    (result,) = json.loads(out.read_text())
    assert (result["setting"], result["implementation"], result["backend"]) == ("maniskill", "torch", "cpu")
    # One timed iteration (1 env x 32 steps) inside a script that also set up and warmed up:
    # a time in the wrong unit (ms for s) or over the wrong span would fall outside.
    assert 0 < result["seconds_per_iteration"] < wall
    # Set-up, warm-up and the timed round ran one after another inside the script.
    assert 0 < result["compile_s"] + result["warmup_s"] + result["seconds_per_iteration"] < wall
    assert abs(result["sps"] * result["seconds_per_iteration"] - 32) < 1e-6  # the figure is per env step
    assert 100 < result["peak_rss_mib"] < 16_000  # MiB: KiB (ru_maxrss's unit) would read ~1000x higher
