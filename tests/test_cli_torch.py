"""The command line of reppo_torch.py: tiny real runs, checkpoints, resume and bad input
(the same checks as tests/test_cli_jax.py, on the Playground bridge)."""

import glob
import json
import os
import shlex
import shutil
import signal

import numpy as np
import pytest
import torch
from conftest import (
    BATCH,
    EXIT_HANDLERS_RAN,
    TINY,
    StubWandbRun,
    assert_same_rows,
    assert_same_state,
    check_a_ctrl_c_while_the_run_starts_leaves_nothing_behind,
    check_a_second_ctrl_c_in_a_gc_callback_is_not_lost,
    check_eval_only_evaluates_the_checkpoint,
    check_saves_at_every_log_point,
    check_track_and_resume,
    check_track_logs_a_wandb_run_offline,
    check_track_that_cannot_start_says_what_to_do,
    check_training_episodes_are_logged,
    ctrl_c_while_writing,
    interrupt_a_run,
    only_run,
    read_metrics,
    require,
    run_script,
)

import reppo_torch as rt


def run_cli(*argv, check=True):
    return run_script("reppo_torch.py", *argv, check=check)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """4 iterations in one go, logged every 2, with checkpoints."""
    runs = tmp_path_factory.mktemp("full")
    argv = [*TINY, "--total-timesteps", str(4 * BATCH), "--runs-dir", str(runs), "--save-model", "--seed", "3"]
    assert rt.main(argv) == 0  # in-process (the subprocess path is covered by --help and bad input)
    return only_run(runs)


def test_help_lists_the_flags():
    result = run_cli("--help")
    for flag in ["--env-id", "--num-seeds", "--preset", "--resume", "--eval-only", "--track", "--compile"]:
        assert flag in result.stdout


def test_preset_cpu_changes_the_defaults_and_flags_still_win():
    args = rt.parse_args(["--preset", "cpu"])
    assert (args.num_envs, args.num_mini_batches, args.actor_hidden, args.critic_hidden) == (64, 4, 256, 256)
    assert (args.num_steps, args.num_epochs, args.kl_bound) == (32, 8, 0.1)
    assert args.log_interval == 20
    assert rt.parse_args(["--preset=cpu"]) == args  # the "=" form too
    assert rt.parse_args(["--preset", "cpu", "--num-envs", "32"]).num_envs == 32
    paper = rt.parse_args([])
    assert (paper.num_envs, paper.num_mini_batches, paper.critic_hidden) == (1024, 16, 512)


def test_same_args_fields_as_the_jax_file():
    import dataclasses

    import reppo_jax as rj

    jax_fields = {f.name for f in dataclasses.fields(rj.Args)}
    torch_fields = {f.name for f in dataclasses.fields(rt.Args)}
    assert jax_fields <= torch_fields  # the torch file adds only its speed switches and ManiSkill's two
    speed_switches = {"device", "compile", "fused_adam", "cuda_graphs", "torch_threads"}
    assert torch_fields - jax_fields == speed_switches | {"control_mode", "ignore_terminations"}


# SPEC section 11, the paper's DM Control setting: what both files must default to.
SPEC_DEFAULTS = {
    "num_envs": 1024, "num_steps": 32, "num_mini_batches": 16, "num_epochs": 8, "total_timesteps": 50_000_000,
    "actor_hidden": 512, "critic_hidden": 512, "min_std": 0.1, "lmbda": 0.95, "kl_bound": 0.1, "kl_start": 0.01,
    "ent_start": 0.01, "ent_target_mult": 0.5, "learning_rate": 3e-4, "max_grad_norm": 0.5, "num_bins": 151,
    "aux_coef": 1.0, "num_value_samples": 1, "num_kl_samples": 16,  # M = 16: SPEC section 8
}  # fmt: skip


def test_same_defaults_as_the_jax_file_and_the_spec():
    import dataclasses

    import reppo_jax as rj

    torch_defaults = dataclasses.asdict(rt.Args())
    jax_defaults = dataclasses.asdict(rj.Args())
    differ = {name for name in jax_defaults if jax_defaults[name] != torch_defaults[name]}
    assert differ == {"exp_name"}  # "reppo_jax" and "reppo_torch": the run folders' names
    assert {name: jax_defaults[name] for name in SPEC_DEFAULTS} == SPEC_DEFAULTS
    assert rt.PRESETS == rj.PRESETS and rt.DM_CONTROL_DEFAULTS == rj.DM_CONTROL_DEFAULTS
    assert rj.DM_CONTROL_DEFAULTS == {"vmin": 0.0, "vmax": 150.0, "gamma": 0.99, "episode_length": 1000}
    assert rt.MANISKILL_DEFAULTS == {"vmin": -15.0, "vmax": 15.0}
    for name in ["LOG_PROB_CLIP", "KL_SAMPLE_CLIP", "ACTION_CLIP", "NORMALIZER_EPS", "RMS_NORM_EPS"]:
        assert getattr(rt, name) == getattr(rj, name), name


def test_tiny_run_writes_args_metrics_and_checkpoint(full_run):
    with open(os.path.join(full_run, "args.json")) as f:
        record = json.load(f)
    assert record["args"]["env_id"] == "CartpoleBalance" and record["args"]["vmax"] == 150.0
    assert record["torch_device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # --device auto
    assert record["versions"]["torch"] != "not installed"
    rows = read_metrics(full_run)
    assert [int(r["global_step"]) for r in rows] == [0, 2 * BATCH, 4 * BATCH]
    for column in ["seed", "eval/episodic_return", "charts/SPS", "losses/critic_loss", "losses/actor_loss",
                   "policy/kl", "policy/entropy", "policy/alpha", "policy/beta", "charts/episodic_return"]:  # fmt: skip
        assert column in rows[0]
    for row in rows[1:]:
        assert np.isfinite(float(row["losses/critic_loss"])) and float(row["charts/SPS"]) > 0
        assert 0 < float(row["eval/episodic_return"]) <= 16  # at most 1 per step, 16 steps
    payload = torch.load(os.path.join(full_run, "checkpoint.pt"), weights_only=True)
    assert payload["global_step"] == 4 * BATCH and payload["args"]["seed"] == 3
    state = payload["trainer"]
    for key in ["actor", "critic", "actor_opt", "critic_opt", "log_alpha", "log_beta", "normalizer", "generator"]:
        assert key in state
    assert state["iteration"] == 4 and float(state["normalizer"]["count"]) == 4 * BATCH


def test_eval_only_evaluates_the_checkpoint(full_run, capsys):
    check_eval_only_evaluates_the_checkpoint(rt.main, full_run, "checkpoint.pt", capsys)


@pytest.mark.parametrize("stop", [KeyboardInterrupt, RuntimeError], ids=["ctrl_c", "error"])
def test_eval_only_closes_its_simulators_however_it_ends(full_run, monkeypatch, stop):
    """A Ctrl-C (or an error) during --eval-only still closes the evaluation envs (ManiSkill's
    simulators), as training does, before the process leaves."""
    closed = []
    make_eval_env = rt.make_eval_env

    def recording_eval_env(*args, **kwargs):
        env = make_eval_env(*args, **kwargs)
        close = env.close
        env.close = lambda: (closed.append(True), close())
        return env

    def stopped(trainer):
        raise stop

    monkeypatch.setattr(rt, "make_eval_env", recording_eval_env)
    monkeypatch.setattr(rt, "eval_rows", stopped)
    argv = ["--eval-only", "--checkpoint", os.path.join(full_run, "checkpoint.pt")]
    if stop is KeyboardInterrupt:
        assert rt.main(argv) == 130
    else:
        with pytest.raises(RuntimeError):  # an unexpected error keeps its traceback
            rt.main(argv)
    assert closed == [True]


def test_training_episodes_are_logged_with_their_length_and_return(tmp_path):
    check_training_episodes_are_logged(rt.main, tmp_path)


def test_track_logs_a_wandb_run_offline(tmp_path):
    check_track_logs_a_wandb_run_offline(rt.main, tmp_path)


def test_track_logs_every_row_and_a_resumed_run_continues_its_wandb_run(tmp_path, monkeypatch):
    check_track_and_resume(rt.main, "checkpoint.pt", tmp_path, monkeypatch)


def test_track_that_cannot_start_says_what_to_do(tmp_path, monkeypatch, capsys):
    check_track_that_cannot_start_says_what_to_do(rt.main, tmp_path, monkeypatch, capsys)


def test_resuming_a_finished_run_asks_for_more_steps(full_run, capsys):
    assert rt.main(["--resume", os.path.join(full_run, "checkpoint.pt")]) == 2
    err = capsys.readouterr().err
    assert "leaves no iteration to run; give a larger --total-timesteps" in err and "Traceback" not in err


def test_flags_a_checkpoint_overrides_are_named(full_run, capsys):
    checkpoint = os.path.join(full_run, "checkpoint.pt")
    argv = ["--resume", checkpoint, "--total-timesteps", "999999", "--log-interval", "5", "--no-track", "--no-progress"]
    args = rt.args_from_checkpoint(rt.parse_args(argv), argv)
    assert (args.total_timesteps, args.log_interval, args.progress) == (999999, 2, False)  # log-interval: saved
    err = capsys.readouterr().err
    assert "ignored: --log-interval, --no-track" in err and "--total-timesteps" not in err


def test_save_model_saves_at_every_log_point(tmp_path, monkeypatch):
    check_saves_at_every_log_point(rt, tmp_path, monkeypatch)


def test_resume_equals_the_uninterrupted_run(full_run, tmp_path):
    argv = [*TINY, "--total-timesteps", str(2 * BATCH), "--runs-dir", str(tmp_path), "--save-model", "--seed", "3"]
    assert rt.main(argv) == 0
    half = only_run(tmp_path)
    resume = ["--resume", os.path.join(half, "checkpoint.pt"), "--total-timesteps", str(4 * BATCH)]
    assert rt.main(resume) == 0
    with open(os.path.join(half, "args.json")) as f:  # main(argv)'s own argv, not pytest's
        record = json.load(f)
    assert record["command"] == "python " + shlex.join(["reppo_torch.py", *argv])
    assert record["resumed_by"] == ["python " + shlex.join(["reppo_torch.py", *resume])]
    assert read_metrics(full_run)[-1]["charts/episodic_return"] != ""  # the episodes' columns count too
    assert_same_rows(half, full_run)
    # The final checkpoints too: the whole trainer state (networks, optimisers, alpha and beta,
    # normaliser, iteration, random generator, env state and observation) and the step.
    resumed = torch.load(os.path.join(half, "checkpoint.pt"), weights_only=True)
    unbroken = torch.load(os.path.join(full_run, "checkpoint.pt"), weights_only=True)
    assert_same_state(resumed["trainer"], unbroken["trainer"])
    assert resumed["global_step"] == unbroken["global_step"] == 4 * BATCH


def test_a_ctrl_c_between_log_points_resumes_to_the_same_rows(full_run, tmp_path, monkeypatch):
    """A Ctrl-C in iteration 3 (log points every 2 iterations) saves iteration 3's metrics with
    the checkpoint, so the resumed run's row at iteration 4 averages iterations 3 and 4, as the
    unbroken run's does, and not iteration 4 alone."""
    train_iteration = rt.Trainer.train_iteration

    def interrupted_in_iteration_3(self):
        if self.iteration == 2:
            os.kill(os.getpid(), signal.SIGINT)  # the run's own handler: stop once this iteration ends
        return train_iteration(self)

    monkeypatch.setattr(rt.Trainer, "train_iteration", interrupted_in_iteration_3)
    argv = [*TINY, "--total-timesteps", str(4 * BATCH), "--runs-dir", str(tmp_path), "--seed", "3"]
    assert rt.main(argv) == 130
    monkeypatch.undo()
    run_dir = only_run(tmp_path)
    checkpoint = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    assert checkpoint["global_step"] == 3 * BATCH and len(checkpoint["metrics_since_log"]) == 1
    assert rt.main(["--resume", os.path.join(run_dir, "checkpoint.pt")]) == 0
    assert_same_rows(run_dir, full_run)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--env-id", "CheetahRunn"], "unknown --env-id 'CheetahRunn'. Valid DM Control tasks: AcrobotSwingup"),
        (["--env-id", "PickCube-v9"], "Valid ManiSkill3 tasks:"),
        (["--env-id", "Go1JoystickFlatTerrain"], "downloaded from the internet"),
        (["--env-id", "PickSingleYCB-v1"], "needs assets that are not downloaded: ycb"),
        (["--env-id", "AnymalC-Reach-v1"], "needs assets that are not downloaded: anymal_c"),  # the robot's
        (["--num-envs", "10", "--num-steps", "3", "--num-mini-batches", "4"], "10 * 3 = 30 is not divisible by"),
        (["--num-mini-batches", "0"], "--num-mini-batches must be at least 1, got 0"),
        (["--num-seeds", "0"], "--num-seeds must be at least 1, got 0"),
        (["--eval-only"], "--eval-only needs --checkpoint PATH"),
        (["--resume", "/nonexistent/checkpoint.pt"], "does not exist"),
        (["--total-timesteps", "10"], "smaller than one iteration"),
        (["--gamma", "0"], "--gamma must be in (0, 1], got 0.0"),
        (["--lmbda", "1.5"], "--lmbda must be in [0, 1], got 1.5"),
        (["--ent-start", "0"], "--ent-start must be > 0, got 0.0"),
        (["--learning-rate", "-1"], "--learning-rate must be >= 0, got -1.0"),
        (["--torch-threads", "-1"], "--torch-threads must be >= 0 (0: PyTorch's default), got -1"),
        (["--env-id", "PushCube-v1", "--episode-length", "10"], "ManiSkill's default 1 - 10 / episode_length"),
        (["--vmin", "5", "--vmax", "1"], "need --vmin < --vmax and --num-bins >= 2, got --vmin 5.0, --vmax 1.0"),
        (["--seed", "3000000000"], "--seed must be in [-2**31, 2**31 - num_seeds], got 3000000000"),
        (["--checkpoint", "run/checkpoint.pt"], "--checkpoint is read by --eval-only only; to continue training use"),
        (["--eval-only", "--checkpoint", "a.pt", "--resume", "b.pt"], "it does not go with --resume"),
        (["--resume", os.path.dirname(__file__)], "is a folder; give the checkpoint file, e.g."),
        ([*TINY, "--runs-dir", os.path.join(os.devnull, "runs")], "cannot make the run folder /dev/null/runs/"),
        pytest.param(
            ["--cuda-graphs"],
            "--cuda-graphs needs a CUDA device",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here"),
        ),
    ],
)
def test_bad_input_gives_a_clear_message_and_exit_code_2(argv, message, capsys):
    if any(arg.endswith("-v1") for arg in argv):  # a real ManiSkill3 task: its messages need the package
        require("mani_skill", "mani_skill==3.0.1")
    assert rt.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_input_from_the_shell_has_no_traceback():
    result = run_cli("--env-id", "CheetahRunn", check=False)
    assert result.returncode == 2 and "unknown --env-id" in result.stderr and "Traceback" not in result.stderr


def test_the_cpu_warning_estimates_the_hours_of_the_steps_still_to_run(monkeypatch, capsys):
    """Without CUDA the paper setting prints an estimate of its hours (10.8M steps at 1,578 to
    774 env-steps/s: 1.9 to 3.9 hours)."""

    class Stop(Exception):
        pass

    def no_trainer(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(rt, "Trainer", no_trainer)
    args = rt.resolve_args(rt.Args(env_id="CheetahRun", total_timesteps=10_800_000, device="cpu"))
    with pytest.raises(Stop):
        rt.train(args, [])
    assert "this run's 10,800,000 env steps would take 1.9-3.9 hours" in capsys.readouterr().err


def poison_critic_loss(monkeypatch):
    """Make every critic loss (and its logged value) NaN from the first update on."""
    real_critic_loss = rt.critic_loss

    def poisoned(*args, **kwargs):
        loss, info = real_critic_loss(*args, **kwargs)
        return loss * float("nan"), {**info, "losses/critic_loss": loss.detach() * float("nan")}

    monkeypatch.setattr(rt, "critic_loss", poisoned)


def test_wandb_hears_whether_the_run_completed(tmp_path, monkeypatch):
    """--track: a run that completes finishes its wandb run with exit code 0; one stopped by a
    non-finite loss with 1, so that wandb shows it as failed."""
    run = StubWandbRun()
    monkeypatch.setattr(rt, "start_wandb", lambda args, run_dir, run_name: run)
    argv = [*TINY, "--total-timesteps", str(2 * BATCH), "--track"]
    assert rt.main([*argv, "--runs-dir", str(tmp_path / "completes")]) == 0
    poison_critic_loss(monkeypatch)
    assert rt.main([*argv, "--runs-dir", str(tmp_path / "stops")]) == 2
    assert run.exit_codes == [0, 1]


def test_a_nan_loss_stops_the_run_and_keeps_the_last_finite_checkpoint(tmp_path, monkeypatch, capsys):
    poison_critic_loss(monkeypatch)
    code = rt.main([*TINY, "--total-timesteps", str(4 * BATCH), "--runs-dir", str(tmp_path), "--save-model"])
    assert code == 2
    err = capsys.readouterr().err
    assert "non-finite losses/" in err and "losses/critic_loss" in err and "at iteration 1;" in err
    run_dir = only_run(tmp_path)
    payload = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    assert payload["global_step"] == 0
    for module in ("actor", "critic"):
        assert all(torch.isfinite(v).all() for v in payload["trainer"][module].values())
    # The step-0 checkpoint resumes (here without the poison) and evaluates step 0 once more,
    # in place of the row the stopped run wrote, not beside it.
    monkeypatch.undo()
    assert rt.main(["--resume", os.path.join(run_dir, "checkpoint.pt")]) == 0
    assert [int(r["global_step"]) for r in read_metrics(run_dir)] == [0, 2 * BATCH, 4 * BATCH]


def test_non_finite_parameters_after_finite_losses_stop_the_run_too(tmp_path, monkeypatch, capsys):
    """An update can make the parameters NaN while the losses it reports were finite; the
    run stops there instead of saving (and calling finite) the broken state."""
    real_train_iteration = rt.Trainer.train_iteration

    def nan_parameters_in_the_third_iteration(trainer):
        metrics = real_train_iteration(trainer)
        if trainer.iteration == 3:
            with torch.no_grad():
                next(trainer.critic.parameters()).fill_(float("nan"))
        return metrics

    monkeypatch.setattr(rt.Trainer, "train_iteration", nan_parameters_in_the_third_iteration)
    code = rt.main([*TINY, "--total-timesteps", str(4 * BATCH), "--runs-dir", str(tmp_path), "--save-model"])
    assert code == 2
    assert "non-finite parameters at iteration 3; stopped" in capsys.readouterr().err
    payload = torch.load(os.path.join(only_run(tmp_path), "checkpoint.pt"), weights_only=True)
    assert payload["global_step"] == 2 * BATCH  # the last finite state
    assert all(torch.isfinite(v).all() for v in payload["trainer"]["critic"].values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback where no CUDA device is")
def test_a_checkpoint_saved_with_cuda_switches_is_evaluated_on_the_cpu(full_run, tmp_path, capsys):
    checkpoint = str(tmp_path / "checkpoint.pt")
    payload = torch.load(os.path.join(full_run, "checkpoint.pt"), weights_only=True)
    payload["args"].update(device="cuda", cuda_graphs=True)  # as a run on a GPU saves them
    torch.save(payload, checkpoint)
    assert rt.main(["--eval-only", "--checkpoint", checkpoint]) == 0
    captured = capsys.readouterr()
    assert "no CUDA device here; the checkpoint's --device, --cuda-graphs left at the default" in captured.err
    assert f"eval seed=3 step={4 * BATCH} " in captured.out


def test_a_checkpoint_of_another_version_gives_a_clear_message(full_run, tmp_path, capsys):
    """A checkpoint whose args name a setting this file does not have, or whose networks do
    not fit (here: a parameter missing), stops with one message and exit code 2."""
    payload = torch.load(os.path.join(full_run, "checkpoint.pt"), weights_only=True)
    unknown = str(tmp_path / "unknown.pt")
    torch.save({**payload, "args": {**payload["args"], "old_setting": 1}}, unknown)
    assert rt.main(["--eval-only", "--checkpoint", unknown]) == 2
    err = capsys.readouterr().err
    assert "was saved by another version of this file (unknown settings: old_setting)" in err and "Traceback" not in err
    payload["trainer"]["actor"].pop(next(iter(payload["trainer"]["actor"])))
    broken = str(tmp_path / "broken.pt")
    torch.save(payload, broken)
    for argv in (["--eval-only", "--checkpoint", broken], ["--resume", broken, "--total-timesteps", str(6 * BATCH)]):
        assert rt.main(argv) == 2
        err = capsys.readouterr().err
        assert "does not fit this version of reppo_torch.py (RuntimeError: Error(s) in loading" in err, err


def test_compile_with_several_seeds_starts_each_seed_from_a_fresh_compiler(monkeypatch):
    """torch.compile recompiles the update for each seed's Trainer and runs eagerly past its 8th
    recompilation, so --num-seeds drops the compiled code between seeds (wiring only: train is
    a stub here)."""
    calls = []
    monkeypatch.setattr(rt, "train", lambda args, argv: calls.append(("train", args.seed, args.num_seeds)))
    monkeypatch.setattr(torch._dynamo, "reset", lambda: calls.append(("reset",)))
    assert rt.main([*TINY, "--compile", "--num-seeds", "3", "--seed", "5"]) == 0
    assert calls == [("train", 5, 1), ("reset",), ("train", 6, 1), ("reset",), ("train", 7, 1)]
    calls.clear()
    assert rt.main([*TINY, "--num-seeds", "2"]) == 0  # eager: nothing to drop
    assert [call[0] for call in calls] == ["train", "train"]


def test_a_checkpoint_from_another_kind_of_device_resumes_with_a_fresh_random_stream(full_run, tmp_path, capsys):
    """A CUDA generator's state (16 bytes) cannot go on in a CPU generator (5,056 bytes) or
    back: a run saved on a GPU resumes on a CPU with a fresh stream and a note, not a
    traceback (and the other way round where this test runs on a CUDA device)."""
    run_dir = str(tmp_path / "run")
    shutil.copytree(full_run, run_dir)
    checkpoint = os.path.join(run_dir, "checkpoint.pt")
    payload = torch.load(checkpoint, weights_only=True)
    if torch.cuda.is_available():  # the run is on CUDA (--device auto): a CPU generator's state
        payload["trainer"]["generator"] = torch.Generator().get_state()
    else:  # what a CUDA generator saves
        payload["trainer"]["generator"] = torch.zeros(16, dtype=torch.uint8)
    torch.save(payload, checkpoint)
    assert rt.main(["--resume", checkpoint, "--total-timesteps", str(6 * BATCH)]) == 0
    assert "training goes on with a fresh random stream" in capsys.readouterr().err
    assert int(read_metrics(run_dir)[-1]["global_step"]) == 6 * BATCH


def test_ctrl_c_in_the_last_iteration_still_saves_a_checkpoint(tmp_path, monkeypatch, capsys):
    """The first Ctrl-C promises a checkpoint after the running iteration, also when that
    iteration is the last one (and no --save-model asked for checkpoints anyway)."""
    real_train_iteration = rt.Trainer.train_iteration

    def ctrl_c_in_the_last_iteration(trainer):
        metrics = real_train_iteration(trainer)
        if trainer.iteration == 2:
            handler = signal.getsignal(signal.SIGINT)  # the run's own handler, called as SIGINT would
            assert handler.__qualname__.startswith("install_interrupt_handler"), handler
            handler(signal.SIGINT, None)
        return metrics

    monkeypatch.setattr(rt.Trainer, "train_iteration", ctrl_c_in_the_last_iteration)
    assert rt.main([*TINY, "--total-timesteps", str(2 * BATCH), "--runs-dir", str(tmp_path)]) == 130
    assert "interrupted: saved" in capsys.readouterr().err
    payload = torch.load(os.path.join(only_run(tmp_path), "checkpoint.pt"), weights_only=True)
    assert payload["global_step"] == 2 * BATCH


def test_a_second_ctrl_c_stops_at_once_without_a_checkpoint(tmp_path, monkeypatch, capsys):
    """The second Ctrl-C raises inside the running iteration, whose state may then be half
    updated: no checkpoint (a resume from it would not be exact), exit code 130."""
    real_train_iteration = rt.Trainer.train_iteration

    def ctrl_c_twice_in_iteration_3(trainer):
        if trainer.iteration == 2:
            handler = signal.getsignal(signal.SIGINT)  # the run's own handler, called as SIGINT would
            handler(signal.SIGINT, None)  # the first: finish this iteration, then save
            handler(signal.SIGINT, None)  # the second: stop now (raises KeyboardInterrupt)
        return real_train_iteration(trainer)

    monkeypatch.setattr(rt.Trainer, "train_iteration", ctrl_c_twice_in_iteration_3)
    assert rt.main([*TINY, "--total-timesteps", str(4 * BATCH), "--runs-dir", str(tmp_path)]) == 130
    assert "interrupted twice, inside an iteration: no checkpoint written" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(only_run(tmp_path), "checkpoint.pt"))


def test_num_seeds_runs_each_seed_in_its_own_folder(tmp_path):
    """--num-seeds 2: seed 1, then seed 2, each in its own folder; the second is the run that
    `--seed 2` alone gives (the seed reaches the networks and the simulator, not only the
    folder's name), and the two seeds' runs differ."""
    argv = [*TINY, "--total-timesteps", str(2 * BATCH)]
    assert rt.main([*argv, "--runs-dir", str(tmp_path / "both"), "--num-seeds", "2"]) == 0
    folders = sorted(glob.glob(os.path.join(tmp_path, "both", "*")))
    assert [os.path.basename(f).split("__")[2] for f in folders] == ["1", "2"]
    assert [read_metrics(f)[-1]["seed"] for f in folders] == ["1", "2"]
    assert rt.main([*argv, "--runs-dir", str(tmp_path / "alone"), "--seed", "2"]) == 0
    assert_same_rows(folders[1], only_run(tmp_path / "alone"))
    first, second = read_metrics(folders[0]), read_metrics(folders[1])
    assert [r["eval/episodic_return"] for r in first] != [r["eval/episodic_return"] for r in second]
    assert [r["losses/critic_loss"] for r in first[1:]] != [r["losses/critic_loss"] for r in second[1:]]


def test_a_real_ctrl_c_twice_leaves_at_once_without_the_exit_handlers(tmp_path):
    """Two real SIGINTs 0.3 s apart, the first once the step-0 evaluation is logged: the second
    lands in the warm-up iteration (JAX compiling the simulator), in the checkpoint's save, or
    after the run has already stopped. Whichever: exit code 130, one of the three messages, no
    traceback, and the interpreter's exit handlers skipped. A second Ctrl-C inside XLA's
    compilation left it half done, and JAX's exit handler then crashed the interpreter (a
    segmentation fault, about one such exit in two at --preset cpu in session 20)."""
    code, err, run_dir, _ = interrupt_a_run(
        "reppo_torch.py", tmp_path, rows=1, twice=True, wait=0.0, gap=0.3, probe_exit=True
    )
    assert code == 130, f"exit {code}\n{err}"
    assert "Traceback" not in err and "Fatal Python error" not in err, err
    assert EXIT_HANDLERS_RAN not in err, err
    messages = ["interrupted: saved", "interrupted twice, inside an iteration", "interrupted again while saving"]
    assert sum(m in err for m in messages) == 1, err
    assert os.path.exists(os.path.join(run_dir, "checkpoint.pt")) == ("interrupted: saved" in err)


def test_a_second_ctrl_c_while_saving_stops_and_says_so(tmp_path, monkeypatch, capsys):
    """The first Ctrl-C stops the run after its iteration and saves; a second one while the
    file is being written (the first save compiles the simulator-state copy: seconds) stops it,
    says that no checkpoint was written, and leaves no partial file behind."""
    real_train_iteration = rt.Trainer.train_iteration
    written = []

    def ctrl_c_in_iteration_2(trainer):
        if trainer.iteration == 1:
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)  # the first: finish, then save
        return real_train_iteration(trainer)

    monkeypatch.setattr(rt.Trainer, "train_iteration", ctrl_c_in_iteration_2)
    monkeypatch.setattr(rt.torch, "save", lambda payload, path: ctrl_c_while_writing(path, written))
    assert rt.main([*TINY, "--total-timesteps", str(4 * BATCH), "--runs-dir", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert "interrupted again while saving: no checkpoint written" in err and "interrupted: saved" not in err
    assert len(written) == 1 and os.path.dirname(written[0]) == only_run(tmp_path)
    assert sorted(os.listdir(only_run(tmp_path))) == ["args.json", "metrics.csv"]  # no checkpoint, no .tmp


def test_ctrl_c_saves_a_checkpoint_that_resumes(tmp_path):
    code, err, run_dir = interrupt_a_run("reppo_torch.py", tmp_path)
    assert code == 130 and "interrupted: saved" in err and "Traceback" not in err, f"exit {code}\n{err}"
    payload = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    step = payload["global_step"]
    assert step >= 2 * BATCH and step % BATCH == 0 and payload["trainer"]["iteration"] == step // BATCH
    run_cli("--resume", os.path.join(run_dir, "checkpoint.pt"), "--total-timesteps", str(step + 2 * BATCH))
    steps = [int(r["global_step"]) for r in read_metrics(run_dir)]
    assert steps == sorted(set(steps)) and steps[-1] == step + 2 * BATCH


def test_a_second_ctrl_c_inside_a_gc_callback_still_stops_the_run(capsys):
    check_a_second_ctrl_c_in_a_gc_callback_is_not_lost(rt, capsys)


def test_a_ctrl_c_while_the_run_starts_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    check_a_ctrl_c_while_the_run_starts_leaves_nothing_behind(rt, tmp_path, monkeypatch, capsys)
